"""PPO (and GRPO) on the training engine: every role on the one mesh, rollouts from the training weights.

    jinpan ppo --config configs/ppo/tiny.yaml [--nproc 8 parallel.tp=2 parallel.pp=2 ...]

Roles, all built by `build_model` on the same (tp, pp, dp) layout:
  actor      trainable LM (ppo.actor, else checkpoint.load: the SFT model); its own optimizer;
             checkpoints in run_dir/checkpoints (so `load_model(run_dir)` / mj-to-hf give the policy)
  critic     trainable value model (model.head=value): ppo.critic, else the reward model, else the
             initial actor with a fresh value head; own optimizer; run_dir/critic/checkpoints.
             Not built with ppo.advantage=grpo.
  reference  frozen copy of the initial actor (or ppo.reference): forward only, no grads/optimizer
  reward     frozen pairwise reward model (ppo.reward_model, must have a value head) and/or a rule
             reward function ppo.reward_fn = "module:function(prompts, responses) -> list[float]"

One step (train.steps of them):
 1. rollout: this DP replica's share of ppo.rollout_batch prompts (x ppo.n_samples) is generated
    by the actor's own chunks with the KV-cache generator (posttrain/generation.py);
 2. scores: RM score at the last token (normalised with the RM's recorded mean/std when
    ppo.reward_normalize) * reward_model_weight + rule reward * reward_fn_weight, minus
    ppo.missing_eos_penalty for responses without EOS, clipped to +-ppo.reward_clip;
 3. experience (posttrain/experience.py): actor and reference log-probs at the sampling
    temperature from vocab-parallel logits, critic values, per-token KL (k1|k3), score on the
    last real token, GAE(gamma, lam), advantages whitened over the global batch (GRPO instead:
    group-normalised scores, no critic, k3 KL in the loss);
 4. update: ppo.epochs passes over the buffer in ppo.mini_batch-sequence optimizer steps through
    `run_step` -> `forward_backward` (the one schedule contract) with the clipped policy loss
    (+ entropy bonus) for the actor and the clipped value loss for the critic, both averaged over
    the response tokens of the global mini-batch; the adaptive KL controller (if on) moves beta.

Metrics (metrics.jsonl + TensorBoard, rank 0 of the last stage): reward_mean/std, score_rm,
score_rule, kl, kl_coef, policy_loss, value_loss, clipfrac, approx_kl, entropy,
explained_variance, response_len, eos_rate, gen_time_s, exp_time_s, train_time_s,
gen_tokens_per_s, logprob_diff_max (generation vs training-forward log-probs).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import math
import time
from pathlib import Path

import torch

from .. import device as devices
from ..parallel import comm
from ..training.task import Task
from . import experience as X
from . import ppo_losses as L


class PPOError(ValueError):
    """A PPO configuration / role / reward problem; the message names the key and the fix."""

    user_facing = True


# ---------------------------------------------------------------- config checks
def check_ppo_config(cfg, world_size: int) -> None:
    p, t = cfg.ppo, cfg.train
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    if not p.prompts:
        raise PPOError("ppo.prompts is not set; point it at a JSONL of prompts ({\"prompt\": ...} per line)")
    if not Path(p.prompts).is_file():
        raise PPOError(f"ppo.prompts={p.prompts} does not exist")
    if not p.reward_model and not p.reward_fn:
        raise PPOError("no reward: set ppo.reward_model (a reward-model checkpoint) and/or ppo.reward_fn "
                       "(module:function)")
    if p.rollout_batch % dp:
        raise PPOError(f"ppo.rollout_batch={p.rollout_batch} is not divisible by the data-parallel size {dp}")
    total = p.rollout_batch * p.n_samples
    if p.mini_batch % dp or total % p.mini_batch:
        raise PPOError(f"ppo.mini_batch={p.mini_batch} must divide rollout_batch*n_samples={total} and be "
                       f"divisible by the data-parallel size {dp}")
    if (p.mini_batch // dp) % t.micro_batch:
        raise PPOError(f"ppo.mini_batch/dp={p.mini_batch // dp} is not divisible by train.micro_batch="
                       f"{t.micro_batch}")
    if p.n_samples > 1 and (p.mini_batch // dp) % p.n_samples:
        raise PPOError(f"ppo.mini_batch/dp={p.mini_batch // dp} must be a multiple of ppo.n_samples="
                       f"{p.n_samples} (whole groups per mini-batch)")
    if cfg.parallel.pp_schedule == "interleaved" and cfg.parallel.pp > 1 and (p.mini_batch // dp // t.micro_batch) % cfg.parallel.pp:
        raise PPOError(f"the interleaved schedule needs the micro-batches per mini-batch (ppo.mini_batch/dp/"
                       f"train.micro_batch = {p.mini_batch // dp // t.micro_batch}) divisible by parallel.pp")
    if p.advantage == "grpo" and p.n_samples < 2:
        raise PPOError("ppo.advantage=grpo needs ppo.n_samples >= 2 (a group of responses per prompt)")
    if p.temperature <= 0:
        raise PPOError(f"ppo.temperature={p.temperature} must be > 0 (PPO samples from the policy)")
    if p.epochs < 1:
        raise PPOError(f"ppo.epochs={p.epochs} must be >= 1")
    if cfg.model.head != "lm":
        raise PPOError("the actor needs model.head=lm (the critic's value head is added by PPO itself)")


def role_config(cfg, source: str | None, head: str):
    """A role's Config: the actor's (layout, kernels, dtype) with the model shape of the checkpoint the
    role starts from, so a reward model or critic may be smaller or larger than the actor (only the
    vocabulary must match, see _check_role); the actor's shape when it starts from the actor."""
    from ..checkpoint.load import model_config_of

    c = copy.deepcopy(cfg)
    shape = model_config_of(source) if source and source != actor_source(cfg) else cfg.model
    c.model = dataclasses.replace(shape, head=head)
    return c


