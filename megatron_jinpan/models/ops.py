"""Backend switch for the model's fused-able ops (DESIGN rule 6).

Each op has a pure-PyTorch path here and an optional Triton path in
`megatron_jinpan.kernels.<op>`; attention also has SDPA and flash-attn.
Backends are named by the `kernels.*` config keys; "auto" means Triton on
CUDA and PyTorch/SDPA on CPU.

Tensor layout for attention is [batch, seq, heads, head_dim] (flash-attn's).
`cu_seqlens` (int32, over the flattened batch*seq tokens) marks packed
documents: attention never crosses a boundary. `PackedDocuments` turns it, once
per micro-batch, into what each attention backend needs; every layer shares it.

Under autocast (fp32 weights, bf16 compute: the real training setup) RMSNorm and
rotary write their outputs in the autocast dtype directly, on every backend: the
math stays fp32 and rounds once, so the result equals op-then-cast without a
separate cast of the activation (`compute_dtype`).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NORM_BACKENDS = ("auto", "torch", "triton")
ATTENTION_BACKENDS = ("auto", "eager", "sdpa", "triton", "flash_attn")


@dataclass
class KernelChoice:
    attention: str = "auto"
    norm: str = "auto"
    rope: str = "auto"
    swiglu: str = "auto"

    def resolved(self, device_type: str) -> "KernelChoice":
        """Replace 'auto' by the default for the device and check each choice is usable."""
        from ..device import is_accelerator

        fast = is_accelerator(device_type) and _triton_available()
        out = KernelChoice(
            attention=self.attention if self.attention != "auto" else ("triton" if fast else "sdpa"),
            norm=self.norm if self.norm != "auto" else ("triton" if fast else "torch"),
            rope=self.rope if self.rope != "auto" else ("triton" if fast else "torch"),
            swiglu=self.swiglu if self.swiglu != "auto" else ("triton" if fast else "torch"),
        )
        for key in ("norm", "rope", "swiglu"):
            value = getattr(out, key)
            if value not in NORM_BACKENDS:
                raise ValueError(f"kernels.{key}={value!r}; choose one of {', '.join(NORM_BACKENDS)}")
            if value == "triton" and not _triton_available():
                raise ValueError(f"kernels.{key}=triton but triton is not importable; pip install triton or set kernels.{key}=torch")
        if out.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"kernels.attention={out.attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        if out.attention == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("kernels.attention=flash_attn but the flash-attn package is not installed; "
                             "pip install 'megatron-jinpan[flash]' or set kernels.attention=triton|sdpa")
        if out.attention == "triton" and not _triton_available():
            raise ValueError("kernels.attention=triton but triton is not importable; set kernels.attention=sdpa")
        return out


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel(name: str):
    return importlib.import_module(f"megatron_jinpan.kernels.{name}")


# ---------------------------------------------------------------- RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def compute_dtype(x: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """Output dtype of a fused op: the autocast dtype when autocast is on, else the promoted input dtype."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    dtype = x.dtype
    for other in others:
        dtype = torch.promote_types(dtype, other.dtype)
    return dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch",
             residual: torch.Tensor | None = None):
    """RMSNorm of x, or with `residual`: (RMSNorm(x + residual), x + residual) -- the fused residual add.

    The sum keeps the promoted dtype of (x, residual) (the residual stream's); the normalised output
    is in `compute_dtype` (bf16 under bf16 autocast, no cast op).
    """
    if backend == "triton":
        return _kernel("rmsnorm").rms_norm(x, weight, eps, residual=residual)
    total = x if residual is None else x + residual
    if compute_dtype(total, weight) == torch.promote_types(total.dtype, weight.dtype):
        y = rms_norm_reference(total, weight, eps)
    else:
        y = _RMSNormTorch.apply(total, weight, eps)
    return y if residual is None else (y, total)


