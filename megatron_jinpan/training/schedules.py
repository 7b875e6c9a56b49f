"""The one `forward_backward` every training loop calls (DESIGN rule 4).

    metrics = forward_backward(model_chunks, microbatches, loss_fn, mesh,
                               schedule=cfg.parallel.pp_schedule, loss_scale=1/global_tokens)

- `model_chunks`: this rank's chunks (one per virtual stage), as built by
  `parallel.build_model`; each is called as chunk(x, position_ids=, cu_seqlens=).
- `microbatches`: list of dicts (tokens, labels, loss_mask, position_ids,
  optional cu_seqlens, and anything a loss needs).
- `loss_fn(output, microbatch) -> (loss, metrics)`: `loss` is a scalar whose
  gradient is taken after multiplying by `loss_scale`; `metrics` a dict of
  floats/0-d tensors reported back.
- returns the list of per-micro-batch metrics on the last pipeline stage
  (each with "loss" added), an empty list elsewhere.
- `forward_only=True` runs evaluation (no graph, no backward).
Gradient reduction of data parallelism is deferred to the last micro-batch
through each chunk's `no_sync()`.
"""
from __future__ import annotations

import contextlib

import torch


def _model_inputs(mb: dict) -> dict:
    return {"position_ids": mb.get("position_ids"), "cu_seqlens": mb.get("cu_seqlens")}


def _detach_metrics(loss: torch.Tensor, metrics: dict) -> dict:
    out = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    out["loss"] = loss.detach()
    return out


def forward_backward_no_pipelining(model_chunks, microbatches, loss_fn, mesh, *, forward_only=False,
                                   loss_scale: float = 1.0, autocast=None) -> list[dict]:
    (model,) = model_chunks
    autocast = autocast or contextlib.nullcontext
    results = []
    n = len(microbatches)
    for i, mb in enumerate(microbatches):
        last = i == n - 1
        sync = contextlib.nullcontext() if (last or forward_only) else getattr(model, "no_sync", contextlib.nullcontext)()
        with sync, torch.set_grad_enabled(not forward_only):
            with autocast():
                output = model(mb["tokens"], **_model_inputs(mb))
                loss, metrics = loss_fn(output, mb)
            if not forward_only:
                (loss * loss_scale).backward()
        results.append(_detach_metrics(loss, metrics))
    return results


def forward_backward(model_chunks, microbatches, loss_fn, mesh, *, schedule: str = "1f1b", forward_only=False,
                     loss_scale: float = 1.0, autocast=None) -> list[dict]:
    microbatches = list(microbatches)
    if mesh.pp == 1 and len(model_chunks) == 1:
        return forward_backward_no_pipelining(model_chunks, microbatches, loss_fn, mesh, forward_only=forward_only,
                                              loss_scale=loss_scale, autocast=autocast)
    raise NotImplementedError("pipeline schedules are not implemented yet")