def _check_role_layout(role: str, key: str, source, rcfg, world: int) -> None:
    """A role shaped unlike the actor must still split over the layout (heads % tp, layers % pp, ...)."""
    from ..parallel.validate import layout_problems

    problems = layout_problems(rcfg, world)
    if problems:
        raise PPOError(f"{role} ({key}={source}) does not fit the layout: " + "; ".join(problems))


def critic_config(cfg):
    """The critic's Config: a value model shaped like its source checkpoint (ppo.critic, else the reward
    model, else the actor with a fresh value head), its own run_dir and learning rate."""
    c = role_config(cfg, cfg.ppo.critic or cfg.ppo.reward_model, "value")
    c.run_dir = str(Path(cfg.run_dir) / "critic")
    if cfg.ppo.critic_lr is not None:
        c.optim.lr = float(cfg.ppo.critic_lr)
        c.optim.min_lr = min(c.optim.min_lr, c.optim.lr)
    c.train.trainable = "all"
    c.checkpoint.load = cfg.ppo.critic or cfg.ppo.reward_model or actor_source(cfg)
    return c


def actor_source(cfg) -> str | None:
    return cfg.ppo.actor or cfg.checkpoint.load


def _check_role(role: str, key: str, source, cfg, head: str) -> None:
    """A role's checkpoint must exist, match the actor's vocabulary/shape and have the right head."""
    from ..checkpoint.load import model_config_of

    if source is None:
        return
    try:
        mc = model_config_of(source)
    except (FileNotFoundError, ValueError) as exc:
        raise PPOError(f"{role} ({key}={source}): {exc}") from None
    if mc.vocab_size != cfg.model.vocab_size:
        raise PPOError(f"{role} ({key}={source}) has vocab_size={mc.vocab_size} but the actor has "
                       f"{cfg.model.vocab_size}: every role must use the same tokenizer/vocabulary")
    if head == "value" and getattr(mc, "head", "lm") != "value":
        raise PPOError(f"{role} ({key}={source}) has no value head (model.head={getattr(mc, 'head', 'lm')}); "
                       f"train a reward model with `jinpan reward` or point {key} at one")


