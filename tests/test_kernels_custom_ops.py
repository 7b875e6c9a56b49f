"""The Triton kernels as torch.library custom ops (`jinpan::*`): schema/fake/autograd checks,
a TorchDispatchMode sees them by name, and torch.compile(fullgraph=True) traces through them.

    python -m pytest -q tests/test_kernels_custom_ops.py
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_jinpan.kernels import flash_attention as FA  # noqa: E402
from megatron_jinpan.kernels import rmsnorm as RN  # noqa: E402
from megatron_jinpan.kernels import rotary as RO  # noqa: E402
from megatron_jinpan.kernels import swiglu as SW  # noqa: E402
from megatron_jinpan.models import ops


def _inputs(seed=0, b=2, s=16, hq=4, hk=2, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, hq * d, generator=g)
    w = torch.rand(hq * d, generator=g) + 0.5
    q = torch.randn(b, s, hq, d, generator=g)
    k = torch.randn(b, s, hk, d, generator=g)
    v = torch.randn(b, s, hk, d, generator=g)
    cos, sin = ops.rotary_cos_sin(torch.arange(s).expand(b, s), d, 10000.0, torch.float32)
    return x, w, q, k, v, cos, sin


def _block(x, w, q, k, v, cos, sin, cu=None):
    """A miniature transformer block on all four kernels."""
    h = RN.rms_norm(x, w, 1e-6)
    h2, res = RN.rms_norm(h, w, 1e-6, residual=x)
    qr, kr = RO.apply_rotary(q, k, cos, sin)
    o = FA.flash_attention(qr, kr, v, cu_seqlens=cu)
    act = SW.swiglu(h2, res)
    return o.float().square().mean() + act.square().mean() + h.sum() * 1e-3


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("name, args", [
    ("rms_norm", lambda x, w, *_: (x, w, 1e-6, None)),
    ("rms_norm_residual", lambda x, w, *_: (x, w, 1e-6, x.detach().clone().requires_grad_(True))),
    ("rotary", lambda x, w, q, k, v, cos, sin: (q, k, cos, sin)),
    ("swiglu", lambda x, *_: (x, x.detach().clone().requires_grad_(True))),
    ("flash_attention", lambda x, w, q, k, v, *_: (q, k, v, 0.25, None, None)),
    ("flash_attention_docs", lambda x, w, q, k, v, *_: (q, k, v, 0.25, *ops.document_bounds(
        torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32), q.shape[0], q.shape[1]))),
    ("rms_norm_autocast_dtype", lambda x, w, *_: (x, w, 1e-6, x.detach().clone().bfloat16(), torch.bfloat16)),
])
def test_opcheck(name, args):
    """Schema, fake (meta) impl, autograd registration and dispatch are consistent (torch.library.opcheck)."""
    op = {"rms_norm": torch.ops.jinpan.rms_norm, "rms_norm_residual": torch.ops.jinpan.rms_norm,
          "rotary": torch.ops.jinpan.rotary, "swiglu": torch.ops.jinpan.swiglu,
          "flash_attention": torch.ops.jinpan.flash_attention,
          "flash_attention_docs": torch.ops.jinpan.flash_attention,
          "rms_norm_autocast_dtype": torch.ops.jinpan.rms_norm}[name]
    torch.library.opcheck(op, args(*_leaves(*_inputs())))


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_dispatch_mode_sees_jinpan_ops_forward_and_backward():
    leaves = _leaves(*_inputs())
    with _Names() as mode:
        _block(*leaves).backward()
    seen = {n for n in mode.names if n.startswith("jinpan::")}
    assert seen == {f"jinpan::{op}{suffix}" for op in ("rms_norm", "rotary", "swiglu", "flash_attention")
                    for suffix in ("", "_backward")}
    assert mode.names.count("jinpan::rms_norm") == 2


@pytest.mark.parametrize("docs", [False, True])
def test_compile_fullgraph_matches_eager(docs):
    """fullgraph=True fails on any graph break; the values and grads equal eager's."""
    cu = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32) if docs else None
    base = _inputs(1)
    eager = _leaves(*base)
    loss = _block(*eager, cu=cu)
    loss.backward()
    torch._dynamo.reset()
    compiled_fn = torch.compile(_block, fullgraph=True, backend="aot_eager")
    comp = _leaves(*base)
    closs = compiled_fn(*comp, cu=cu)
    closs.backward()
    torch.testing.assert_close(closs, loss)
    for a, b in zip(eager, comp):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(b.grad, a.grad)


def test_inplace_rotary_still_works_eagerly():
    _, _, q, k, _, cos, sin = _inputs(2)
    ref_q, ref_k = ops.apply_rotary_reference(q, k, cos, sin)
    qo, ko = RO.apply_rotary(q.clone(), k.clone(), cos, sin, inplace=True)
    torch.testing.assert_close(qo, ref_q)
    torch.testing.assert_close(ko, ref_k)
