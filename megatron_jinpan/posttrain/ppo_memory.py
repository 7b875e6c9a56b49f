"""Memory per PPO role and rank: `jinpan bench memory --ppo --config configs/ppo/llama7b.yaml --world-size 32`.

All four roles sit on the same (tp, pp, dp) layout, so each rank holds its slice of every one:

  actor      weights + grads + optimizer (perf/memory.estimate_memory) + training activations
  critic     the same with a value head ([1, h]) instead of the LM head (no vocab-sized logits)
  reference  weights only (frozen, forward only: no grads, no optimizer state, nothing saved)
  reward     weights only (value head)
  kv cache   generation: 2 (k, v) x local layers x (rollouts of the replica) x (prompt + new tokens)
             x local kv heads x head_dim, in the weight dtype (fp32 here, bf16 with bf16 weights)

Sequences are train.seq_len long (set it to the longest prompt + ppo.max_new_tokens). Transient
buffers (logits of one micro-batch during experience, the gathered last-token logits while
sampling) are small next to these and not counted.
"""
from __future__ import annotations

import copy


def ppo_role_memory(cfg, world_size: int, pp_rank: int = 0, weights: str = "fp32") -> dict[str, float]:
    """Bytes per role on pipeline rank `pp_rank` (and the total)."""
    from ..perf.comm_model import chunk_param_numels
    from ..perf.memory import estimate_memory

    p, m = cfg.parallel, cfg.model
    tp, pp = p.tp, p.pp
    dp = world_size // (tp * pp)
    w = 4 if weights == "fp32" else 2
    vs = p.virtual_stages if pp > 1 else 1
    local = sum(k for c in chunk_param_numels(m, tp, pp, pp_rank, vs, p.pp_layers) for _, k in c)
    chunks = chunk_param_numels(m, tp, pp, pp_rank, vs, p.pp_layers)
    head = sum(k for c in chunks for n, k in c if n == "lm_head.weight")
    value_local = local - head + (m.hidden_size if head else 0)   # score.weight [1, h] replicated over TP
    cfg = copy.deepcopy(cfg)
    cfg.train.global_batch = cfg.ppo.mini_batch
    actor = estimate_memory(cfg, world_size, pp_rank, weights)
    critic = 0.0
    if cfg.ppo.advantage == "gae":
        scale = value_local / max(local, 1)   # states scale with the parameters; no logits on the head
        vocab_acts = 0.0
        if head:
            b, s = cfg.train.micro_batch, cfg.train.seq_len
            vocab_acts = 2 * b * s * (m.padded_vocab_size(tp) / tp) * (2.0 if cfg.train.dtype == "bf16" else 4.0)
        critic = (actor.params + actor.grads + actor.optimizer) * scale + max(actor.activations - vocab_acts, 0.0)
    layers = sum(1 for c in chunks for n, _ in c if n.endswith("input_layernorm.weight"))
    rollouts = cfg.ppo.rollout_batch * cfg.ppo.n_samples // max(dp, 1)
    kv = 2 * layers * rollouts * cfg.train.seq_len * (m.num_kv_heads // tp) * m.head_dim * w
    out = {"actor": actor.total, "critic": critic, "reference": local * w,
           "reward": value_local * w if cfg.ppo.reward_model else 0.0, "kv_cache": float(kv)}
    out["total"] = sum(out.values())
    return out


def describe(cfg, world_size: int, weights: str = "fp32") -> str:
    gib = 2**30
    p = cfg.parallel
    dp = world_size // (p.tp * p.pp)
    lines = [f"PPO roles per rank ({cfg.model.name}, tp{p.tp} pp{p.pp} dp{dp} zero{p.zero}, seq {cfg.train.seq_len}, "
             f"{cfg.ppo.rollout_batch * cfg.ppo.n_samples // max(dp, 1)} rollouts per replica, weights {weights}):"]
    for r in range(p.pp):
        mem = ppo_role_memory(cfg, world_size, r, weights)
        parts = "  ".join(f"{k} {v / gib:6.2f}" for k, v in mem.items())
        lines.append(f"  pipeline stage {r}: {parts} GiB")
    return "\n".join(lines)
