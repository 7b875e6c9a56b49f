"""Triton SwiGLU vs F.silu(gate) * up (CPU interpreter in fp32/fp16; GPU in bf16)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from megatron_jinpan.device import default_device_type  # noqa: E402
from megatron_jinpan.kernels import swiglu as K  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def _check(shape, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    gate = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    gate2, up2 = (t.detach().clone().requires_grad_() for t in (gate, up))
    y = K.swiglu(gate, up)
    y_ref = F.silu(gate2) * up2
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    tol = TOL[dtype]
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gate.grad, gate2.grad, **tol)
    torch.testing.assert_close(up.grad, up2.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (1, 17, 160), (2, 129, 344), (3, 11008)])
def test_swiglu_matches_reference(shape, dtype):
    _check(shape, dtype)


def test_swiglu_module_and_errors():
    torch.manual_seed(0)
    m = K.SwiGLU(16, 40)
    x = torch.randn(2, 3, 16)
    ref = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(4, 5).t()  # non-contiguous
    torch.testing.assert_close(K.SwiGLU()(g, g), F.silu(g) * g, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        K.swiglu(torch.randn(2, 3), torch.randn(2, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 4096, 11008), (1, 17, 13824), (3, 1, 7)])
def test_swiglu_gpu_bf16(shape):
    _check(shape, torch.bfloat16, default_device_type())
