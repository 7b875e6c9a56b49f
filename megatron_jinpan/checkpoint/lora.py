"""LoRA checkpoints: fold adapters into their base, export them as a PEFT adapter, load them on one device.

    jinpan convert lora-merge --input runs/sft_lora --output merged/ [--base BASE]
    jinpan convert mj-to-hf --lora --input runs/sft_lora --output adapter/ [--base BASE]

    from megatron_jinpan.checkpoint.lora import lora_merge, export_peft, load_lora_model
    model = load_lora_model("runs/sft_lora")     # single-device Llama with the adapters merged (load_model does this)

A training checkpoint of a `train.trainable: lora` run holds only the
adapters `model.layers.N.<proj>.lora_A|lora_B.weight` (and a value head's
`score.weight`), plus `base` in meta.json: the `checkpoint.load` it was
trained on — one of our checkpoints or an HF directory — or null for the
seeded random init of `train.seed` (tests, demos), which is rebuilt here.
`--base` overrides the recorded base (a base that moved).

The merge streams: each output tensor is read from the base, gets
`W + (alpha/rank) * B @ A` (computed in fp32, stored in the base's dtype) if
it has an adapter, and is written before the next one is read.

The PEFT export writes `adapter_config.json` and `adapter_model.safetensors`
with PEFT's names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`)
for `peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(<base as HF>), DIR)`;
convert the base with `jinpan convert mj-to-hf` if it is one of ours.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import format as fmt
from .format import CheckpointError

PROJ_TO_TARGET = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                  "up_proj": "up", "down_proj": "down"}


def read_adapters(path, verify: bool = True):
    """(step dir, meta, LlamaConfig, LoRAConfig, {global name: tensor}) of an adapters-only checkpoint."""
    from ..config import LoRAConfig

    p = fmt.resolve_checkpoint(path)
    if verify:
        fmt.verify_checkpoint(p)
    meta = fmt.read_meta(p)
    if not meta.get("adapters_only"):
        raise CheckpointError(f"{p} is not a LoRA checkpoint (no adapters_only in {fmt.META}); "
                              "pass the checkpoint of a train.trainable=lora run")
    model_cfg = fmt.model_config_from_meta(meta)
    lora_cfg = LoRAConfig(**meta["lora"])
    tensors = fmt.tensor_metadata(p)
    keys = [k for k in tensors if k.startswith(fmt.MODEL_PREFIX)]
    wanted = {k: torch.empty(tensors[k][0], dtype=tensors[k][1]) for k in keys}
    fmt.read_tensors(p, wanted)
    state = {k[len(fmt.MODEL_PREFIX):]: v for k, v in wanted.items()}
    return p, meta, model_cfg, lora_cfg, state


def base_of(path: Path, meta: dict, base=None) -> str | None:
    """The base to merge onto: --base, else the one recorded at training time (None: seeded init)."""
    chosen = base or meta.get("base")
    if chosen and not Path(chosen).exists():
        raise FileNotFoundError(f"base {chosen} of LoRA checkpoint {path} does not exist; pass --base BASE "
                                "(the checkpoint or HF directory the adapters were trained on)")
    return str(chosen) if chosen else None


class _BaseReader:
    """Per-tensor access to the base weights: one of our checkpoints, an HF dir, or the seeded init."""

    def __init__(self, base: str | None, model_cfg, seed: int):
        self.cfg, self.seed, self.hf, self.ours = model_cfg, seed, None, None
        names = fmt.model_keys(model_cfg)
        if base is None:
            self.specs = {n: (shape, torch.float32) for n, shape in fmt.model_shapes(model_cfg).items()}
            return
        from .hf import HFReader
        from .load import resolve_source

        kind, p = resolve_source(base)
        if kind == "hf":
            self.hf = HFReader(p)
            saved, self._keys = self.hf.config, self.hf.our_keys()
            self.specs = {n: self.hf.shape_dtype(self._keys[n]) for n in names if n in self._keys}
        else:
            fmt.verify_checkpoint(p)
            meta = fmt.read_meta(p)
            if meta.get("adapters_only"):
                raise CheckpointError(f"base {p} is itself a LoRA checkpoint; merge it first or pass its base")
            saved, self.ours = fmt.model_config_from_meta(meta), p
            tensors = fmt.tensor_metadata(p)
            self.specs = {n: tensors[fmt.MODEL_PREFIX + n] for n in names if fmt.MODEL_PREFIX + n in tensors}
        problems = fmt.shape_mismatches(saved, model_cfg)
        missing = [n for n in names if n not in self.specs]
        if problems or missing:
            raise CheckpointError(f"base {base} does not fit the adapters' model: "
                                  + "; ".join(problems + [f"missing {missing[:4]}"] * bool(missing)))

    def get(self, name: str) -> torch.Tensor:
        if self.hf is not None:
            return self.hf.get(self._keys[name])
        if self.ours is not None:
            shape, dtype = self.specs[name]
            key = fmt.MODEL_PREFIX + name
            return fmt.read_tensors(self.ours, {key: torch.empty(shape, dtype=dtype)})[key]
        from ..models.llama import init_parameter

        return init_parameter(name, self.specs[name][0], self.cfg, self.seed)

    def close(self) -> None:
        if self.hf is not None:
            self.hf.close()


def _merged_fetch(reader: _BaseReader, adapters: dict, lora_cfg):
    from ..parallel.lora import lora_scale

    scale = lora_scale(lora_cfg)

    def fetch(name: str) -> torch.Tensor:
        if name == "score.weight" and name in adapters:  # a value head trained with the adapters
            return adapters[name]
        w = reader.get(name)
        prefix = name[: -len(".weight")]
        a, b = adapters.get(prefix + ".lora_A.weight"), adapters.get(prefix + ".lora_B.weight")
        if a is None:
            return w
        return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)

    return fetch


def lora_merge(input_path, output, base=None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a full weights checkpoint (kind "weights") = base + adapters of `input_path`."""
    from .convert import find_tokenizer, write_weights_checkpoint

    path, meta, model_cfg, lora_cfg, adapters = read_adapters(input_path)
    base_path = base_of(path, meta, base)
    reader = _BaseReader(base_path, model_cfg, int(meta.get("lora_base_seed", 0)))
    try:
        specs = dict(reader.specs)
        if "score.weight" in adapters:
            specs["score.weight"] = (tuple(adapters["score.weight"].shape), adapters["score.weight"].dtype)
        tok = find_tokenizer(path, meta)
        if tok is None and base_path and (Path(base_path) / "tokenizer").exists():
            tok = Path(base_path) / "tokenizer"
        return write_weights_checkpoint(
            Path(output), model_cfg, specs, _merged_fetch(reader, adapters, lora_cfg),
            extra_meta={"source": {"format": "lora-merge", "adapters": str(path), "base": base_path,
                                   "lora": meta["lora"]}},
            tokenizer_src=tok, overwrite=overwrite, progress=progress)
    finally:
        reader.close()