# ---------------------------------------------------------------- prompts and rewards
def load_prompts(cfg, tokenizer) -> list[tuple[str, list[int]]]:
    from ..checkpoint.generate import encode_prompt_record
    from .chat import load_template, read_jsonl

    template = load_template(cfg.ppo.template) if cfg.ppo.template else None
    out = [encode_prompt_record(record, where, template, tokenizer) for where, record in read_jsonl(cfg.ppo.prompts)]
    if not out:
        raise PPOError(f"ppo.prompts={cfg.ppo.prompts} holds no prompts")
    limit = cfg.model.max_seq_len - cfg.ppo.max_new_tokens
    for i, (_, ids) in enumerate(out):
        if len(ids) > limit:
            raise PPOError(f"ppo.prompts line {i + 1} has {len(ids)} tokens; with ppo.max_new_tokens="
                           f"{cfg.ppo.max_new_tokens} the limit is model.max_seq_len - max_new_tokens = {limit}")
    return out


def load_reward_fn(spec: str):
    """'package.module:function' -> the function."""
    if ":" not in spec:
        raise PPOError(f"ppo.reward_fn={spec!r} must be 'module:function'")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PPOError(f"ppo.reward_fn={spec!r} cannot be loaded: {exc}") from None
    if not callable(fn):
        raise PPOError(f"ppo.reward_fn={spec!r} is not callable")
    return fn


