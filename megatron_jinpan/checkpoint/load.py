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
    """A single-device Llama (eval mode) with the weights of `path`."""
    from ..models import Llama

    cfg, state = read_model_state(path)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device or "cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty() unties shared parameters
    model = model.to(dtype or torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state.pop(name))
    return model.eval()
