"""LLaMA as plain single-device PyTorch.

Parameter names and the rotary convention match Hugging Face's
`LlamaForCausalLM` (without its `model.` prefix), so converted weights give
the same logits. Parallelism is applied from outside (megatron_jinpan.parallel):
this file knows nothing of it. Stages of a pipeline are this same module
with some parts set to None: `embed_tokens` on the first stage only, `norm`
and `lm_head` on the last, and `layers` keyed by their global index.

    from megatron_jinpan.models import Llama, get_model_config
    model = Llama(get_model_config("debug"))
    logits = model(torch.randint(0, 256, (2, 16)))   # [2, 16, vocab]
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = "torch"

    def forward(self, x, residual=None):
        """norm(x); with `residual`: (norm(x + residual), x + residual) in one fused pass."""
        return ops.rms_norm(x, self.weight, self.eps, self.backend, residual=residual)


def project(x, *linears):
    """x through several linears that read it (q/k/v, gate/up), in order.

    Here they are just called. The parallelize step swaps in linears that define
    `project_shared_input(x, linears)`: tensor parallelism then gathers x once for all of them
    (one collective each way per block, parallel/tensor.py) instead of once per projection.
    """
    shared = getattr(linears[0], "project_shared_input", None)
    return shared(x, linears) if shared is not None else tuple(linear(x) for linear in linears)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rope_backend = "torch"
        self.attention_backend = "sdpa"
        self.recompute_core = False  # train.recompute=selective

    def forward(self, x, cos, sin, docs=None, kv_cache=None):
        """`docs`: the micro-batch's ops.PackedDocuments (built once in Llama.forward), or None."""
        # Head counts come from the projections' outputs, so a tensor-parallel
        # shard (fewer local heads, or a gathered sequence under SP) just works.
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        b, s = q.shape[:2]
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        v = v.view(b, s, -1, self.head_dim)
        q, k = ops.apply_rotary(q, k, cos, sin, self.rope_backend)
        if kv_cache is not None:
            # Incremental decoding (models/kv_cache.py): attend to every cached key of the sequence.
            out = kv_cache.attend(q, k, v)
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, docs, use_reentrant=False)
        else:
            out = self._core(q, k, v, docs)
        return self.o_proj(out.reshape(b, s, -1))

    def _core(self, q, k, v, docs):
        return ops.attention(q, k, v, docs=docs, backend=self.attention_backend)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.backend = "torch"

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(ops.swiglu(gate, up, self.backend))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, docs=None, kv_cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, docs, kv_cache)
        # h = x + attn and its norm in one pass (the residual stream keeps x's dtype; fp32 under autocast).
        normed, h = self.post_attention_layernorm(attn, residual=x)
        return h + self.mlp(normed)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        lm = cfg.head == "lm"
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if lm else None
        # A value head (reward model / critic) instead of the LM head: hidden -> 1 scalar per token.
        self.score = None if lm else nn.Linear(cfg.hidden_size, 1, bias=False)
        if cfg.tie_embeddings and lm:
            self.lm_head.weight = self.embed_tokens.weight
        self.recompute_layers = False  # train.recompute=full

    def set_kernels(self, choice: "ops.KernelChoice") -> "Llama":
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.backend = choice.norm
            elif isinstance(module, Attention):
                module.rope_backend = choice.rope
                module.attention_backend = choice.attention
            elif isinstance(module, MLP):
                module.backend = choice.swiglu
        return self

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """tokens [b, s] (first stage) or hidden states [b, s, h] (later stages).

        Returns logits [b, s, vocab] on the last stage (values [b, s] with `head: value`),
        hidden states otherwise.
        `position_ids` restart per document for packed sequences; default 0..s-1.
        `kv_cache` (models/kv_cache.KVCache, after `begin`): decode incrementally, reading and
        extending the cached keys/values of this chunk's layers.
        """
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        cos, sin = ops.rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        # Packed-document bounds once per micro-batch, shared by every layer (and their recompute).
        docs = None
        if cu_seqlens is not None and kv_cache is None and len(self.layers):
            backend = next(iter(self.layers.values())).self_attn.attention_backend
            docs = ops.PackedDocuments(cu_seqlens, *position_ids.shape, backend=backend, device=h.device)
        for name, layer in self.layers.items():
            if kv_cache is not None:
                h = layer(h, cos, sin, None, kv_cache.layer(name))
            elif self.recompute_layers and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, docs, use_reentrant=False)
            else:
                h = layer(h, cos, sin, docs)
        if kv_cache is not None:
            kv_cache.end()
            if kv_cache.last_position_only and self.norm is not None:
                h = h[:, -1:]  # sampling reads the last position only; a prefill would pay prompt x vocab
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        elif getattr(self, "score", None) is not None:
            h = self.score(h).squeeze(-1)
        return h


def init_parameter(name: str, shape, cfg: LlamaConfig, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The full, layout-independent initial value of parameter `name`.

    Seeded by (seed, name), so every tensor/pipeline/data layout materialises
    identical weights: a rank generates a parameter's full value and keeps its
    own slice. Norm weights start at one; the rest at N(0, init_std), with the
    output projections scaled by 1/sqrt(2*num_layers) (GPT-2/Megatron).
    """
    import zlib

    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    generator = torch.Generator(device=device or "cpu")
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std = std / (2 * cfg.num_layers) ** 0.5
    out = torch.empty(shape, device=device, dtype=torch.float32)
    out.normal_(0.0, std, generator=generator)
    return out.to(dtype)


def init_weights(model: Llama, seed: int) -> Llama:
    """Initialise a single-device model in place with `init_parameter`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(init_parameter(name, param.shape, model.cfg, seed, param.device, param.dtype))
    return model


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (labels already shifted); padded vocab columns are ignored."""
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = logits[..., :vocab_size]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.reshape(-1).float()
    return (losses * mask).sum() / mask.sum().clamp(min=1)