class _RMSNormTorch(torch.autograd.Function):
    """The PyTorch RMSNorm under autocast: fp32 math written straight into the autocast dtype.

    Same numerics as `rms_norm_reference(...).to(autocast dtype)` (one rounding of the fp32
    product), but the multiply writes the low-precision output itself (`out=`), and the backward
    reads the low-precision gradient in mixed-dtype ops: no cast kernel of a full activation.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x if x.dtype == torch.float32 else x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xf * rstd
        if x.dtype != torch.float32:
            xhat = xhat.to(x.dtype)  # rounded like HF before the weight
        y = torch.empty(x.shape, device=x.device, dtype=compute_dtype(x, weight))
        torch.mul(xhat, weight, out=y)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd  # fp32 (rstd is fp32)
        n = x.shape[-1]
        dw = (dy * xhat).reshape(-1, n).sum(0)
        g = dy * weight
        c = (g * xhat).mean(-1, keepdim=True)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        torch.mul(g - xhat * c, rstd, out=dx)
        return dx, dw.to(weight.dtype), None


# ---------------------------------------------------------------- rotary
def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [batch, seq, head_dim] for the given positions (HF convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(q, k, cos, sin):
    """q, k: [b, s, h, d]; cos, sin: [b, s, d]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rotary(q, k, cos, sin, backend: str = "torch"):
    """Rotated (q, k); in `compute_dtype` (bf16 under bf16 autocast even with fp32 cos/sin)."""
    if backend == "triton":
        return _kernel("rotary").apply_rotary(q, k, cos, sin)
    if compute_dtype(q, cos) == torch.promote_types(q.dtype, cos.dtype):
        return apply_rotary_reference(q, k, cos, sin)
    return _RotaryTorch.apply(q, k, cos, sin)


def _rotate_into(x, cos, sin, out, backward: bool):
    """out = x rotated (backward: by the transposed map), fp32 math, one rounding into out's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if backward:  # dx1 = g1*c1 + g2*s2; dx2 = g2*c2 - g1*s1
        torch.add(x1 * c1, x2 * s2, out=out[..., :half])
        torch.sub(x2 * c2, x1 * s1, out=out[..., half:])
    else:  # out1 = x1*c1 - x2*s1; out2 = x2*c2 + x1*s2
        torch.sub(x1 * c1, x2 * s1, out=out[..., :half])
        torch.add(x2 * c2, x1 * s2, out=out[..., half:])
    return out


class _RotaryTorch(torch.autograd.Function):
    """The PyTorch rotary under autocast: q/k rotated in fp32 (cos/sin are fp32 tables) and
    written straight into the autocast dtype; the gradients come back in q's/k's dtype."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        outs = [_rotate_into(t, cos, sin, torch.empty(t.shape, device=t.device, dtype=compute_dtype(t, cos)), False)
                for t in (q, k)]
        return outs[0], outs[1]

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = [_rotate_into(g, cos, sin, torch.empty(g.shape, device=g.device, dtype=dtype), True)
                 for g, dtype in zip((dq, dk), ctx.dtypes)]
        return grads[0], grads[1], None, None


# ---------------------------------------------------------------- SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        return _kernel("swiglu").swiglu(gate, up)
    return F.silu(gate) * up


# ---------------------------------------------------------------- attention
def document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """[batch, seq] document index of every token from cu_seqlens over the flattened tokens."""
    positions = torch.arange(batch * seq, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True) - 1).view(batch, seq)


def causal_document_mask(q_len: int, k_len: int, device, cu_seqlens=None, batch: int = 1) -> torch.Tensor:
    """Boolean mask [batch or 1, 1, q, k]: True where attention is allowed."""
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens, batch, k_len)
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    return mask