def load_lora_model(path, dtype=None, device=None, base=None):
    """A single-device Llama (eval mode): the base with the adapters of `path` merged in."""
    from ..models import Llama

    path, meta, model_cfg, lora_cfg, adapters = read_adapters(path)
    reader = _BaseReader(base_of(path, meta, base), model_cfg, int(meta.get("lora_base_seed", 0)))
    try:
        with torch.device("meta"):
            model = Llama(model_cfg)
        model.to_empty(device=device or "cpu")
        if model_cfg.tie_embeddings and model.lm_head is not None:
            model.lm_head.weight = model.embed_tokens.weight
        model = model.to(dtype or torch.float32)
        fetch = _merged_fetch(reader, adapters, lora_cfg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if model_cfg.tie_embeddings and name == "lm_head.weight":
                    continue
                param.copy_(fetch(name))
    finally:
        reader.close()
    return model.eval()


def peft_name(ours: str) -> str:
    """PEFT's saved name of one of our adapter tensors."""
    return "base_model.model.model." + ours


def export_peft(input_path, output, base=None, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    from ..parallel.lora import TARGET_MODULES, is_lora_name
    from .convert import _finish_output, _prepare_output

    path, meta, model_cfg, lora_cfg, adapters = read_adapters(input_path)
    if getattr(model_cfg, "head", "lm") != "lm" or "score.weight" in adapters:
        raise CheckpointError(f"{path} is a value-head (reward/critic) LoRA run; PEFT export covers causal-LM "
                              "adapters — use `jinpan convert lora-merge` and convert the merged checkpoint")
    base_path = base or meta.get("base")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora_cfg.rank), "lora_alpha": float(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout), "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(TARGET_MODULES[t][1] for t in lora_cfg.targets),
        "base_model_name_or_path": base_path, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "revision": None,
    }
    tmp = _prepare_output(Path(output), overwrite)
    try:
        tensors = {peft_name(n): t.contiguous() for n, t in sorted(adapters.items()) if is_lora_name(n)}
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        _finish_output(tmp, Path(output))
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(output)
