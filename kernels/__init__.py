"""Triton kernels for LLaMA training, imported as `megatron_jinpan.kernels` (never as `kernels`).

One file per op, each built kernel -> launcher -> torch.autograd.Function ->
function/module, tested against the pure-PyTorch reference in
`megatron_jinpan.models.ops` (see docs/kernels.md):

    rmsnorm.rms_norm(x, weight, eps, residual=None)   # RMSNorm (+ fused residual add)
    rotary.apply_rotary(q, k, cos, sin, inplace=False) # rotary embedding, HF rotate_half
    swiglu.swiglu(gate, up)                           # silu(gate) * up
    flash_attention.flash_attention(q, k, v, scale=None, cu_seqlens=None)  # causal, GQA, packed docs

Nothing is imported here, so importing the package never needs triton; the
model's backend switch (`megatron_jinpan.models.ops`) imports an op's module
only when that backend is chosen. On CPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
