"""Backend switch for the model's fused-able ops (DESIGN rule 6).

Each op has a pure-PyTorch path here and an optional Triton path in
`megatron_jinpan.kernels.<op>`; attention also has SDPA and flash-attn.
Backends are named by the `kernels.*` config keys; "auto" means Triton on
CUDA and PyTorch/SDPA on CPU.

Tensor layout for attention is [batch, seq, heads, head_dim] (flash-attn's).
`cu_seqlens` (int32, over the flattened batch*seq tokens) marks packed
documents: attention never crosses a boundary.
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        return _kernel("rmsnorm").rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


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
    if backend == "triton":
        return _kernel("rotary").apply_rotary(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)


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


def attention_reference(q, k, v, scale: float | None = None, cu_seqlens=None):
    """Eager causal attention with GQA and optional packed-document masking. [b, s, h, d] in and out."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=2)
        v = v.repeat_interleave(hq // hkv, dim=2)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * scale
    mask = causal_document_mask(s, k.shape[1], q.device, cu_seqlens, b)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, vt).transpose(1, 2)


def attention(q, k, v, scale: float | None = None, cu_seqlens=None, backend: str = "sdpa"):
    if backend == "eager":
        return attention_reference(q, k, v, scale, cu_seqlens)
    if backend == "triton":
        return _kernel("flash_attention").flash_attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, scale, cu_seqlens)
    # SDPA: GQA handled natively; packed documents through an explicit boolean mask.
    b, s, hq, d = q.shape
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.shape[2] != hq
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = causal_document_mask(s, s, q.device, cu_seqlens, b)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _flash_attn(q, k, v, scale, cu_seqlens):
    import flash_attn

    if cu_seqlens is None:
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    b, s = q.shape[:2]
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
        cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
    return out.view(b, s, *out.shape[1:])
