"""Optimizer (placeholder: plain AdamW on every rank, global-norm clipping)."""
from __future__ import annotations

import math

import torch

from . import comm
from .data import finalize_model_grads
from .parallelize import param_specs, unwrap


def trainable_parameters(chunks, trainable: str) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for chunk in chunks:
        for name, param in unwrap(chunk).named_parameters():
            keep = trainable == "all" or name in ("embed_tokens.weight", "lm_head.weight")
            param.requires_grad_(keep)
            if keep:
                out.append((name, param))
    return out


class Optimizer:
    def __init__(self, chunks, cfg, mesh):
        self.chunks, self.cfg, self.mesh = chunks, cfg, mesh
        self.named = trainable_parameters(chunks, cfg.train.trainable)
        decay = [p for n, p in self.named if p.ndim >= 2]
        no_decay = [p for n, p in self.named if p.ndim < 2]
        o = cfg.optim
        self.inner = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def grad_norm(self) -> float:
        total = torch.zeros((), dtype=torch.float32, device=self.mesh.device)
        for chunk in self.chunks:
            module = unwrap(chunk)
            specs = param_specs(module)
            for name, param in module.named_parameters():
                if param.grad is None:
                    continue
                if specs[name].tp_dim is None and self.mesh.tp_rank != 0:
                    continue  # replicated across TP: count once
                total += param.grad.float().pow(2).sum()
        comm.all_reduce(total, self.mesh.model_group)
        return math.sqrt(float(total))

    def step(self, lr: float) -> dict:
        finalize_model_grads(self.chunks, self.mesh)
        norm = self.grad_norm()
        clip = self.cfg.optim.clip_grad
        if clip and clip > 0 and norm > clip:
            scale = clip / (norm + 1e-6)
            for _, p in self.named:
                if p.grad is not None:
                    p.grad.mul_(scale)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        return {"grad_norm": norm}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def build_optimizer(chunks, cfg, mesh) -> Optimizer:
    return Optimizer(chunks, cfg, mesh)
