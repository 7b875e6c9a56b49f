"""The small types every parallel module shares: how a local parameter maps to the single-device
model's (`ParamSpec`, recorded per parameter by tensor.py in `chunk.param_specs`) and `unwrap`.

    from megatron_jinpan.parallel.specs import ParamSpec, param_specs, unwrap

They live here, below parallelize.py, tensor.py, data.py and optimizer.py, so those modules import
each other in one direction only (they used to import these from parallelize.py, which imports
them: a cycle). `from megatron_jinpan.parallel.parallelize import ParamSpec, unwrap` still works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ParamSpec:
    """How one local parameter relates to the single-device model's parameter."""

    name: str                      # global name in the single-device model
    full_shape: tuple              # unpadded global shape
    tp_dim: int | None = None      # dim split across tensor-parallel ranks (None: replicated)
    padded_size: int | None = None  # size of `pad_dim` after vocab padding (before the split)
    pad_dim: int | None = None
    # Replicated across TP but each rank sees only part of the sequence (SP):
    # its gradient is a partial sum that must be all-reduced over TP.
    sequence_parallel: bool = False
    # Replicated across TP, but each rank computes only part of its gradient (the replicated factor
    # of a LoRA adapter, parallel/lora.py): summed over TP like the SP norm weights.
    tp_partial_grad: bool = False

    def local_slice(self, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
        """This rank's piece of the full (unpadded) tensor: pad, then split."""
        if self.pad_dim is not None and self.padded_size and self.padded_size > full.shape[self.pad_dim]:
            pad_shape = list(full.shape)
            pad_shape[self.pad_dim] = self.padded_size - full.shape[self.pad_dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=self.pad_dim)
        if self.tp_dim is None or tp == 1:
            return full
        return full.chunk(tp, dim=self.tp_dim)[tp_rank]


def param_specs(chunk: nn.Module) -> dict[str, ParamSpec]:
    """chunk.param_specs, filled with replicated defaults for any parameter not listed."""
    specs = getattr(chunk, "param_specs", {})
    return {name: specs.get(name) or ParamSpec(name, tuple(p.shape)) for name, p in chunk.named_parameters()}


def unwrap(chunk: nn.Module) -> nn.Module:
    """The Llama chunk inside a data-parallel wrapper."""
    return getattr(chunk, "module", chunk)
