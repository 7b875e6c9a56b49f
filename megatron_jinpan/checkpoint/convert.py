"""`jinpan convert`: Hugging Face / Meta LLaMA <-> our checkpoints, streaming one tensor at a time.

    from megatron_jinpan.checkpoint.convert import hf_to_mj, mj_to_hf, meta_to_mj
    hf_to_mj("llama-7b-hf/", "ckpt/")          # a checkpoint load_model and checkpoint.load read
    mj_to_hf("runs/x/checkpoints/latest", "hf-out/")
    meta_to_mj("llama-2-7b/", "ckpt/")         # consolidated.*.pth + params.json

Output checkpoints hold only the model (kind "weights"), under global names,
so they load under any (tp, pp, dp). Tensors keep their dtype (a bf16 HF
model stays bf16 on disk; the trainer casts on load), which makes
HF -> ours -> HF byte-identical. Peak memory is about one tensor (HF/Meta
inputs are read lazily or memory-mapped) / one output shard (mj-to-hf).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import format as fmt
from .format import CheckpointError
from .hf import HFReader, config_to_hf, copy_tokenizer_files, hf_name, parse_size, plan_shards


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _prepare_output(output: Path, overwrite: bool = False) -> Path:
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise CheckpointError(f"output {output} exists and is not empty; choose a new directory "
                                  "(nothing is overwritten)")
    tmp = output.parent / f".{output.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish_output(tmp: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output)  # only with overwrite=True (checked in _prepare_output)
    os.replace(tmp, output)


def write_weights_checkpoint(output: Path, model_cfg, specs: dict[str, tuple[tuple, torch.dtype]], fetch,
                             extra_meta: dict | None = None, tokenizer_src: Path | None = None,
                             overwrite: bool = False, progress: bool = True) -> Path:
    """Write one of our (weights-only) checkpoints; `fetch(our_name)` returns each tensor on demand."""
    fmt.check_model_tensors(output, model_cfg, {fmt.MODEL_PREFIX + k: v for k, v in specs.items()})
    tmp = _prepare_output(output, overwrite)
    try:
        bar = _progress(len(specs), f"write {Path(output).name}", progress)

        def fetch_key(key: str) -> torch.Tensor:
            t = fetch(key[len(fmt.MODEL_PREFIX):])
            bar.update(1)
            return t

        fmt.write_tensors_lazy(tmp, {fmt.MODEL_PREFIX + k: v for k, v in specs.items()}, fetch_key)
        bar.close()
        meta = fmt.base_meta(model_cfg, "weights", **(extra_meta or {}))
        if tokenizer_src is not None and Path(tokenizer_src).exists():
            copied = copy_tokenizer_files(Path(tokenizer_src), tmp / "tokenizer")
            if copied:
                meta["tokenizer"] = "tokenizer"
            else:
                shutil.rmtree(tmp / "tokenizer")
        fmt.write_json_atomic(tmp / fmt.META, meta)
        fmt.write_json_atomic(tmp / "model_config.json", meta["model"])
        fmt.write_manifest(tmp)
        _finish_output(tmp, Path(output))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(output)


def _suggested_layout(model_cfg, tp: int | None, pp: int | None) -> dict:
    from ..config import ConfigError

    tp, pp = int(tp or 1), int(pp or 1)
    problems = []
    if model_cfg.num_heads % tp or model_cfg.num_kv_heads % tp:
        problems.append(f"--tp {tp} does not divide num_heads={model_cfg.num_heads} / "
                        f"num_kv_heads={model_cfg.num_kv_heads}")
    if model_cfg.intermediate_size % tp:
        problems.append(f"--tp {tp} does not divide intermediate_size={model_cfg.intermediate_size}")
    if model_cfg.num_layers < pp:
        problems.append(f"--pp {pp} exceeds num_layers={model_cfg.num_layers}")
    if problems:
        raise ConfigError("; ".join(problems))
    return {"tp": tp, "pp": pp, "padded_vocab_size": model_cfg.padded_vocab_size(tp)}


# ------------------------------------------------------------------ HF -> ours
TASK_HEADS = {"causal-lm": "lm", "reward": "value"}


def check_task(task: str | None, head: str, where) -> None:
    """--task causal-lm|reward must match the model's head (None: take the model as it is)."""
    if task is None:
        return
    if task not in TASK_HEADS:
        raise CheckpointError(f"--task {task!r}: choose one of {', '.join(TASK_HEADS)}")
    if TASK_HEADS[task] != head:
        has = "a value head (a reward model)" if head == "value" else "an LM head (a causal LM)"
        hint = ("to start a reward model from a language model, train with `jinpan reward` and "
                "checkpoint.load=<this model>") if task == "reward" else "pass --task reward"
        raise CheckpointError(f"{where} has {has}, not what --task {task} needs; {hint}")


