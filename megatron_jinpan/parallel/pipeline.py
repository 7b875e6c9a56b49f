"""Pipeline parallelism: split the (meta) single-device Llama into this rank's stages.

    chunks = split_into_stages(full, mesh, cfg.parallel)

The model is cut into `pp * virtual_stages` global stages of consecutive
layers. With the interleaved schedule (virtual pipeline, Megatron's
assignment) virtual chunk `v` on pipeline rank `r` holds global stage
`v * pp + r`; without it (`virtual_stages == 1`) rank `r` holds stage `r`.

Each chunk is a `Llama` (the same class, so recompute, kernels and tensor
parallelism apply unchanged) whose `layers` ModuleDict keeps only its layers
under their GLOBAL index keys, so parameter names stay global
(`layers.5.mlp.up_proj.weight`): checkpoints and the layout-independent init
see the same names whatever the layout. `embed_tokens` lives only on the
very first global stage, `norm` and `lm_head` only on the very last; the
others are None. With `tie_embeddings` and pp > 1 the last stage keeps its
own `lm_head` (materialised from the embedding's init) and
`finalize_model_grads` all-reduces the two gradients over
`mesh.embedding_group`.

Everything happens on the meta device and without copies: each chunk is a
small meta shell whose parts are *moved* from the full meta model.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..models import Llama


def stage_layer_counts(num_layers: int, num_stages: int, pp_layers=None) -> list[int]:
    """Layers per global stage: `pp_layers` when given (uneven split), else an even split."""
    if pp_layers is not None:
        counts = [int(n) for n in pp_layers]
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"parallel.pp_layers={list(pp_layers)} must list {num_stages} positive layer counts "
                             f"summing to model.num_layers={num_layers}")
        return counts
    if num_layers % num_stages:
        raise ValueError(f"model.num_layers={num_layers} is not divisible by pp*virtual_stages={num_stages}; "
                         f"give parallel.pp_layers for an uneven split")
    return [num_layers // num_stages] * num_stages


def stage_layer_ranges(num_layers: int, num_stages: int, pp_layers=None) -> list[range]:
    """Global layer indices of each global stage."""
    ranges, start = [], 0
    for count in stage_layer_counts(num_layers, num_stages, pp_layers):
        ranges.append(range(start, start + count))
        start += count
    return ranges


def global_stage(virtual_rank: int, pp_rank: int, pp: int) -> int:
    """Global stage held by virtual chunk `virtual_rank` of pipeline rank `pp_rank`."""
    return virtual_rank * pp + pp_rank


def _shell(cfg) -> Llama:
    """An almost empty Llama on meta (one layer, dropped right away) carrying the full config."""
    with torch.device("meta"):
        shell = Llama(dataclasses.replace(cfg, num_layers=1))
    shell.cfg = cfg  # init std, rotary, etc. must see the full model's config
    shell.layers = nn.ModuleDict()
    return shell


def make_stage(full: Llama, stage: int, num_stages: int, layers: range) -> Llama:
    """Global stage `stage` of `full` as a Llama chunk (modules moved, not copied)."""
    chunk = _shell(full.cfg)
    chunk.layers = nn.ModuleDict({str(i): full.layers[str(i)] for i in layers})
    first, last = stage == 0, stage == num_stages - 1
    chunk.embed_tokens = full.embed_tokens if first else None
    chunk.norm = full.norm if last else None
    chunk.score = full.score if last else None  # a value head lives with the final norm
    if last and not first and full.cfg.tie_embeddings and full.lm_head is not None:
        # The head's weight is tied to an embedding that lives on another rank:
        # give the last stage its own parameter (initialised like the embedding).
        with torch.device("meta"):
            chunk.lm_head = nn.Linear(full.cfg.hidden_size, full.cfg.vocab_size, bias=False)
    else:
        chunk.lm_head = full.lm_head if last else None
    chunk.recompute_layers = full.recompute_layers
    chunk.pipeline_stage = stage
    chunk.pipeline_num_stages = num_stages
    return chunk


def split_into_stages(full, mesh, pcfg) -> list:
    """This rank's model chunks, in virtual-stage order (a list of one chunk without interleaving).

    With pp == 1 the whole model is one chunk (virtual stages are meaningless there).
    """
    pp = mesh.pp
    if pp == 1:
        full.pipeline_stage, full.pipeline_num_stages = 0, 1
        return [full]
    vs = max(1, int(getattr(pcfg, "virtual_stages", 1) or 1))
    num_stages = pp * vs
    ranges = stage_layer_ranges(full.cfg.num_layers, num_stages, getattr(pcfg, "pp_layers", None))
    chunks = []
    for v in range(vs):
        stage = global_stage(v, mesh.pp_rank, pp)
        chunks.append(make_stage(full, stage, num_stages, ranges[stage]))
    return chunks