def document_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int, device=None):
    """Per token (flattened [batch*seq]), the row positions where its document starts and ends (exclusive).

    int32 pairs, what the Triton attention reads: key j is visible to query i iff start[i] <= j <= i.
    A document running past a row end is split at the row; tokens past cu_seqlens[-1] are their own.
    """
    device = device if device is not None else cu_seqlens.device
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    total = batch * seq
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got {tuple(cu.shape)}")
    pos = torch.arange(total, device=device)
    doc = (torch.searchsorted(cu, pos, right=True) - 1).clamp(0, cu.numel() - 2)
    row_start = (pos // seq) * seq
    start = torch.maximum(cu[doc], row_start) - row_start
    end = torch.minimum(cu[doc + 1], row_start + seq) - row_start
    end = torch.maximum(end, pos - row_start + 1)
    start = torch.minimum(start, pos - row_start)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


class PackedDocuments:
    """The packed-document layout of one micro-batch, built once (beside cos/sin in `Llama.forward`)
    and passed to every layer, so no layer -- nor its recompute under activation checkpointing --
    rebuilds it from `cu_seqlens`.

    Each attention backend reads its own form, computed on first use and kept:
    `bounds()` (Triton: per-token document start/end), `mask()` (SDPA/eager: boolean
    [batch, 1, seq, seq]), `varlen()` (flash-attn: int32 cu_seqlens and the longest document).
    `PackedDocuments(cu, b, s, backend)` computes the backend's form at once.
    """

    def __init__(self, cu_seqlens: torch.Tensor, batch: int, seq: int, backend: str | None = None,
                 device=None):
        self.cu_seqlens = cu_seqlens
        self.batch, self.seq = int(batch), int(seq)
        self.device = device if device is not None else cu_seqlens.device
        self._cache: dict[str, object] = {}
        if backend is not None:
            self.for_backend(backend)

    def for_backend(self, backend: str):
        if backend == "triton":
            return self.bounds()
        if backend == "flash_attn":
            return self.varlen()
        return self.mask()

    def _check(self, batch: int, seq: int):
        if (batch, seq) != (self.batch, self.seq):
            raise ValueError(f"PackedDocuments built for [batch, seq] = [{self.batch}, {self.seq}] "
                             f"but attention runs on [{batch}, {seq}]; build it from this micro-batch's shape")

    def bounds(self):
        if "bounds" not in self._cache:
            self._cache["bounds"] = document_bounds(self.cu_seqlens, self.batch, self.seq, self.device)
        return self._cache["bounds"]

    def mask(self):
        if "mask" not in self._cache:
            self._cache["mask"] = causal_document_mask(self.seq, self.seq, self.device,
                                                       self.cu_seqlens.to(self.device), self.batch)
        return self._cache["mask"]

    def varlen(self):
        if "varlen" not in self._cache:
            cu = self.cu_seqlens.to(device=self.device, dtype=torch.int32)
            self._cache["varlen"] = (cu, int((cu[1:] - cu[:-1]).max()))  # one host sync per micro-batch
        return self._cache["varlen"]


def _packed(docs, cu_seqlens, q) -> "PackedDocuments | None":
    """The micro-batch's PackedDocuments, or one built here from cu_seqlens (callers outside the model)."""
    if docs is None and cu_seqlens is not None:
        docs = PackedDocuments(cu_seqlens, q.shape[0], q.shape[1], device=q.device)
    if docs is not None:
        docs._check(q.shape[0], q.shape[1])
    return docs


def attention_reference(q, k, v, scale: float | None = None, cu_seqlens=None, docs=None):
    """Eager causal attention with GQA and optional packed-document masking. [b, s, h, d] in and out."""
    docs = _packed(docs, cu_seqlens, q)
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=2)
        v = v.repeat_interleave(hq // hkv, dim=2)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * scale
    mask = docs.mask() if docs is not None else causal_document_mask(s, k.shape[1], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, vt).transpose(1, 2)


def attention(q, k, v, scale: float | None = None, cu_seqlens=None, backend: str = "sdpa",
              docs: PackedDocuments | None = None):
    """Causal attention; packed documents from `docs` (the micro-batch's, preferred) or `cu_seqlens`."""
    docs = _packed(docs, cu_seqlens, q)
    if backend == "eager":
        return attention_reference(q, k, v, scale, docs=docs)
    if backend == "triton":
        bounds = docs.bounds() if docs is not None else None
        return _kernel("flash_attention").flash_attention(q, k, v, scale=scale, doc_bounds=bounds)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, scale, docs)
    # SDPA: GQA handled natively; packed documents through an explicit boolean mask.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.shape[2] != q.shape[2]
    if docs is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=docs.mask(), scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _flash_attn(q, k, v, scale, docs):
    import flash_attn

    if docs is None:
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    b, s = q.shape[:2]
    cu, max_len = docs.varlen()
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
        cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
    return out.view(b, s, *out.shape[1:])