def hf_to_mj(input_dir, output_dir, tp: int | None = None, pp: int | None = None, overwrite: bool = False,
             progress: bool = True, task: str | None = None) -> Path:
    reader = HFReader(input_dir)
    cfg = reader.config
    check_task(task, cfg.head, input_dir)
    layout = _suggested_layout(cfg, tp, pp)  # vocab padding for tp happens when the trainer loads
    keys = reader.our_keys()
    expected = set(fmt.model_keys(cfg))
    missing = sorted(expected - set(keys))
    unexpected = sorted(set(keys) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{input_dir}: tensors do not match config.json: missing {missing[:8]} "
                              f"unexpected {unexpected[:8]}")
    # Keep the HF file order, so each shard is read once, front to back.
    order = {f: i for i, f in enumerate(reader.files())}
    ordered = sorted(keys, key=lambda k: (order[reader.weight_map[keys[k]]], k))
    specs = {k: reader.shape_dtype(keys[k]) for k in ordered}
    try:
        return write_weights_checkpoint(
            Path(output_dir), cfg, specs, lambda k: reader.get(keys[k]),
            extra_meta={"source": {"format": "hf", "path": str(input_dir)}, "suggested_layout": layout},
            tokenizer_src=Path(input_dir), overwrite=overwrite, progress=progress)
    finally:
        reader.close()


# ------------------------------------------------------------------ ours -> HF
def mj_to_hf(input_dir, output_dir, max_shard_size="5GB", overwrite: bool = False, progress: bool = True,
             task: str | None = None) -> Path:
    """A Hugging Face directory: LlamaForCausalLM, or LlamaForSequenceClassification (num_labels=1,
    pad_token_id set) for a reward model (`--task reward`)."""
    from safetensors.torch import save_file

    path = fmt.resolve_checkpoint(input_dir)
    fmt.verify_checkpoint(path)
    meta = fmt.read_meta(path)
    cfg = fmt.model_config_from_meta(meta)
    check_task(task, cfg.head, path)
    tensors = fmt.tensor_metadata(path)
    fmt.check_model_tensors(path, cfg, tensors)
    names = fmt.model_keys(cfg)
    dtypes = {tensors[fmt.MODEL_PREFIX + n][1] for n in names}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    sizes = []
    for n in names:
        shape, dt = tensors[fmt.MODEL_PREFIX + n]
        sizes.append((n, int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()))
    shards = plan_shards(sizes, parse_size(max_shard_size))
    output = Path(output_dir)
    tmp = _prepare_output(output, overwrite)
    try:
        weight_map, total = {}, 0
        bar = _progress(len(names), f"write {output.name}", progress)
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            wanted = {fmt.MODEL_PREFIX + n: torch.empty(tensors[fmt.MODEL_PREFIX + n][0],
                                                        dtype=tensors[fmt.MODEL_PREFIX + n][1]) for n in shard}
            fmt.read_tensors(path, wanted)
            out = {hf_name(n): wanted[fmt.MODEL_PREFIX + n] for n in shard}
            save_file(out, str(tmp / fname), metadata={"format": "pt"})
            for k, t in out.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
            bar.update(len(shard))
            del wanted, out
        bar.close()
        fmt.write_json_atomic(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": weight_map})
        hf_config = config_to_hf(cfg, dtype)
        if meta.get("reward_normalization"):  # mean/std of the reward on a reference set (posttrain/reward.py)
            hf_config["reward_normalization"] = meta["reward_normalization"]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        tok = find_tokenizer(path, meta)
        if tok is not None:
            copy_tokenizer_files(tok, tmp)
            if Path(tok).is_file() and not (tmp / "tokenizer_config.json").exists():
                (tmp / "tokenizer_config.json").write_text(json.dumps({
                    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, indent=2) + "\n")
        _finish_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def find_tokenizer(path: Path, meta: dict | None = None) -> Path | None:
    """The tokenizer a checkpoint knows: its tokenizer/ dir, else the run config's data.tokenizer."""
    path = Path(path)
    meta = meta if meta is not None else (fmt.read_meta(path) if (path / fmt.META).is_file() else {})
    if meta.get("tokenizer") and (path / meta["tokenizer"]).exists():
        return path / meta["tokenizer"]
    if (path / "config.yaml").is_file():
        import yaml

        tree = yaml.safe_load((path / "config.yaml").read_text()) or {}
        tok = ((tree.get("data") or {}).get("tokenizer"))
        if tok and Path(tok).exists():
            return Path(tok)
    return None


# ------------------------------------------------------------------ Meta -> ours
# Meta name -> (our name template, dim Meta's model-parallel shards split along; None = replicated).
_META_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0), "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0), "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0), "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1), "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_META_TOP = {"tok_embeddings.weight": ("embed_tokens.weight", 1), "norm.weight": ("norm.weight", None),
             "output.weight": ("lm_head.weight", 0)}


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved (complex-pair) rotary rows -> HF's rotate_half layout, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of meta_to_hf_rotary (used to write test fixtures in Meta's layout)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _meta_map(name: str) -> tuple[str, int | None] | None:
    if name in _META_TOP:
        return _META_TOP[name]
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        if rest in _META_LAYER:
            ours, dim = _META_LAYER[rest]
            return f"layers.{idx}.{ours}", dim
    return None  # rope.freqs and other buffers


