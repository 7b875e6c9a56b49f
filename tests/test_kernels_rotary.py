"""Triton rotary embedding vs the PyTorch reference (CPU interpreter in fp32/fp16; GPU in bf16)."""
import pytest
import torch

pytest.importorskip("triton")

from megatron_jinpan.device import default_device_type  # noqa: E402
from megatron_jinpan.kernels import rotary as K  # noqa: E402
from megatron_jinpan.models.ops import apply_rotary_reference, rotary_cos_sin  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def _check(b, s, hq, hk, d, dtype, device="cpu", position_ids=None):
    g = torch.Generator().manual_seed(0)
    if position_ids is None:
        position_ids = torch.arange(s).expand(b, -1)
    cos, sin = rotary_cos_sin(position_ids.to(device), d, 10000.0, dtype)
    q = torch.randn(b, s, hq, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(b, s, hk, d, generator=g).to(device, dtype).requires_grad_()
    q2, k2 = (t.detach().clone().requires_grad_() for t in (q, k))
    qo, ko = K.apply_rotary(q, k, cos, sin)
    qr, kr = apply_rotary_reference(q2, k2, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward([qo, ko], [gq, gk])
    torch.autograd.backward([qr, kr], [gq, gk])
    tol = TOL[dtype]
    for got, want in ((qo, qr), (ko, kr), (q.grad, q2.grad), (k.grad, k2.grad)):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,s,hq,hk,d", [(1, 1, 4, 4, 64), (2, 17, 8, 1, 128), (1, 129, 4, 1, 64),
                                         (1, 17, 8, 2, 96), (2, 5, 3, 3, 16)])
def test_rotary_matches_reference(b, s, hq, hk, d, dtype):
    _check(b, s, hq, hk, d, dtype)


def test_rotary_packed_positions_restart():
    # two documents per row whose positions restart: the kernel just follows the cos/sin tables
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    _check(2, 9, 4, 2, 64, torch.float32, position_ids=pos)


def test_rotary_inplace_and_broadcast_tables():
    torch.manual_seed(0)
    q, k = torch.randn(3, 7, 4, 32), torch.randn(3, 7, 2, 32)
    cos, sin = rotary_cos_sin(torch.arange(7)[None], 32, 10000.0, torch.float32)  # batch 1 tables
    qr, kr = apply_rotary_reference(q, k, cos, sin)
    qo, ko = K.apply_rotary(q, k, cos, sin, inplace=True)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, qr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, kr, atol=1e-6, rtol=1e-6)
    # in place with autograd: on a non-leaf
    a = torch.randn(1, 5, 2, 16, requires_grad=True)
    qq, kk = a * 1.0, a[:, :, :1] * 1.0
    c, s_ = rotary_cos_sin(torch.arange(5)[None], 16, 10000.0, torch.float32)
    qo, ko = K.Rotary(inplace=True)(qq, kk, c, s_)
    (qo.sum() + ko.sum()).backward()
    a2 = a.detach().clone().requires_grad_()
    qr, kr = apply_rotary_reference(a2, a2[:, :, :1], c, s_)
    (qr.sum() + kr.sum()).backward()
    torch.testing.assert_close(a.grad, a2.grad, atol=1e-6, rtol=1e-6)


def test_rotary_rejects_bad_shapes():
    cos, sin = rotary_cos_sin(torch.arange(4)[None], 16, 10000.0, torch.float32)
    with pytest.raises(ValueError, match="cos"):
        K.apply_rotary(torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16), cos, sin)
    with pytest.raises(ValueError, match="k shape"):
        K.apply_rotary(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 8), cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("b,s,hq,hk,d", [(2, 4096, 32, 32, 128), (1, 129, 32, 8, 128), (3, 17, 8, 1, 64)])
def test_rotary_gpu_bf16(b, s, hq, hk, d):
    _check(b, s, hq, hk, d, torch.bfloat16, default_device_type())
