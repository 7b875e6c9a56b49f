"""Pairwise reward model on the shared loop: a value head scored at each answer's EOS.

    jinpan preprocess --format pairs --input prefs.jsonl --tokenizer tok.model --output-prefix data/prefs
    jinpan reward --config configs/reward/tiny.yaml [--nproc 8 parallel.tp=2 parallel.pp=2 ...]
    jinpan reward score --checkpoint runs/reward_tiny --input answers.jsonl --output scored.jsonl

The model is the Llama backbone with `model.head: value` (a `score.weight` [1, hidden] instead of the
LM head; initialised from an SFT/pretraining checkpoint or HF dir via checkpoint.load, the LM head
dropped). Per pair, r = the value at the last token (EOS) of each side and

    loss = -log sigmoid(r_chosen - r_rejected - margin)       margin = reward.margin + pair "margin"

Metrics (sums over pairs for the Task contract, units = pairs): loss, accuracy (r_c > r_r),
reward_chosen, reward_rejected, reward_margin (r_c - r_r); held-out sets give eval_* versions.
With `reward.normalize` the mean/std of the reward over the held-out responses is stored in the
final checkpoint's meta.json as `reward_normalization` (and in run_dir/reward_normalization.json), so
PPO and `reward score` can centre rewards.

Python API for PPO and the eval harness (any layout; called by every rank of one DP replica):
    scores = score_sequences(chunks, mesh, [ids, ...])
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..training.task import Task
from .pairs import build_pair_data, pair_count

METRICS = ("loss", "accuracy", "reward_chosen", "reward_rejected", "reward_margin")


# ---------------------------------------------------------------- loss
def pair_rewards(values: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [P], r_rejected [P]): the value at each sequence's last token (mb["score_index"])."""
    r = values.float().reshape(-1).index_select(0, mb["score_index"])
    return r[0::2], r[1::2]


def _pairwise_loss(values, mb, *, margin: float, use_data_margin: bool):
    chosen, rejected = pair_rewards(values, mb)
    w = mb["pair_weight"].to(chosen.dtype)
    target = margin + (mb["margin"].to(chosen.dtype) if use_data_margin else 0.0)
    diff = chosen - rejected
    loss = (-F.logsigmoid(diff - target) * w).sum()
    metrics = {"accuracy": ((diff > 0).to(w.dtype) * w).sum(), "reward_chosen": (chosen * w).sum(),
               "reward_rejected": (rejected * w).sum(), "reward_margin": (diff * w).sum()}
    return loss, metrics


def pairwise_loss(rcfg):
    """loss_fn(values [b, s], mb) -> (sum over pairs of -log sigmoid(r_c - r_r - margin), metric sums)."""
    return functools.partial(_pairwise_loss, margin=float(rcfg.margin), use_data_margin=bool(rcfg.use_data_margin))


def pair_summary(sums: dict, units: float, for_eval: bool) -> dict:
    return {k: sums.get(k, 0.0) / max(units, 1.0) for k in METRICS}


# ---------------------------------------------------------------- task and command
def reward_config(cfg):
    """`cfg` with the value head (the recipe may leave model.head at lm)."""
    if cfg.model.head != "value":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="value"))
    return cfg


def reward_task(cfg, mesh, holder: dict | None = None) -> Task:
    train, evals = build_pair_data(cfg)
    if mesh.rank == 0 and (train.dropped or any(e.dropped for e in evals.values())):
        print(f"[reward] left out {train.dropped} training / {sum(e.dropped for e in evals.values())} held-out "
              f"pairs longer than train.seq_len={cfg.train.seq_len}", flush=True)
    if holder is not None:
        holder["evals"] = evals
    return Task(name="reward", train_data=train, eval_sets=evals if cfg.train.eval_interval > 0 else {},
                loss_fn=pairwise_loss(cfg.reward), denominator=pair_count, summarize=pair_summary,
                tokens_per_step=train.tokens_per_step())