def meta_to_mj(input_dir, output_dir, overwrite: bool = False, progress: bool = True,
               tokenizer: str | None = None) -> Path:
    from ..models import LlamaConfig

    src = Path(input_dir)
    params_file = src / "params.json"
    if not params_file.is_file():
        raise FileNotFoundError(f"{src} has no params.json; is it a Meta LLaMA checkpoint directory?")
    params = json.loads(params_file.read_text())
    shard_files = sorted(src.glob("consolidated.*.pth"))
    if not shard_files:
        raise CheckpointError(f"{src} has no consolidated.*.pth files")
    try:  # memory-mapped: a tensor's pages are read when it is merged, not before
        shards = [torch.load(str(f), map_location="cpu", mmap=True, weights_only=True) for f in shard_files]
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read Meta shards in {src} ({exc})") from None
    mapping = {}
    for name in shards[0]:
        m = _meta_map(name)
        if m is not None:
            mapping[m[0]] = (name, m[1])
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads") or n_heads)

    def merged_shape(ours):
        name, split = mapping[ours]
        shape = list(shards[0][name].shape)
        if split is not None and len(shards) > 1:
            shape[split] = sum(s[name].shape[split] for s in shards)
        return tuple(shape)

    if "embed_tokens.weight" not in mapping or "layers.0.mlp.gate_proj.weight" not in mapping:
        raise CheckpointError(f"{src}: consolidated shards lack tok_embeddings / feed_forward weights")
    vocab = merged_shape("embed_tokens.weight")[0]
    inter = merged_shape("layers.0.mlp.gate_proj.weight")[0]
    n_layers = int(params["n_layers"])
    cfg = LlamaConfig(name=f"meta-{src.name}", vocab_size=vocab, hidden_size=dim, intermediate_size=inter,
                      num_layers=n_layers, num_heads=n_heads, num_kv_heads=n_kv,
                      max_seq_len=int(params.get("max_seq_len", 2048) or 2048),
                      rope_theta=float(params.get("rope_theta", 10000.0)), norm_eps=float(params.get("norm_eps", 1e-5)),
                      tie_embeddings="lm_head.weight" not in mapping)
    if params.get("use_scaled_rope"):
        raise CheckpointError("params.json sets use_scaled_rope (LLaMA 3.1); only the default rotary is supported")
    names = fmt.model_keys(cfg)
    missing = [n for n in names if n not in mapping]
    if missing:
        raise CheckpointError(f"{src}: missing Meta tensors for {missing[:8]}")
    specs = {n: (merged_shape(n), shards[0][mapping[n][0]].dtype) for n in names}

    def fetch(ours: str) -> torch.Tensor:
        name, split = mapping[ours]
        if split is None or len(shards) == 1:
            t = shards[0][name].clone()
        else:
            t = torch.cat([s[name] for s in shards], dim=split)
        if ours.endswith("q_proj.weight"):
            t = meta_to_hf_rotary(t, n_heads)
        elif ours.endswith("k_proj.weight"):
            t = meta_to_hf_rotary(t, n_kv)
        return t.contiguous()

    tok = Path(tokenizer) if tokenizer else (src / "tokenizer.model" if (src / "tokenizer.model").is_file()
                                            else (src.parent / "tokenizer.model"))
    return write_weights_checkpoint(Path(output_dir), cfg, specs, fetch,
                                    extra_meta={"source": {"format": "meta", "path": str(src)}},
                                    tokenizer_src=tok if tok.exists() else None, overwrite=overwrite,
                                    progress=progress)