def rule_scores(fn, spec: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    try:
        out = fn(list(prompts), list(responses))
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported with its origin
        raise PPOError(f"ppo.reward_fn={spec} raised {type(exc).__name__}: {exc}") from exc
    try:
        scores = torch.tensor([float(x) for x in out], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise PPOError(f"ppo.reward_fn={spec} must return a list of numbers: {exc}") from None
    if scores.numel() != len(prompts):
        raise PPOError(f"ppo.reward_fn={spec} returned {scores.numel()} scores for {len(prompts)} responses")
    return scores


def combine_scores(pcfg, rm, rule, finished) -> torch.Tensor:
    """The score each response is rewarded with (see the module docstring)."""
    n = len(finished)
    score = torch.zeros(n)
    if rm is not None:
        score = score + pcfg.reward_model_weight * rm
    if rule is not None:
        score = score + pcfg.reward_fn_weight * rule
    if pcfg.missing_eos_penalty:
        score = score - pcfg.missing_eos_penalty * (~torch.tensor(finished, dtype=torch.bool)).float()
    if pcfg.reward_clip > 0:
        score = score.clamp(-pcfg.reward_clip, pcfg.reward_clip)
    if not torch.isfinite(score).all():
        bad = "ppo.reward_model" if rm is not None and not torch.isfinite(rm).all() else "ppo.reward_fn"
        raise PPOError(f"non-finite reward from {bad}; check the reward model / function (no checkpoint was "
                       "written for this step)")
    return score


# ---------------------------------------------------------------- losses for the update
def _actor_loss(logits, mb, *, vocab_size, mesh, temperature, clip, entropy_coef, grpo_kl_coef):
    scaled = logits.float() / temperature
    logp = X.token_logprobs(scaled, mb, vocab_size=vocab_size, mesh=mesh, temperature=1.0)
    mask = mb["action_mask"]
    loss, clipfrac, approx_kl = L.policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask, clip)
    entropy = X.gather_actions(L.vocab_parallel_entropy(scaled, vocab_size, mesh), mb).sum()
    metrics = {"policy_loss": loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl,
               "entropy": entropy.detach()}
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    if grpo_kl_coef:
        kl = (L.kl_penalty(logp, mb["ref_logprobs"], "k3") * mask).sum()
        loss = loss + grpo_kl_coef * kl
        metrics["kl_loss"] = kl.detach()
    return loss, metrics


def actor_loss(cfg, mesh, kl_coef: float):
    p = cfg.ppo
    return functools.partial(_actor_loss, vocab_size=cfg.model.vocab_size, mesh=mesh, temperature=p.temperature,
                             clip=p.clip, entropy_coef=p.entropy_coef,
                             grpo_kl_coef=kl_coef if p.advantage == "grpo" else 0.0)


def _critic_loss(values, mb, *, clip):
    v = X.gather_actions(values.float(), mb)
    loss, clipfrac = L.value_loss(v, mb["old_values"], mb["returns"], mb["action_mask"], clip)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": clipfrac}


def _per_token_summary(sums: dict, units: float, for_eval: bool) -> dict:
    return {k: v / max(units, 1.0) for k, v in sums.items() if k != "loss"}


def update_task(name: str) -> Task:
    """What run_step needs: loss units = response tokens of the global mini-batch."""
    return Task(name=name, train_data=None, loss_fn=None, denominator=X.action_count, summarize=_per_token_summary)


# ---------------------------------------------------------------- roles
@dataclasses.dataclass
class Roles:
    actor: list
    actor_opt: object
    critic: list | None
    critic_opt: object
    critic_cfg: object
    reference: list
    reward: list | None
    reward_norm: dict | None
    reward_fn: object


def build_roles(cfg, mesh) -> Roles:
    from ..parallel.optimizer import build_optimizer
    from ..parallel.parallelize import build_model
    from .dpo import build_frozen_model
    from .reward import normalization_of

    p = cfg.ppo
    _check_role("actor", "ppo.actor", p.actor, cfg, "lm")
    _check_role("reference", "ppo.reference", p.reference, cfg, "lm")
    _check_role("reward model", "ppo.reward_model", p.reward_model, cfg, "value")
    if p.critic:
        _check_role("critic", "ppo.critic", p.critic, cfg, "any")
    reward_fn = load_reward_fn(p.reward_fn) if p.reward_fn else None
    actor = build_model(cfg, mesh)
    actor_opt = build_optimizer(actor, cfg, mesh)
    critic = critic_opt = ccfg = None
    if p.advantage == "gae":
        ccfg = critic_config(cfg)
        _check_role_layout("critic", "ppo.critic", ccfg.checkpoint.load, ccfg, mesh.world_size)
        critic = build_model(ccfg, mesh)
        critic_opt = build_optimizer(critic, ccfg, mesh)
    ref_source = p.reference or actor_source(cfg)
    ref_cfg = role_config(cfg, ref_source, "lm")
    _check_role_layout("reference", "ppo.reference", ref_source, ref_cfg, mesh.world_size)
    reference = build_frozen_model(ref_cfg, mesh, ref_source)
    reward = norm = None
    if p.reward_model:
        rcfg = role_config(cfg, p.reward_model, "value")
        _check_role_layout("reward model", "ppo.reward_model", p.reward_model, rcfg, mesh.world_size)
        reward = build_frozen_model(rcfg, mesh, p.reward_model)
        norm = normalization_of(p.reward_model) if p.reward_normalize else None
    return Roles(actor, actor_opt, critic, critic_opt, ccfg, reference, reward, norm, reward_fn)


# ---------------------------------------------------------------- one step
def step_prompts(prompts: list, step: int, cfg, mesh) -> list[int]:
    """Global indices of this DP rank's prompts at `step` (each repeated n_samples times, consecutively)."""
    p = cfg.ppo
    chosen = [(step * p.rollout_batch + i) % len(prompts) for i in range(p.rollout_batch)]
    mine = chosen[mesh.dp_rank::mesh.dp]
    return [i for i in mine for _ in range(p.n_samples)]


def score_rollout(roles: Roles, cfg, mesh, prompt_texts, prompt_ids, responses, finished, tokenizer):
    """(scores [n], {"rm": [n] or None, "rule": [n] or None}) on every rank of the replica."""
    from .reward import score_sequences

    rm = rule = None
    if roles.reward is not None:
        seqs = [pi + r for pi, r in zip(prompt_ids, responses)]
        rm = torch.tensor(score_sequences(roles.reward, mesh, seqs, batch_size=cfg.train.micro_batch,
                                          schedule=cfg.parallel.pp_schedule), dtype=torch.float32)
        if roles.reward_norm:
            rm = (rm - float(roles.reward_norm["mean"])) / max(float(roles.reward_norm["std"]), 1e-6)
    if roles.reward_fn is not None:
        eos = tokenizer.eos_id
        texts = [tokenizer.decode(r[:-1] if r and r[-1] == eos else r) for r in responses]
        rule = rule_scores(roles.reward_fn, cfg.ppo.reward_fn, prompt_texts, texts)
    return combine_scores(cfg.ppo, rm, rule, finished), {"rm": rm, "rule": rule}


def make_experience(roles: Roles, cfg, mesh, rollout: X.Rollout, kl_coef: float):
    """Forward passes of actor, reference, critic over the rollout; advantages. Returns (mbs, Experience)."""
    autocast = lambda: devices.autocast_context(mesh.device, cfg.train.dtype)  # noqa: E731
    schedule = cfg.parallel.pp_schedule
    mb_size = cfg.train.micro_batch
    mbs = X.rollout_microbatches(rollout, mb_size, mesh)
    logp_fn = X.logprob_fn(cfg.model.vocab_size, mesh, cfg.ppo.temperature)
    old = X.forward_actions(roles.actor, mbs, logp_fn, "logp", mesh, schedule, autocast)
    ref = X.forward_actions(roles.reference, mbs, logp_fn, "logp", mesh, schedule, autocast)
    values = None
    if roles.critic is not None:
        values = X.forward_actions(roles.critic, mbs, X._value_outputs, "values", mesh, schedule, autocast)
    mask = torch.cat([mb["action_mask"] for mb in mbs])
    if not mesh.is_last_stage:
        return mbs, X.Experience(mask, None, None, None, None, None, None, {})
    scores = rollout.scores.to(mask.device)
    if values is None:
        values = torch.zeros_like(old)
    adv, returns, kl = X.compute_advantages(cfg.ppo, mask, scores, old, ref, values, kl_coef, mesh.dp_group)
    exp = X.Experience(mask, old, ref, values if roles.critic is not None else None, adv, returns, kl, {})
    exp.stats = experience_stats(cfg, mesh, rollout, exp, scores, values)
    return X.attach(mbs, exp, mb_size), exp


def _global_sum(values: list[float], mesh) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=mesh.device)
    comm.all_reduce(t, mesh.dp_group)
    return t.tolist()


