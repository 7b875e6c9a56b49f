"""PPO experience: from a rollout (prompts + sampled responses + scores) to update micro-batches.

    rollout = Rollout(prompts, responses, finished, scores, gen_logprobs)     # this DP rank's share
    mbs = rollout_microbatches(rollout, micro_batch, mesh)                    # right-padded rows
    exp = make_experience(roles, mbs, rollout, cfg, mesh, kl_coef)            # log-probs, values, GAE

Row layout (every role, every pipeline stage): tokens = prompt + response,
right-padded to one width (a multiple of 8*tp, so sequence parallelism can
split it), positions 0..W-1, labels = tokens shifted left. Per-token
quantities live in ACTION space [b, T]: column j is response token j, read
from sequence position `action_index` = len(prompt) - 1 + j (the logits that
predict it; the critic's value of the state before it), `action_mask` 1 on
real response tokens. The sequence score goes on the last real response
token (its EOS when the response finished), never on padding.

Actor and reference log-probs come from the vocab-parallel logits with
`vocab_parallel_cross_entropy` at the sampling temperature (logits / T): the
vocabulary is never gathered. They, the critic's values and everything
derived from them live on the LAST pipeline stage (where the update's loss
runs); the other stages only need the token layout and `action_mask`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..parallel.tensor import vocab_parallel_cross_entropy
from ..training.schedules import forward_backward
from . import ppo_losses as L


@dataclass
class Rollout:
    """One DP rank's share of a rollout batch (identical on every rank of its replica)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    finished: list[bool]
    scores: torch.Tensor                       # [n] the score each response is rewarded with
    gen_logprobs: list[list[float]] | None = None
    score_parts: dict = field(default_factory=dict)  # {"rm": [n], "rule": [n]} before weighting


def rollout_microbatches(rollout: Rollout, micro_batch: int, mesh, pad_id: int = 0) -> list[dict]:
    """Right-padded micro-batches of `micro_batch` rows (tokens, labels, position_ids, action_index,
    action_mask) on mesh.device."""
    n = len(rollout.prompts)
    if n % micro_batch:
        raise ValueError(f"{n} rollouts on this rank are not divisible by train.micro_batch={micro_batch}")
    lengths = [len(p) + len(r) for p, r in zip(rollout.prompts, rollout.responses)]
    multiple = 8 * mesh.tp
    width = -(-max(lengths) // multiple) * multiple
    steps = max(len(r) for r in rollout.responses)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    index = torch.zeros((n, steps), dtype=torch.long)
    mask = torch.zeros((n, steps), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(rollout.prompts, rollout.responses)):
        tokens[i, :len(p) + len(r)] = torch.as_tensor(p + r, dtype=torch.long)
        index[i, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        mask[i, :len(r)] = 1.0
    labels = torch.cat([tokens[:, 1:], torch.full((n, 1), pad_id, dtype=torch.long)], dim=1)
    positions = torch.arange(width).expand(micro_batch, -1)
    mbs = []
    for lo in range(0, n, micro_batch):
        sl = slice(lo, lo + micro_batch)
        mbs.append({k: v.to(mesh.device) for k, v in {
            "tokens": tokens[sl], "labels": labels[sl], "position_ids": positions, "action_index": index[sl],
            "action_mask": mask[sl]}.items()})
    return mbs


def action_count(mb: dict) -> torch.Tensor:
    """Task denominator: response tokens of the micro-batch."""
    return mb["action_mask"].sum()


def gather_actions(per_position: torch.Tensor, mb: dict) -> torch.Tensor:
    """[b, W] per sequence position -> [b, T] per response token (0 past the response)."""
    return per_position.gather(1, mb["action_index"]) * mb["action_mask"]


def token_logprobs(logits: torch.Tensor, mb: dict, *, vocab_size: int, mesh, temperature: float) -> torch.Tensor:
    """log pi(response token j) [b, T] at the sampling temperature, from vocab-parallel logits."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits
    logp = -vocab_parallel_cross_entropy(scaled, mb["labels"], vocab_size, mesh)
    return gather_actions(logp, mb)


def _logprob_outputs(logits, mb, *, vocab_size, mesh, temperature):
    logp = token_logprobs(logits, mb, vocab_size=vocab_size, mesh=mesh, temperature=temperature)
    return logp.sum(), {"logp": logp}


def _value_outputs(values, mb):
    v = gather_actions(values.float(), mb)
    return v.sum(), {"values": v}


@torch.no_grad()
def forward_actions(chunks, mbs, loss_fn, key: str, mesh, schedule: str, autocast=None) -> torch.Tensor | None:
    """Run a role forward-only over the micro-batches; [n, T] of output `key` on the last stage, else None."""
    training = [c.training for c in chunks]
    for c in chunks:
        c.train(False)
    try:
        results = forward_backward(chunks, mbs, loss_fn, mesh, schedule=schedule, forward_only=True,
                                   autocast=autocast)
    finally:
        for c, t in zip(chunks, training):
            c.train(t)
    if not mesh.is_last_stage:
        return None
    return torch.cat([r[key] for r in results]).float()


def logprob_fn(vocab_size: int, mesh, temperature: float):
    return functools.partial(_logprob_outputs, vocab_size=vocab_size, mesh=mesh, temperature=temperature)


@dataclass
class Experience:
    """What the update needs, on the last stage (None elsewhere), for this DP rank's rows [n, T]."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    old_values: torch.Tensor | None
    advantages: torch.Tensor | None
    returns: torch.Tensor | None
    kl: torch.Tensor | None             # per-token KL estimate (ppo.kl_estimator) to the reference
    stats: dict                         # global step statistics (last stage)


def compute_advantages(pcfg, mask, scores, old_logprobs, ref_logprobs, old_values, kl_coef: float, dp_group):
    """(advantages, returns, per-token kl) for this rank's rows; statistics are global over `dp_group`.

    gae: rewards = score on the last real token - kl_coef * KL per token; GAE(gamma, lam); advantages
    whitened over the global batch. grpo: every token of a response gets its group-normalised score
    (KL goes into the loss instead, see ppo.py)."""
    kl = L.kl_penalty(old_logprobs, ref_logprobs, pcfg.kl_estimator) * mask
    if pcfg.advantage == "grpo":
        adv = L.group_advantages(scores, pcfg.n_samples)[:, None] * mask
        return adv, torch.zeros_like(adv), kl
    rewards = L.token_rewards(scores, kl, mask, kl_coef)
    adv, returns = L.gae(rewards, old_values, mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:
        adv = L.masked_whiten(adv, mask, dp_group)
    return adv, returns, kl


def attach(mbs: list[dict], exp: Experience, micro_batch: int) -> list[dict]:
    """The micro-batches with the experience tensors added (last stage), for the update's loss."""
    if exp.old_logprobs is None:
        return mbs
    out = []
    for i, mb in enumerate(mbs):
        sl = slice(i * micro_batch, (i + 1) * micro_batch)
        extra = {"old_logprobs": exp.old_logprobs[sl], "ref_logprobs": exp.ref_logprobs[sl],
                 "advantages": exp.advantages[sl], "returns": exp.returns[sl]}
        if exp.old_values is not None:
            extra["old_values"] = exp.old_values[sl]
        out.append({**mb, **{k: v.to(mb["tokens"].device) for k, v in extra.items()}})
    return out