def train_reward(cfg):
    """`jinpan reward` in this process (one rank): train, then record the reward normalisation."""
    from ..training.loop import pretrain

    cfg = reward_config(cfg)
    holder: dict = {}
    result = pretrain(cfg, keep_mesh=True, make_task=lambda c, m: reward_task(c, m, holder))
    try:
        if cfg.reward.normalize and holder.get("evals"):
            stats = reward_statistics(result.chunks, result.mesh, holder["evals"], cfg)
            record_normalization(cfg, result.mesh, stats)
        result.mesh.barrier()
    finally:
        result.mesh.destroy()
    return result


# ---------------------------------------------------------------- normalisation
def _value_moments(values, mb):
    chosen, rejected = pair_rewards(values, mb)
    w = mb["pair_weight"].to(chosen.dtype)
    r = torch.cat([chosen * w, rejected * w])
    loss = r.sum()
    return loss, {"sum_sq": (torch.cat([chosen, rejected]) ** 2 * torch.cat([w, w])).sum(), "count": 2 * w.sum()}


@torch.no_grad()
def reward_statistics(chunks, mesh, eval_sets: dict, cfg) -> dict:
    """Mean and std of the reward over every response (chosen and rejected) of the held-out sets."""
    from ..training.loop import _sum_results, to_device
    from ..training.schedules import forward_backward

    for chunk in chunks:
        chunk.train(False)
    total = {"loss": 0.0, "sum_sq": 0.0, "count": 0.0}
    for data in eval_sets.values():
        batches = math.ceil(len(data) / cfg.train.global_batch) if not data.pack else \
            math.ceil(len(data._groups(0)) * cfg.train.micro_batch / cfg.train.global_batch)
        for i in range(batches):
            mbs = [to_device(mb, mesh.device) for mb in data.microbatches(i, mesh.dp_rank, mesh.dp)]
            results = forward_backward(chunks, mbs, _value_moments, mesh, schedule=cfg.parallel.pp_schedule,
                                       forward_only=True)
            if mesh.is_last_stage:
                for k, v in _sum_results(results, mesh).items():
                    total[k] += v
    for chunk in chunks:
        chunk.train(True)
    n = max(total["count"], 1.0)
    mean = total["loss"] / n
    std = math.sqrt(max(total["sum_sq"] / n - mean * mean, 0.0))
    return {"mean": mean, "std": std, "count": int(total["count"]), "sets": sorted(eval_sets)}


def record_normalization(cfg, mesh, stats: dict) -> None:
    """Write the statistics (known on the last stage) into run_dir and the newest checkpoint's meta.json."""
    from ..checkpoint import format as fmt
    from ..parallel import comm

    stats = [s for s in comm.all_gather_object(stats if mesh.is_logging_rank else None) if s is not None][0]
    if mesh.rank != 0:
        return
    run_dir = Path(cfg.run_dir)
    fmt.write_json_atomic(run_dir / "reward_normalization.json", stats)
    latest = fmt.read_latest(run_dir / "checkpoints")
    if latest is not None and latest.is_dir():
        add_checkpoint_meta(latest, {"reward_normalization": stats})
    print(f"[reward] reward normalisation over {stats['count']} held-out responses: mean {stats['mean']:.4f} "
          f"std {stats['std']:.4f}", flush=True)


def add_checkpoint_meta(path: Path, extra: dict) -> None:
    """Add keys to a finished checkpoint's meta.json and re-seal its manifest (other files' hashes kept)."""
    from ..checkpoint import format as fmt

    meta = fmt.read_meta(path)
    meta.update(extra)
    old = {rel: info["sha256"] for rel, info in fmt.read_manifest(path)["files"].items() if rel != fmt.META}
    fmt.write_json_atomic(path / fmt.META, meta)
    fmt.write_manifest(path, old)


def normalization_of(path) -> dict | None:
    """The reward normalisation recorded with a checkpoint (ours or an HF export), or None."""
    from ..checkpoint import format as fmt
    from ..checkpoint.load import resolve_source

    kind, p = resolve_source(path)
    if kind == "hf":
        return json.loads((p / "config.json").read_text()).get("reward_normalization")
    return fmt.read_meta(p).get("reward_normalization")


