"""The math of PPO / GRPO, as plain tensor functions (no mesh except where the vocab is split).

    kl = kl_penalty(logp, ref_logp, "k1")                    # per token
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, mask, group=mesh.dp_group)     # over the whole global batch
    loss, clipped = policy_loss(logp, old_logp, adv, mask, clip=0.2)

Every per-token tensor is in "action space": [batch, T], column j = the j-th
response token, `mask` 1 on real response tokens (0 after the response ends).
Losses return SUMS over the masked tokens (the loop divides by the global
number of response tokens, so the result is the same on any layout).
"""
from __future__ import annotations

import math

import torch

from ..parallel import comm, mappings


# ---------------------------------------------------------------- KL to the reference
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of the sampled tokens.

    k1 = log pi - log ref (unbiased, can be negative); k3 = exp(r) - r - 1 with r = log ref - log pi
    (unbiased, always >= 0, lower variance; Schulman's "Approximating KL divergence")."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        r = ref_logp - logp
        return torch.exp(r) - r - 1.0
    raise ValueError(f"ppo.kl_estimator={estimator!r}; choose k1 or k3")


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon, where KL is
    the mean per-sequence KL of the last rollout batch and n_steps the number of its sequences."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(pcfg):
    if pcfg.adaptive_kl:
        return AdaptiveKLController(pcfg.kl_coef, pcfg.kl_target, pcfg.kl_horizon)
    return FixedKLController(pcfg.kl_coef)


# ---------------------------------------------------------------- rewards and advantages
def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [b, T]: -kl_coef * KL on every response token, plus the sequence score on the
    LAST real response token (its EOS when it finished), never on padding."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each response (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0), A_t = delta_t + gamma*lam*A_{t+1};
    returns = A + V. Tokens past the response (mask 0) get 0."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each score minus its group's mean, over the group's std (groups = consecutive rows)."""
    groups = scores.reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.ones_like(mean)
    return ((groups - mean) / (std + eps)).reshape(-1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, group=None) -> tuple[float, float, float]:
    """(mean, variance, count) of x over mask, summed across `group` (e.g. the DP ranks)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    comm.all_reduce(stats, group)
    total, sq, n = stats.tolist()
    n = max(n, 1.0)
    mean = total / n
    return mean, max(sq / n - mean * mean, 0.0), n


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, group=None, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked tokens of the GLOBAL batch (statistics all-reduced over `group`)."""
    mean, var, _ = masked_moments(x, mask, group)
    out = (x - mean) * (1.0 / math.sqrt(var + 1e-8))
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------- losses (sums over response tokens)
def policy_loss(logp, old_logp, advantages, mask, clip: float):
    """Clipped surrogate: sum of max(-A r, -A clip(r, 1-e, 1+e)); also the clipped-token count and the
    sum of the k3 approximate KL to the rollout policy."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = (torch.maximum(unclipped, clipped) * mask).sum()
    clipfrac = ((clipped > unclipped).to(mask.dtype) * mask).sum()
    approx_kl = (((ratio - 1.0) - log_ratio) * mask).sum()
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss: sum of 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    clipfrac = (((clipped_values - returns) ** 2 > (values - returns) ** 2).to(mask.dtype) * mask).sum()
    return (loss * mask).sum(), clipfrac.detach()


def vocab_parallel_entropy(logits: torch.Tensor, vocab_size: int, mesh) -> torch.Tensor:
    """Per-token entropy [b, s] of softmax(logits) with the vocab split over TP (never gathered).

    H = log Z - sum_i p_i x_i with Z and sum_i e^{x_i} x_i summed over TP ranks; differentiable
    (the all-reduces are reduce_from_tp_region: backward is the identity on each rank's part)."""
    x = logits.float()
    tp = mesh.tp if mesh is not None else 1
    group = mesh.tp_group if tp > 1 else None
    start = mesh.tp_rank * x.shape[-1] if tp > 1 else 0
    valid = vocab_size - start
    if valid < x.shape[-1]:
        pad = torch.arange(x.shape[-1], device=x.device) >= max(valid, 0)
        x = x.masked_fill(pad, float("-inf"))
    m = x.detach().max(dim=-1).values
    if group is not None:
        comm.all_reduce(m, group, op=torch.distributed.ReduceOp.MAX)
    shifted = x - m.unsqueeze(-1)
    e = torch.exp(shifted)
    z = e.sum(dim=-1)
    ex = (e * shifted.masked_fill(e == 0, 0.0)).sum(dim=-1)
    if group is not None:
        z = mappings.reduce_from_tp_region(z, group)
        ex = mappings.reduce_from_tp_region(ex, group)
    return torch.log(z) - ex / z


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group=None) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens of the global batch."""
    _, var_r, _ = masked_moments(returns, mask, group)
    _, var_d, _ = masked_moments(returns - values, mask, group)
    return 1.0 - var_d / var_r if var_r > 0 else float("nan")
