"""LLaMA model shapes and the registry of named configurations.

    from megatron_jinpan.models import get_model_config
    cfg = get_model_config("llama-7b", vocab_size=39_000)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class LlamaConfig:
    name: str = "custom"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None = num_heads (no GQA)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    # The embedding/LM-head rows are padded to a multiple of this times tp, so
    # the vocab splits evenly across tensor-parallel ranks (Megatron's rule).
    vocab_pad_multiple: int = 128
    # Output head: "lm" (logits over the vocab) or "value" (a scalar per token, `score.weight`
    # [1, hidden], as in HF's LlamaForSequenceClassification) for reward models and critics.
    head: str = "lm"

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.num_kv_heads}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) <= 0:
                problems.append(f"model.{key} must be positive")
        if self.head not in ("lm", "value"):
            problems.append(f"model.head={self.head!r} must be lm or value")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.vocab_pad_multiple * tp
        return -(-self.vocab_size // multiple) * multiple

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count of the unpadded model."""
        h, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        per_layer = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6*N (dense) + 12*L*h*s (causal attention scores, fwd+bwd, halved)."""
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.hidden_size  # LM head matmul
        attn = 12 * self.num_layers * self.hidden_size * seq_len / 2
        return 6 * n + attn

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_REGISTRY: dict[str, dict] = {
    # For tests: 4 layers (pp up to 4), GQA with 2 kv heads (tp up to 2).
    "debug": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=4, num_heads=4,
                  num_kv_heads=2, max_seq_len=256),
    # For the demo (~18M parameters with an 8K vocab).
    "tiny": dict(vocab_size=8000, hidden_size=384, intermediate_size=1024, num_layers=8, num_heads=6,
                 num_kv_heads=2, max_seq_len=512),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16,
                  max_seq_len=2048),
    # LLaMA-1 shapes (Touvron et al. 2023).
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                     max_seq_len=2048, norm_eps=1e-6),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                      max_seq_len=2048, norm_eps=1e-6),
    "llama-33b": dict(vocab_size=32000, hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52,
                      max_seq_len=2048, norm_eps=1e-6),
    # LLaMA-2 shapes.
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      max_seq_len=4096, norm_eps=1e-5),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                       max_seq_len=4096, norm_eps=1e-5),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                       num_kv_heads=8, max_seq_len=4096, norm_eps=1e-5),
}


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def get_model_config(name: str, **overrides) -> LlamaConfig:
    """The registry's shape `name`, with any LlamaConfig field overridden."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model.name={name!r}; choose one of {', '.join(model_names())}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; valid fields: {sorted(fields)}")
    values = dict(_REGISTRY[name], name=name)
    values.update(overrides)
    return LlamaConfig(**values)
