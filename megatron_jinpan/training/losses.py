"""Loss functions for `forward_backward`: (output, microbatch) -> (loss, metrics).

The returned loss is a *sum* over tokens; the schedule scales it by
1/(tokens in the global batch), so the gradient is the global per-token mean
whatever the (tp, pp, dp) layout or micro-batch split.
"""
from __future__ import annotations

import functools

from ..parallel.tensor import vocab_parallel_cross_entropy


def _lm_loss(output, mb, *, vocab_size: int, mesh):
    losses = vocab_parallel_cross_entropy(output, mb["labels"], vocab_size, mesh)
    mask = mb["loss_mask"].to(losses.dtype)
    loss_sum = (losses * mask).sum()
    return loss_sum, {"tokens": mask.sum()}


def language_model_loss(vocab_size: int, mesh):
    return functools.partial(_lm_loss, vocab_size=vocab_size, mesh=mesh)
