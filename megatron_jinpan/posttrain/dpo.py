"""Direct Preference Optimization on the shared loop: policy vs a frozen reference, no rollouts.

    jinpan preprocess --format pairs --input prefs.jsonl --tokenizer tok.model --output-prefix data/prefs
    jinpan dpo --config configs/dpo/tiny.yaml [--nproc 8 parallel.tp=2 parallel.pp=2 ...]

Per pair, with log pi(y|x) summed over the answer tokens (its EOS included) of each side,

    h      = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
    sigmoid (dpo.loss=sigmoid):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing, cDPO)
    ipo     (dpo.loss=ipo):      (h - 1 / (2 beta))^2

Token log-probs come from the vocab-parallel logits with `vocab_parallel_cross_entropy` (the vocabulary
is never gathered). Metrics (sums over pairs; units = pairs): loss, accuracy (beta h > 0),
reward_chosen / reward_rejected (beta (log pi - log ref) of each side), reward_margin, logp_chosen,
logp_rejected; held-out sets give eval_* versions.

The reference: `dpo.reference` (a checkpoint or HF dir), else `checkpoint.load` (the initial policy),
else the policy's own seeded initialisation. It is built on the same (tp, pp) layout, frozen, and run
forward-only in `Task.prepare` before each step's forward_backward. With `train.trainable=lora` and no
`dpo.reference`, the reference is the policy with its adapters switched off (no second copy).
With `dpo.precompute_reference` the reference log-probs of every pair are computed once before training
(run_dir/reference_logps/<set>.npy, reused on resume) and the reference model is freed.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..parallel.tensor import vocab_parallel_cross_entropy
from ..training.task import Task
from .pairs import build_pair_data, collate_pairs, pair_count

METRICS = ("loss", "accuracy", "reward_chosen", "reward_rejected", "reward_margin", "logp_chosen", "logp_rejected")


# ---------------------------------------------------------------- log-probs and loss
def sequence_logps(logits: torch.Tensor, mb: dict, vocab_size: int, mesh) -> torch.Tensor:
    """Summed answer-token log-probs of each sequence [2P] (chosen of pair p at 2p, rejected at 2p+1),
    from logits split on the vocab across TP ranks."""
    token = -vocab_parallel_cross_entropy(logits, mb["labels"], vocab_size, mesh)  # [R, S], fp32
    n = mb["score_index"].numel()
    mask = mb["loss_mask"].to(token.dtype)
    out = token.new_zeros(n + 1).index_add_(0, mb["segment"].reshape(-1), (token * mask).reshape(-1))
    return out[:n]


def preference_loss(pi: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor, beta: float, kind: str,
                    label_smoothing: float = 0.0):
    """(loss sum, metric sums) of DPO/IPO from sequence log-probs [2P] of the policy and the reference."""
    pc, pr, rc, rr = pi[0::2], pi[1::2], ref[0::2], ref[1::2]
    h = (pc - rc) - (pr - rr)
    if kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    w = weight.to(pi.dtype)
    chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    metrics = {"accuracy": ((chosen > rejected).to(w.dtype) * w).sum(), "reward_chosen": (chosen * w).sum(),
               "reward_rejected": (rejected * w).sum(), "reward_margin": ((chosen - rejected) * w).sum(),
               "logp_chosen": (pc.detach() * w).sum(), "logp_rejected": (pr.detach() * w).sum()}
    return (losses * w).sum(), metrics


def _dpo_loss(logits, mb, *, vocab_size, mesh, beta, kind, label_smoothing):
    pi = sequence_logps(logits, mb, vocab_size, mesh)
    return preference_loss(pi, mb["ref_logps"].to(pi.dtype), mb["pair_weight"], beta, kind, label_smoothing)


def dpo_loss(cfg, mesh):
    d = cfg.dpo
    if d.beta <= 0:
        from ..config import ConfigError

        raise ConfigError(f"dpo.beta={d.beta} must be positive (0.1 is the usual choice)")
    if not 0.0 <= d.label_smoothing < 0.5:
        from ..config import ConfigError

        raise ConfigError(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
    return functools.partial(_dpo_loss, vocab_size=cfg.model.vocab_size, mesh=mesh, beta=float(d.beta),
                             kind=d.loss, label_smoothing=float(d.label_smoothing))


def dpo_summary(sums: dict, units: float, for_eval: bool) -> dict:
    return {k: sums.get(k, 0.0) / max(units, 1.0) for k in METRICS}


# ---------------------------------------------------------------- the reference
def build_frozen_model(cfg, mesh, source: str | None):
    """Forward-only chunks on this layout (no gradient buffers): weights of `source`, else the seeded init."""
    from ..checkpoint.manager import CheckpointManager
    from ..parallel.parallelize import build_chunks

    chunks = build_chunks(cfg, mesh, frozen=True)
    if source:
        CheckpointManager(cfg, mesh).load_weights(source, chunks, None)
    return chunks


@contextlib.contextmanager
def adapters_off(chunks):
    """The LoRA policy as its base model: every adapter's scale set to 0 (exactly W x), eval mode."""
    from ..parallel.lora import LoRALinear

    saved = []
    for chunk in chunks:
        saved.append((chunk, chunk.training))
        chunk.train(False)
        for m in chunk.modules():
            if isinstance(m, LoRALinear):
                saved.append((m, m.scale))
                m.scale = 0.0
    try:
        yield
    finally:
        for obj, value in saved:
            if isinstance(obj, torch.nn.Module) and isinstance(value, bool):
                obj.train(value)
            else:
                obj.scale = value


