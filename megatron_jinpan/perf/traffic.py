"""Memory traffic of a forward + backward, op by op, counted at the dispatch level.

    from megatron_jinpan.perf.traffic import TrafficLedger, ideal_layer_traffic
    with TrafficLedger(batch=2, seq=64) as ledger:
        out = layer(x, cos, sin)
        out.backward(grad)
    ledger.totals()        # launches, bytes read/written, activation bytes
    ledger.casts()         # dtype-changing copies of activation-size tensors (should be none)

Every aten op and every custom op (our Triton kernels are `jinpan::<op>`) that reaches the
dispatcher while the ledger is open is one launch; its bytes read are its tensor inputs and
its bytes written its tensor outputs (a broadcast input counts its distinct elements once).
View and allocation ops move nothing and are not launches. A custom op counts as one launch
even when its launcher runs a second small kernel (RMSNorm's dW reduction).

A tensor is an *activation* when one of its leading dims is the token count: [batch, seq, ...],
[batch * seq, ...] or [batch, heads, seq] (the attention log-sum-exp); everything else (weights,
their autocast copies and gradients, cos/sin are [batch, seq, head_dim] so they do count) is
*other*. Pick batch/seq so that no weight dimension equals them.

`ideal_layer_traffic` is the yardstick: a decoder layer in which every activation is written
once and read once per consumer, in its compute dtype (see its docstring).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that move no data (metadata, aliasing, allocation): not launches.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
         "alias", "view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze",
         "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "as_strided",
         "_reshape_alias", "view_as", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_local_scalar_dense",
         "set_", "resize_", "promote_types", "result_type"}
CAST_OPS = {"_to_copy", "copy_", "to", "_to_copy_out"}


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (an expanded dim counts once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclass
class OpRow:
    op: str
    launches: int = 0
    read: int = 0
    written: int = 0
    act_read: int = 0
    act_written: int = 0


@dataclass
class Cast:
    op: str
    shape: tuple
    src: torch.dtype
    dst: torch.dtype


class TrafficLedger(TorchDispatchMode):
    def __init__(self, batch: int, seq: int):
        super().__init__()
        self.batch, self.seq = batch, seq
        self.rows: dict[str, OpRow] = {}
        self.cast_list: list[Cast] = []

    # ---------------------------------------------------------------- classification
    def is_activation(self, t: torch.Tensor) -> bool:
        b, s, shape = self.batch, self.seq, tuple(t.shape)
        if len(shape) >= 1 and shape[0] == b * s and b * s > 1:
            return True
        if len(shape) >= 2 and shape[:2] == (b, s):
            return True
        return len(shape) >= 3 and shape[0] == b and shape[2] == s

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0] if func.namespace == "aten" else f"{func.namespace}::{func.__name__}"
        base = name.split("::")[-1].split(".")[0]
        if func.namespace in ("aten", "prim") and (base in _FREE or getattr(func, "is_view", False)):
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if base in ("copy_",) and len(inputs) >= 2:  # dst.copy_(src): read src, write dst
            inputs, outputs = inputs[1:], inputs[:1]
        row = self.rows.setdefault(name, OpRow(name))
        row.launches += 1
        for t in inputs:
            nbytes = distinct_bytes(t)
            row.read += nbytes
            row.act_read += nbytes if self.is_activation(t) else 0
        for t in outputs:
            nbytes = distinct_bytes(t)
            row.written += nbytes
            row.act_written += nbytes if self.is_activation(t) else 0
        if func.namespace == "aten" and base in CAST_OPS and inputs and outputs:
            src, dst = inputs[0], outputs[0]
            if src.dtype != dst.dtype and src.is_floating_point() and self.is_activation(dst):
                self.cast_list.append(Cast(name, tuple(dst.shape), src.dtype, dst.dtype))
        return out

    # ---------------------------------------------------------------- results
    def table(self) -> list[OpRow]:
        return sorted(self.rows.values(), key=lambda r: -(r.read + r.written))

    def totals(self) -> OpRow:
        total = OpRow("total")
        for r in self.rows.values():
            total.launches += r.launches
            total.read += r.read
            total.written += r.written
            total.act_read += r.act_read
            total.act_written += r.act_written
        return total

    def casts(self, between=(torch.float32, torch.bfloat16, torch.float16)) -> list[Cast]:
        """Dtype-changing copies of activation-size tensors between the given dtypes."""
        return [c for c in self.cast_list if c.src in between and c.dst in between]


# ---------------------------------------------------------------- the ideal
def ideal_layer_traffic(hidden: int, intermediate: int, q_dim: int, kv_dim: int, heads: int, tokens: int,
                        stream_bytes: int = 4, compute_bytes: int = 2) -> dict[str, int]:
    """Activation bytes of one LLaMA decoder layer, forward + backward, with every activation
    written once and read once per consumer in its compute dtype (the residual stream in its own).

    The layer as fused kernels that keep today's algorithm: [norm] -> [q|k|v GEMM] -> [rotary] ->
    [attention] -> [o GEMM] -> [residual add + norm] -> [gate|up GEMM] -> [SwiGLU] -> [down GEMM]
    -> [residual add]; the backward reads what each step saved, a GEMM's backward reads its output
    gradient twice (dgrad and wgrad) and its input once (wgrad). Weights are not counted here.
    Returns {"forward": bytes, "backward": bytes, "total": bytes}.
    """
    T, H, I, Q, KV = tokens, hidden, intermediate, q_dim, kv_dim
    S, C, F32 = stream_bytes, compute_bytes, 4
    lse = heads * F32  # per token
    forward = T * (
        S * H + C * H                     # norm: read x, write n1
        + C * H + C * (Q + 2 * KV)        # qkv GEMM: read n1, write q|k|v
        + C * (Q + KV) * 2                # rotary: read q,k, write q',k'
        + C * (Q + 2 * KV) + C * Q + lse  # attention: read q',k',v, write o, lse
        + C * Q + C * H                   # o GEMM: read o, write a
        + C * H + S * H + S * H + C * H   # add + norm: read a, x, write h, n2
        + C * H + C * 2 * I               # gate|up GEMM: read n2, write g|u
        + C * 2 * I + C * I               # SwiGLU: read g|u, write m
        + C * I + C * H                   # down GEMM: read m, write d
        + S * H + C * H + S * H           # add: read h, d, write y
    )
    backward = T * (
        S * H + C * H                             # dy (stream) -> dd (compute)
        + 2 * C * H + C * I + C * I               # down: read dd twice, m; write dm
        + C * I + C * 2 * I + C * 2 * I           # SwiGLU: read dm, g|u; write dg|du
        + 2 * C * 2 * I + C * H + C * H           # gate|up: read dg|du twice, n2; write dn2
        + C * H + S * H + S * H + S * H + C * H   # add + norm: read dn2, h, dy; write dx_res (stream), da
        + 2 * C * H + C * Q + C * Q               # o GEMM: read da twice, o; write do
        + C * Q + C * Q + lse + C * (Q + 2 * KV) + C * (Q + 2 * KV)  # attention: do, o, lse, q',k',v -> dq',dk',dv
        + C * (Q + KV) * 2                        # rotary: read dq',dk', write dq,dk
        + 2 * C * (Q + 2 * KV) + C * H + C * H    # qkv: read dq|dk|dv twice, n1; write dn1
        + C * H + S * H + S * H + S * H           # norm: read dn1, x, dx_res; write dx
    )
    return {"forward": forward, "backward": backward, "total": forward + backward}
