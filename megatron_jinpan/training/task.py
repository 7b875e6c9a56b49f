"""What a training loop needs beyond the engine: data, a loss, and how to report it.

Pretraining, SFT, reward modelling and DPO all run the same loop
(`training.loop.train(cfg, mesh, task)`); each brings a `Task`:

    task = Task(name="sft", train_data=..., eval_sets={...}, loss_fn=...)

- `train_data.microbatches(step, dp_rank, dp)` and each eval set's
  `.microbatches(i, dp_rank, dp)` give this DP rank's micro-batch dicts.
- `loss_fn(output, mb) -> (loss_sum, metric_sums)`: the loss is a SUM over the
  micro-batch's units (loss tokens for language modelling, pairs for a reward
  model); metric_sums are sums too, so they add up over micro-batches and DP.
- `denominator(mb)`: the micro-batch's number of units (default: loss tokens,
  `loss_mask.sum()`); the loop scales the loss by 1/(units in the global batch),
  so the gradient is the global mean whatever the (tp, pp, dp) layout.
- `summarize(sums, units, for_eval)`: step metrics from the global sums (the
  loop adds `eval_` prefixes and per-set suffixes for held-out sets).
- `prepare(microbatches, step)`: a hook to add tensors a loss needs before
  `forward_backward` runs (e.g. reference-model log-probs for DPO).
- `build_model(cfg, mesh)`: this rank's model chunks (default
  `parallel.build_model`; a reward model builds with a value head).
- `extra_eval(chunks, mesh)`: more held-out metrics at eval time (e.g. greedy
  generation accuracy during SFT), returned as a dict of `eval_*` keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch


def loss_token_count(mb: dict) -> torch.Tensor:
    return mb["loss_mask"].sum()


def language_model_summary(sums: dict, units: float, for_eval: bool) -> dict:
    loss = sums["loss"] / max(units, 1.0)
    if for_eval:
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    return {"loss": loss}


@dataclass
class Task:
    name: str
    train_data: object
    loss_fn: Callable
    eval_sets: dict = field(default_factory=dict)
    denominator: Callable = loss_token_count
    summarize: Callable = language_model_summary
    prepare: Callable | None = None
    build_model: Callable | None = None
    extra_eval: Callable | None = None
    # Tokens processed per optimizer step (throughput/MFU); None = global_batch * seq_len.
    tokens_per_step: int | None = None


def language_model_task(cfg, mesh, name: str = "pretrain") -> Task:
    """Next-token prediction on `data.blend` (loss on tokens whose `loss_mask` is 1)."""
    from ..data import build_eval_data, build_train_data
    from .losses import language_model_loss

    eval_sets = build_eval_data(cfg) if cfg.train.eval_interval > 0 else {}
    extra_eval = None
    if cfg.train.eval_tasks and cfg.train.eval_interval > 0:  # exams/classification: eval_acc_<name>
        from ..eval.during_training import training_eval_hook

        extra_eval = training_eval_hook(cfg)
    return Task(name=name, train_data=build_train_data(cfg), eval_sets=eval_sets,
                loss_fn=language_model_loss(cfg.model.vocab_size, mesh), extra_eval=extra_eval)