def _logps_only(logits, mb, *, vocab_size, mesh):
    logps = sequence_logps(logits, mb, vocab_size, mesh)
    return logps.sum(), {"logps": logps}


class Reference:
    """Reference log-probs for micro-batches: live (a frozen model, forward-only) or precomputed."""

    def __init__(self, cfg, mesh, chunks, context=contextlib.nullcontext):
        self.cfg, self.mesh, self.chunks, self.context = cfg, mesh, chunks, context
        self.tables: dict[int, np.ndarray] = {}  # pair set uid -> [n, 2] (precomputed)

    @torch.no_grad()
    def logps(self, microbatches: list[dict]) -> list[torch.Tensor | None]:
        """Per micro-batch [2P] on the last pipeline stage (None elsewhere: only the loss reads them)."""
        from ..training.schedules import forward_backward

        fn = functools.partial(_logps_only, vocab_size=self.cfg.model.vocab_size, mesh=self.mesh)
        with self.context():
            results = forward_backward(self.chunks, microbatches, fn, self.mesh,
                                       schedule=self.cfg.parallel.pp_schedule, forward_only=True)
        if not self.mesh.is_last_stage:
            return [None] * len(microbatches)
        return [r["logps"].float() for r in results]

    def prepare(self, microbatches: list[dict], step) -> list[dict]:
        if self.tables:
            for mb in microbatches:
                table = self.tables[int(mb["pair_set"])]
                keys = mb["pair_key"].cpu().numpy()
                mb["ref_logps"] = torch.from_numpy(table[keys].reshape(-1).copy()).to(self.mesh.device)
            return microbatches
        for mb, ref in zip(microbatches, self.logps(microbatches)):
            mb["ref_logps"] = ref if ref is not None else torch.zeros(mb["score_index"].numel(), device=self.mesh.device)
        return microbatches

    # ------------------------------------------------------------ precomputation
    def precompute(self, sets: dict, run_dir: Path) -> None:
        """Reference log-probs of every pair of every set, computed once (or read back), then the model freed."""
        from ..checkpoint import format as fmt

        out_dir = Path(run_dir) / "reference_logps"
        for name, data in sets.items():
            path = out_dir / f"{name}.npy"
            if not path.is_file():
                table = self._compute(data)
                if self.mesh.rank == 0:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(path.name + ".tmp.npy")
                    np.save(tmp, table)
                    tmp.replace(path)
                    fmt.write_json_atomic(out_dir / f"{name}.json", {"pairs": len(data), "set": name,
                                                                   "reference": self.cfg.dpo.reference
                                                                   or self.cfg.checkpoint.load})
                self.mesh.barrier()
            table = np.load(path)
            if table.shape != (len(data), 2):
                raise ValueError(f"{path} holds {table.shape[0]} pairs but the set {name} has {len(data)}; remove "
                                 f"{out_dir} to recompute the reference log-probs")
            self.tables[data.uid] = table
        self.chunks = None  # the reference model is no longer needed

    def _compute(self, data) -> np.ndarray:
        from ..parallel import comm
        from ..training.loop import to_device

        mb_pairs = self.cfg.train.micro_batch
        n, dp = len(data), self.mesh.dp
        table = np.zeros((n, 2), dtype=np.float32)
        per_rank = -(-n // dp)
        mine = list(range(self.mesh.dp_rank * per_rank, min(n, (self.mesh.dp_rank + 1) * per_rank)))
        # Every DP rank runs the same number of micro-batches (padded with pair 0, weight 0).
        count = -(-per_rank // mb_pairs)
        mbs, keys = [], []
        for j in range(count):
            pos = mine[j * mb_pairs:(j + 1) * mb_pairs]
            pad = mb_pairs - len(pos)
            mbs.append(to_device(collate_pairs(data._load(pos + [0] * pad), data.seq_len, False), self.mesh.device))
            keys.append(pos)
        found = []
        if mbs:
            for pos, ref in zip(keys, self.logps(mbs)):
                if ref is not None:
                    vals = ref.cpu().numpy().reshape(-1, 2)
                    found += [(p, vals[i].tolist()) for i, p in enumerate(pos)]
        for part in comm.all_gather_object(found):
            for p, v in part:
                table[p] = v
        return table


# ---------------------------------------------------------------- task and command
def dpo_task(cfg, mesh) -> Task:
    if cfg.model.head != "lm":
        from ..config import ConfigError

        raise ConfigError("dpo trains a language model: model.head must be lm (a reward model is trained with "
                          "`jinpan reward`)")
    train, evals = build_pair_data(cfg)
    if mesh.rank == 0 and (train.dropped or any(e.dropped for e in evals.values())):
        print(f"[dpo] left out {train.dropped} training / {sum(e.dropped for e in evals.values())} held-out "
              f"pairs longer than train.seq_len={cfg.train.seq_len}", flush=True)
    lora_base = cfg.train.trainable == "lora" and not cfg.dpo.reference
    task = Task(name="dpo", train_data=train, eval_sets=evals if cfg.train.eval_interval > 0 else {},
                loss_fn=dpo_loss(cfg, mesh), denominator=pair_count, summarize=dpo_summary,
                tokens_per_step=train.tokens_per_step())
    if lora_base:
        # The reference is the policy itself with the adapters off: bound once the policy is built.
        holder: dict = {}

        def build(cfg_, mesh_):
            from ..parallel.parallelize import build_model

            chunks = build_model(cfg_, mesh_)
            holder["ref"] = Reference(cfg, mesh, chunks, context=lambda: adapters_off(chunks))
            return chunks

        def prepare(mbs, step):
            return holder["ref"].prepare(mbs, step)

        task.build_model, task.prepare = build, prepare
        if cfg.dpo.precompute_reference:
            raise_config("dpo.precompute_reference with train.trainable=lora: the base model is the policy "
                         "itself (no second copy to free); leave precompute_reference off")
        return task
    reference = Reference(cfg, mesh, build_frozen_model(cfg, mesh, cfg.dpo.reference or cfg.checkpoint.load))
    if cfg.dpo.precompute_reference:
        reference.precompute({d.name: d for d in [train, *evals.values()]}, Path(cfg.run_dir))
    task.prepare = reference.prepare
    return task


def raise_config(message: str):
    from ..config import ConfigError

    raise ConfigError(message)


def train_dpo(cfg):
    """`jinpan dpo` in this process (one rank)."""
    from ..training.loop import pretrain

    return pretrain(cfg, make_task=dpo_task)