# ---------------------------------------------------------------- scoring
def _values_at(values, mb):
    r = values.float().reshape(-1).index_select(0, mb["score_index"])
    return r.sum(), {"values": r}


@torch.no_grad()
def score_sequences(chunks, mesh, sequences: list[list[int]], batch_size: int = 8, pad_id: int = 0,
                    schedule: str = "1f1b") -> list[float]:
    """The reward of each token sequence (the value at its last token), on any (tp, pp) layout.

    Called by every rank of one DP replica with the same sequences; returns the scores on all of them.
    Sequences are right-padded into rows of one width (a multiple of 8 * tp, so sequence parallelism
    splits it) and run through `forward_backward(forward_only=True)` in micro-batches of `batch_size`."""
    from ..parallel import comm
    from ..training.schedules import forward_backward

    if not sequences:
        return []
    if any(len(s) == 0 for s in sequences):
        raise ValueError("score_sequences: an empty sequence has no last token to score")
    multiple = 8 * mesh.tp
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    n = len(sequences)
    padded = sequences + [sequences[0]] * ((-n) % batch_size)  # whole micro-batches (pipeline shapes)
    mbs = []
    for i in range(0, len(padded), batch_size):
        rows = padded[i:i + batch_size]
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        for j, s in enumerate(rows):
            tokens[j, :len(s)] = torch.as_tensor(s, dtype=torch.int64)
        index = torch.tensor([j * width + len(s) - 1 for j, s in enumerate(rows)], dtype=torch.int64)
        mbs.append({"tokens": tokens.to(mesh.device), "score_index": index.to(mesh.device),
                    "position_ids": torch.arange(width).expand(len(rows), -1).to(mesh.device)})
    results = forward_backward(chunks, mbs, _values_at, mesh, schedule=schedule, forward_only=True)
    scores = torch.cat([r["values"] for r in results]).tolist() if results else None
    if mesh.pp > 1:  # the last stage has them: share with the replica's other stages
        scores = [s for s in comm.all_gather_object(scores, mesh.pp_group) if s is not None][0]
    return scores[:n]


def score_texts(record: dict, where: str, template, tokenizer) -> dict[str, list[int]]:
    """The sequences to score for one `reward score` input record, by output key.

    {"prompt", "response"} or {"messages": [...]} -> "reward"; a pair record
    {"prompt", "chosen", "rejected"} or {"chosen": [...], "rejected": [...]} -> "reward_chosen"/"reward_rejected"."""
    from ..data.tokenizer import DataError
    from .chat import to_messages
    from .pairs import _turns, pair_conversations

    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object")
    if "chosen" in record or "rejected" in record:
        chosen, rejected, _ = pair_conversations(record, where)
        return {"reward_chosen": _encode_scored(chosen, template, tokenizer, where),
                "reward_rejected": _encode_scored(rejected, template, tokenizer, where)}
    if "response" in record:
        prompt = record.get("prompt")
        if prompt is None:
            raise DataError(f"{where} has a \"response\" but no \"prompt\"")
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turns(prompt, where, "prompt")
        if not isinstance(record["response"], str):
            raise DataError(f"{where}: \"response\" must be a string")
        msgs = msgs + [{"role": "assistant", "content": record["response"]}]
    else:
        msgs = to_messages(record, where)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation to score must end with an assistant message")
    return {"reward": _encode_scored(msgs, template, tokenizer, where)}


def _encode_scored(messages, template, tokenizer, where: str) -> list[int]:
    """Ids of a conversation to score; an empty answer is scored too (the prompt, then EOS)."""
    from .chat import NoAnswer

    try:
        return template.encode(messages, tokenizer, where)[0]
    except NoAnswer:
        return template.encode_prompt(messages[:-1], tokenizer, where) + [tokenizer.eos_id]
