"""Turn the single-device `Llama` into this rank's model chunks.

    chunks = build_model(cfg, mesh)

1. build the full model on the meta device (no memory);
2. split its layers into pipeline stages / virtual stages (pipeline.py);
3. swap in tensor-parallel modules and pad the vocab (tensor.py), which
   records a `ParamSpec` per parameter in `chunk.param_specs`;
4. materialise: every rank generates each parameter's full, layout-
   independent initial value (seeded by name) and keeps its own slice, so
   all layouts start from identical weights;
5. kernels and activation recompute;
5b. with `train.trainable: lora`, wrap the target projections with LoRA adapters (lora.py);
5c. with `train.compile: blocks`, torch.compile each transformer block (compile.py);
6. wrap each chunk for data-parallel gradient reduction (data.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models import Llama, init_parameter
from ..models.ops import KernelChoice
from .data import wrap_data_parallel
from .pipeline import split_into_stages
from .specs import ParamSpec, param_specs, unwrap  # noqa: F401 - also imported from here by other modules
from .tensor import apply_tensor_parallel


@torch.no_grad()
def materialize(chunk: nn.Module, seed: int, mesh) -> nn.Module:
    """Allocate a meta chunk on mesh.device and fill it with its slice of the global init."""
    chunk.to_empty(device=mesh.device)
    cfg = chunk.cfg
    if cfg.tie_embeddings and chunk.embed_tokens is not None and chunk.lm_head is not None:
        chunk.lm_head.weight = chunk.embed_tokens.weight  # to_empty() unties shared parameters
    for name, param in chunk.named_parameters():
        spec = param_specs(chunk)[name]
        # A tied LM head (on the last stage) starts as a copy of the embedding.
        init_name = "embed_tokens.weight" if (cfg.tie_embeddings and spec.name == "lm_head.weight") else spec.name
        full = init_parameter(init_name, spec.full_shape, cfg, seed, device=mesh.device)
        param.copy_(spec.local_slice(full, mesh.tp_rank, mesh.tp))
    return chunk


def apply_recompute(chunk: Llama, mode: str) -> None:
    chunk.recompute_layers = mode == "full"
    for layer in chunk.layers.values():
        layer.self_attn.recompute_core = mode == "selective"


def build_model(cfg, mesh) -> list[nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), ready to train."""
    return wrap_data_parallel(build_chunks(cfg, mesh), mesh, cfg)


def build_chunks(cfg, mesh, *, frozen: bool = False) -> list[nn.Module]:
    """This rank's model chunks on the (tp, pp) layout, before data parallelism. `frozen`: forward-only (a
    reference or reward model): no recompute, adapters or compile, no gradients, eval mode."""
    with torch.device("meta"):
        full = Llama(cfg.model)
    kernels = KernelChoice(**vars(cfg.kernels)).resolved(mesh.device.type)
    chunks = []
    for chunk in split_into_stages(full, mesh, cfg.parallel):
        apply_tensor_parallel(chunk, mesh, cfg.parallel)
        materialize(chunk, cfg.train.seed, mesh)
        chunk.set_kernels(kernels)
        apply_recompute(chunk, "none" if frozen else cfg.train.recompute)
        if frozen:
            chunk.requires_grad_(False)
            chunk.train(False)
        else:
            if cfg.train.trainable == "lora":
                from .lora import apply_lora

                apply_lora(chunk, cfg.lora, cfg.train.seed, mesh)
            if cfg.train.compile == "blocks":
                from .compile import compile_blocks

                compile_blocks(chunk)
        chunks.append(chunk)
    return chunks


@torch.no_grad()
def gather_full_state_dict(chunks, mesh) -> dict[str, torch.Tensor]:
    """The single-device model's state dict (global names, unpadded, on CPU), on every rank.

    Gathers tensor-parallel shards and pipeline stages. Meant for small models
    (tests, conversion of a finished run), not for checkpointing a 13B model.
    """
    from . import comm

    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        module = unwrap(chunk)
        for name, spec in param_specs(module).items():
            if module.cfg.tie_embeddings and spec.name == "lm_head.weight":
                continue  # the tied head is the embedding
            tensor = module.get_parameter(name).detach()
            if spec.tp_dim is not None and mesh.tp > 1:
                moved = tensor.movedim(spec.tp_dim, 0).contiguous()
                out = moved.new_empty((moved.shape[0] * mesh.tp, *moved.shape[1:]))
                comm.all_gather_into_tensor(out, moved, mesh.tp_group)
                tensor = out.movedim(0, spec.tp_dim)
            if spec.pad_dim is not None:
                tensor = tensor.narrow(spec.pad_dim, 0, spec.full_shape[spec.pad_dim])
            local[spec.name] = tensor.float().cpu().clone()
    merged: dict[str, torch.Tensor] = {}
    for part in comm.all_gather_object(local, mesh.pp_group):
        merged.update(part)
    return merged
