"""Tensor parallelism (placeholder for tp=1: vocab padding and the loss).

`apply_tensor_parallel(chunk, mesh, pcfg)` swaps modules of a (meta) Llama
chunk for their parallel versions and records `chunk.param_specs`.
`vocab_parallel_cross_entropy` computes per-token losses without gathering
the vocab dimension.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parallelize import ParamSpec


def apply_tensor_parallel(chunk, mesh, pcfg) -> None:
    if mesh.tp != 1:
        raise NotImplementedError("tensor parallelism is not implemented yet")
    cfg = chunk.cfg
    padded = cfg.padded_vocab_size(mesh.tp)
    specs = {}
    if chunk.embed_tokens is not None:
        chunk.embed_tokens = nn.Embedding(padded, cfg.hidden_size, device="meta")
        specs["embed_tokens.weight"] = ParamSpec("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size),
                                                 pad_dim=0, padded_size=padded)
    if chunk.lm_head is not None:
        if cfg.tie_embeddings and chunk.embed_tokens is not None:
            chunk.lm_head = nn.Linear(cfg.hidden_size, padded, bias=False, device="meta")
            chunk.lm_head.weight = chunk.embed_tokens.weight
        else:
            chunk.lm_head = nn.Linear(cfg.hidden_size, padded, bias=False, device="meta")
            specs["lm_head.weight"] = ParamSpec("lm_head.weight", (cfg.vocab_size, cfg.hidden_size),
                                                pad_dim=0, padded_size=padded)
    chunk.param_specs = specs


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, mesh) -> torch.Tensor:
    """Per-token cross-entropy [b, s]; columns >= vocab_size (padding) are ignored."""
    logits = logits[..., :vocab_size].float()
    return F.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), reduction="none").view(labels.shape)