def experience_stats(cfg, mesh, rollout, exp, scores, values) -> dict:
    """Global (over DP) rollout statistics, on the last stage."""
    n = float(len(rollout.responses))
    kl_seq = exp.kl.sum(dim=1)
    k1_seq = ((exp.old_logprobs - exp.ref_logprobs) * exp.mask).sum(dim=1)
    parts = [n, scores.sum().item(), (scores ** 2).sum().item(), kl_seq.sum().item(), k1_seq.sum().item(),
             exp.mask.sum().item(), float(sum(rollout.finished))]
    names = ["rm", "rule"]
    for name in names:
        part = rollout.score_parts.get(name)
        parts.append(float(part.sum()) if part is not None else 0.0)
    diff = 0.0
    if rollout.gen_logprobs is not None:
        gen = torch.zeros_like(exp.old_logprobs)
        for i, lp in enumerate(rollout.gen_logprobs):
            gen[i, :len(lp)] = torch.tensor(lp, dtype=gen.dtype)
        diff = float(((gen - exp.old_logprobs).abs() * exp.mask).max()) if exp.mask.numel() else 0.0
    total = _global_sum(parts, mesh)
    diff_t = torch.tensor([diff], dtype=torch.float64, device=mesh.device)
    comm.all_reduce(diff_t, mesh.dp_group, op=torch.distributed.ReduceOp.MAX)
    n, s, s2, kl, k1, tokens, eos = total[:7]
    mean = s / n
    out = {"reward_mean": mean, "reward_std": math.sqrt(max(s2 / n - mean * mean, 0.0)), "kl": kl / n,
           "kl_k1": k1 / n, "response_len": tokens / n, "eos_rate": eos / n, "response_tokens": tokens,
           "logprob_diff_max": float(diff_t.item())}
    for name, value in zip(names, total[7:]):
        if rollout.score_parts.get(name) is not None:
            out[f"score_{name}"] = value / n
    if exp.old_values is not None:
        out["explained_variance"] = L.explained_variance(exp.old_values, exp.returns, exp.mask, mesh.dp_group)
        out["value_mean"] = L.masked_moments(exp.old_values, exp.mask, mesh.dp_group)[0]
    return out


