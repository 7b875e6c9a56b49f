"""`load_model(path)`: a single-device `Llama` from one of our checkpoints (any layout) or an HF directory.

    from megatron_jinpan import load_model
    model = load_model("runs/demo")                       # run dir -> checkpoints/latest
    model = load_model("runs/demo/checkpoints/step_0000100", dtype=torch.bfloat16)
    model = load_model("meta-llama/Llama-2-7b-hf local dir")

Weights are read tensor by tensor into a model built on the meta device,
so memory is about the model once. `dtype=None` keeps float32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import format as fmt
from .hf import HFReader


def resolve_source(path) -> tuple[str, Path]:
    """("hf" | "ours", directory)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass one of our checkpoints (or run dir) or an HF model dir")
    if fmt.is_hf_dir(p) and not (p / "checkpoints").is_dir():
        return "hf", p
    return "ours", fmt.resolve_checkpoint(p)


def read_model_state(path, names: list[str] | None = None, verify: bool = True):
    """(LlamaConfig, {global name: tensor}) of a checkpoint or HF dir, in this process (no collectives)."""
    kind, p = resolve_source(path)
    if kind == "hf":
        reader = HFReader(p)
        try:
            keys = reader.our_keys()
            names = names or fmt.model_keys(reader.config)
            missing = [n for n in names if n not in keys]
            if missing:
                raise fmt.CheckpointError(f"{p} lacks tensors {missing[:8]}")
            return reader.config, {n: reader.get(keys[n]) for n in names}
        finally:
            reader.close()
    if verify:
        fmt.verify_checkpoint(p)
    meta = fmt.read_meta(p)
    cfg = fmt.model_config_from_meta(meta)
    tensors = fmt.tensor_metadata(p)
    fmt.check_model_tensors(p, cfg, tensors)
    names = names or fmt.model_keys(cfg)
    wanted = {fmt.MODEL_PREFIX + n: torch.empty(tensors[fmt.MODEL_PREFIX + n][0],
                                                dtype=tensors[fmt.MODEL_PREFIX + n][1]) for n in names}
    fmt.read_tensors(p, wanted)
    return cfg, {n: wanted[fmt.MODEL_PREFIX + n] for n in names}


def load_model(path, dtype=None, device=None):
    """A single-device Llama (eval mode) with the weights of `path` (a LoRA checkpoint: its base + adapters merged)."""
    from ..models import Llama

    if is_adapter_checkpoint(path):
        from .lora import load_lora_model

        return load_lora_model(path, dtype=dtype, device=device)
    cfg, state = read_model_state(path)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device or "cpu")
    if cfg.tie_embeddings and model.lm_head is not None:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty() unties shared parameters
    model = model.to(dtype or torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state.pop(name))
    return model.eval()


def is_adapter_checkpoint(path) -> bool:
    """True for the checkpoint of a train.trainable=lora run (adapters only, base recorded in meta.json)."""
    kind, p = resolve_source(path)
    return kind == "ours" and bool(fmt.read_meta(p).get("adapters_only"))


def model_config_of(path):
    """The LlamaConfig of one of our checkpoints (or run dir) or an HF directory, without reading tensors."""
    kind, p = resolve_source(path)
    if kind == "hf":
        from .hf import HFReader

        reader = HFReader(p)
        try:
            return reader.config
        finally:
            reader.close()
    return fmt.model_config_from_meta(fmt.read_meta(p))


def load_parallel_model(path, mesh, cfg=None, **model_overrides):
    """(Config, model chunks) of checkpoint `path` on `mesh`'s (tp, pp) layout, in eval mode.

    For forward-only work on the training engine (evaluation, generation, frozen PPO roles):

        mesh = ParallelMesh.create(tp, pp, device)
        cfg, chunks = load_parallel_model("runs/sft", mesh)
        results = forward_backward(chunks, microbatches, loss_fn, mesh, forward_only=True)

    `cfg` (a Config) supplies kernels/recompute/seed choices; its model section is replaced by the
    checkpoint's shape (plus `model_overrides`) and its parallel sizes by the mesh's.
    """
    import copy
    import dataclasses

    from ..config import Config
    from ..parallel.parallelize import build_model
    from .manager import CheckpointManager

    cfg = copy.deepcopy(cfg) if cfg is not None else Config()
    cfg.model = dataclasses.replace(model_config_of(path), **model_overrides)
    cfg.parallel.tp, cfg.parallel.pp = mesh.tp, mesh.pp
    if mesh.pp == 1:
        cfg.parallel.virtual_stages = 1
    if is_adapter_checkpoint(path):  # LoRA: build the adapters; loading puts the recorded base under them
        from ..config import LoRAConfig

        meta = fmt.read_meta(fmt.resolve_checkpoint(path))
        cfg.train.trainable, cfg.lora = "lora", LoRAConfig(**meta["lora"])
        cfg.train.seed = int(meta.get("lora_base_seed", cfg.train.seed))
    chunks = build_model(cfg, mesh)
    CheckpointManager(cfg, mesh).load_weights(path, chunks, None)
    for chunk in chunks:
        chunk.train(False)
    return cfg, chunks
