"""Triton RMSNorm vs the PyTorch reference (CPU interpreter in fp32/fp16; GPU in bf16)."""
import pytest
import torch

pytest.importorskip("triton")

from megatron_jinpan.device import default_device_type  # noqa: E402
from megatron_jinpan.kernels import rmsnorm as K  # noqa: E402
from megatron_jinpan.models.ops import rms_norm_reference  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}


def _inputs(shape, dtype, device="cpu", residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(device, dtype).requires_grad_() if residual else None
    return x, w, r


def _clone(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def _check(shape, dtype, device="cpu", residual=False):
    x, w, r = _inputs(shape, dtype, device, residual)
    x2, w2, r2 = _clone(x, w, r)
    tol = TOL[dtype]
    if residual:
        y, s = K.rms_norm(x, w, 1e-6, residual=r)
        s_ref = x2 + r2
        y_ref = rms_norm_reference(s_ref, w2, 1e-6)
        torch.testing.assert_close(s, s_ref, **tol)
        gy, gs = torch.randn_like(y), torch.randn_like(s)
        torch.autograd.backward([y, s], [gy, gs])
        torch.autograd.backward([y_ref, s_ref], [gy, gs])
        torch.testing.assert_close(r.grad, r2.grad, **tol)
    else:
        y = K.rms_norm(x, w, 1e-6)
        y_ref = rms_norm_reference(x2, w2, 1e-6)
        gy = torch.randn_like(y)
        y.backward(gy)
        y_ref.backward(gy)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    # dW sums over all rows: scale the tolerance with the row count
    rows = x.numel() // shape[-1]
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), atol=tol["atol"] * max(1, rows ** 0.5) * 2,
                               rtol=tol["rtol"] * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (17, 96), (1, 129, 96), (3, 4095), (2, 2, 64)])
def test_rmsnorm_matches_reference(shape, dtype):
    _check(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 3, 4095)])
def test_rmsnorm_fused_residual(shape, dtype):
    _check(shape, dtype, residual=True)


def test_rmsnorm_mixed_dtype_promotes_like_reference():
    x = torch.randn(5, 96, dtype=torch.float16)
    w = torch.rand(96) + 0.5
    y = K.rms_norm(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_rmsnorm_dw_is_deterministic():
    x, w, _ = _inputs((37, 200), torch.float32)
    grads = []
    for _ in range(2):
        w.grad = None
        K.rms_norm(x, w, 1e-6).pow(2).sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_rmsnorm_module_and_non_contiguous_input():
    m = K.RMSNorm(96, eps=1e-5)
    x = torch.randn(96, 6).t()  # stride(-1) != 1
    torch.testing.assert_close(m(x), rms_norm_reference(x, m.weight, 1e-5), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="weight shape"):
        K.rms_norm(torch.randn(2, 8), torch.ones(9))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 129, 4096), (8192, 4096), (3, 17, 5120), (2, 4095)])
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_gpu_bf16(shape, residual):
    _check(shape, torch.bfloat16, default_device_type(), residual)