def ppo_update(roles: Roles, cfg, mesh, mbs: list[dict], step: int, kl_coef: float) -> dict:
    """ppo.epochs passes over this rank's micro-batches in mini-batches; returns averaged metrics."""
    from ..training.loop import run_step
    from ..training.lr import learning_rate

    p = cfg.ppo
    per_mini = (p.mini_batch // mesh.dp) // cfg.train.micro_batch
    n_minis = len(mbs) // per_mini
    lr = learning_rate(step, cfg.optim, cfg.train.steps)
    lr_c = learning_rate(step, roles.critic_cfg.optim, cfg.train.steps) if roles.critic is not None else 0.0
    a_loss = actor_loss(cfg, mesh, kl_coef)
    c_loss = functools.partial(_critic_loss, clip=p.value_clip)
    records = []
    for epoch in range(p.epochs):
        order = list(range(n_minis))
        if epoch > 0:  # same order on every rank and layout (a permutation of global mini-batches)
            g = torch.Generator().manual_seed(cfg.train.seed * 7919 + step * 104729 + epoch)
            order = torch.randperm(n_minis, generator=g).tolist()
        for k in order:
            part = mbs[k * per_mini:(k + 1) * per_mini]
            rec = run_step(roles.actor, roles.actor_opt, part, a_loss, cfg, mesh, lr, update_task("ppo_actor"))
            record = {k2: v for k2, v in rec.items() if k2 not in ("loss", "units")}
            record["actor_grad_norm"] = record.pop("grad_norm")
            if roles.critic is not None:
                crec = run_step(roles.critic, roles.critic_opt, part, c_loss, roles.critic_cfg, mesh, lr_c,
                                update_task("ppo_critic"))
                record.update({k2: v for k2, v in crec.items() if k2 not in ("loss", "units", "grad_norm")})
                record["critic_grad_norm"] = crec["grad_norm"]
            records.append(record)
    keys = sorted({k for r in records for k in r if isinstance(r.get(k), (int, float))})
    out = {k: sum(r[k] for r in records if isinstance(r.get(k), (int, float))) / len(records) for k in keys}
    out["lr"] = lr
    return out


# ---------------------------------------------------------------- the loop
def ppo_tokenizer(cfg):
    from ..checkpoint.commands import _find_tokenizer
    from ..data.tokenizer import load_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    source = actor_source(cfg)
    if not source:
        raise PPOError("set data.tokenizer (or ppo.actor / checkpoint.load with a recorded tokenizer)")
    return _find_tokenizer(source, None)


def prepare_config(cfg, world: int):
    """PPO's mini-batch is the optimizer step's global batch (train.global_batch, for the layout checks)."""
    cfg.train.global_batch = cfg.ppo.mini_batch
    check_ppo_config(cfg, world)
    return cfg


def _kl_state_of(path) -> float | None:
    from ..checkpoint import format as fmt

    return (fmt.read_meta(path).get("ppo_state") or {}).get("kl_coef")


def _save(managers, state, roles, mesh, kl_value: float) -> None:
    """Actor and critic checkpoints of this step, each with the KL controller's state in its meta.json."""
    from .reward import add_checkpoint_meta

    paths = [managers[0].save(state, roles.actor, roles.actor_opt)]
    if roles.critic is not None:
        paths.append(managers[1].save(state, roles.critic, roles.critic_opt))
    if mesh.rank == 0:
        for path in paths:
            add_checkpoint_meta(path, {"ppo_state": {"kl_coef": kl_value}})
    mesh.barrier()


def train_ppo(cfg, keep_mesh: bool = False):
    """`jinpan ppo` in this process (one rank). Returns (records on the logging rank, roles, mesh)."""
    import os

    from ..checkpoint import format as fmt
    from ..checkpoint.manager import CheckpointManager
    from ..parallel.mesh import ParallelMesh
    from ..parallel.validate import validate_config
    from ..training.loop import TrainState
    from ..training.metrics import MetricsWriter
    from .generation import generate

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = prepare_config(cfg, world)
    validate_config(cfg, world)
    tokenizer = ppo_tokenizer(cfg)
    prompts = load_prompts(cfg, tokenizer)
    p, t = cfg.ppo, cfg.train
    mesh = ParallelMesh.create(cfg.parallel.tp, cfg.parallel.pp, devices.resolve_device(t.device))
    records = []
    try:
        run_dir = Path(cfg.run_dir)
        if mesh.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
        torch.manual_seed(t.seed)
        roles = build_roles(cfg, mesh)
        cfg_load = copy.deepcopy(cfg)
        cfg_load.checkpoint.load = actor_source(cfg)
        managers = [CheckpointManager(cfg_load, mesh)]
        state = managers[0].resume(roles.actor, roles.actor_opt) or TrainState()
        if roles.critic is not None:
            managers.append(CheckpointManager(roles.critic_cfg, mesh))
            cstate = managers[1].resume(roles.critic, roles.critic_opt) or TrainState()
            if cstate.step != state.step:
                raise PPOError(f"the actor checkpoint is at step {state.step} but the critic's "
                               f"({managers[1].root}) at {cstate.step}; resume both from the same step")
        kl = L.kl_controller(p)
        if state.step > 0:
            saved = _kl_state_of(managers[0].root / fmt.step_dir_name(state.step))
            if saved is not None:
                kl.value = float(saved)
        writer = MetricsWriter(run_dir, mesh.is_logging_rank, t.steps, state.step, cfg.log.progress,
                               cfg.log.tensorboard)
        try:
            for step in range(state.step, t.steps):
                record = ppo_step(roles, cfg, mesh, prompts, step, kl, tokenizer, generate)
                state.step = step + 1
                state.consumed_samples += p.rollout_batch
                state.tokens += int(record.get("response_tokens", 0) or 0)
                if mesh.is_logging_rank:
                    record.update(step=state.step, tokens=state.tokens)
                    records.append(record)
                    writer.log(record)
                interval = int(cfg.checkpoint.interval or 0)
                if (interval and state.step % interval == 0) or (state.step == t.steps and
                                                                  cfg.checkpoint.save_on_exit):
                    _save(managers, state, roles, mesh, kl.value)
        finally:
            writer.close()
        if mesh.is_logging_rank and records:
            first, last = records[0], records[-1]
            print(f"[ppo] reward_mean {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}, "
                  f"kl {first['kl']:.4f} -> {last['kl']:.4f} over {len(records)} steps", flush=True)
        return records, roles, mesh
    finally:
        if not keep_mesh:
            mesh.destroy()


def ppo_step(roles, cfg, mesh, prompts, step: int, kl, tokenizer, generate) -> dict:
    """Rollout -> scores -> experience -> update -> KL controller. Returns the metrics (last stage)."""
    p = cfg.ppo
    t0 = time.perf_counter()
    idx = step_prompts(prompts, step, cfg, mesh)
    texts = [prompts[i][0] for i in idx]
    ids = [prompts[i][1] for i in idx]
    out = generate(roles.actor, mesh, ids, max_new_tokens=p.max_new_tokens, greedy=False, temperature=p.temperature,
                   top_k=p.top_k, top_p=p.top_p, eos_id=tokenizer.eos_id,
                   seed=cfg.train.seed * 1_000_003 + step * 7919 + mesh.dp_rank,
                   autocast=lambda: devices.autocast_context(mesh.device, cfg.train.dtype))
    devices.synchronize(mesh.device)
    t1 = time.perf_counter()
    scores, parts = score_rollout(roles, cfg, mesh, texts, ids, out.responses, out.finished, tokenizer)
    rollout = X.Rollout(ids, out.responses, out.finished, scores, out.logprobs, parts)
    mbs, exp = make_experience(roles, cfg, mesh, rollout, kl.value)
    devices.synchronize(mesh.device)
    t2 = time.perf_counter()
    update = ppo_update(roles, cfg, mesh, mbs, step, kl.value)
    devices.synchronize(mesh.device)
    t3 = time.perf_counter()
    # The KL controller moves on every rank alike: the last stage's global KL, shared over the pipeline.
    current = torch.tensor([exp.stats.get("kl", 0.0) if mesh.is_last_stage else 0.0], dtype=torch.float64,
                           device=mesh.device)
    if mesh.pp > 1:
        comm.broadcast(current, mesh.pp_ranks[-1], mesh.pp_group)
    record = {}
    if mesh.is_last_stage:
        gen_tokens = exp.stats["response_tokens"]
        record = {"loss": update.get("policy_loss"), **exp.stats, **update, "kl_coef": kl.value,
                  "gen_time_s": t1 - t0, "exp_time_s": t2 - t1, "train_time_s": t3 - t2,
                  "gen_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9), "step_time_s": t3 - t0,
                  "mem_gb": devices.max_memory_gb(mesh.device)}
    kl.update(float(current.item()), p.rollout_batch * p.n_samples)
    return record
