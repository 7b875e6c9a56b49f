"""Data parallelism (placeholder: reduce every gradient after backward)."""
from __future__ import annotations

import contextlib

import torch.nn as nn

from . import comm
from .parallelize import param_specs


class DataParallel(nn.Module):
    def __init__(self, module: nn.Module, mesh, cfg):
        super().__init__()
        self.module = module
        self.mesh = mesh

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield

    def finish_grad_sync(self) -> None:
        for param in self.module.parameters():
            if param.grad is not None:
                comm.all_reduce(param.grad, self.mesh.dp_group)

    def zero_grad_buffer(self) -> None:
        for param in self.module.parameters():
            param.grad = None


def wrap_data_parallel(chunks, mesh, cfg) -> list:
    return [DataParallel(chunk, mesh, cfg) for chunk in chunks]


def finalize_model_grads(chunks, mesh) -> None:
    """All reductions a step needs before the optimizer: DP, SP-replicated params over TP, tied embeddings."""
    for chunk in chunks:
        chunk.finish_grad_sync()
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        for name, spec in param_specs(module).items():
            param = module.get_parameter(name)
            if spec.sequence_parallel and param.grad is not None:
                comm.all_reduce(param.grad, mesh.tp_group)
