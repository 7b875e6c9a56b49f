"""A checkpoint on the training engine, for forward-only evaluation on any (tp, pp, dp) layout.

    from megatron_jinpan.eval.engine import EvalModel
    model = EvalModel.open("runs/demo", tp=2, pp=2)            # every rank calls this (torchrun or --nproc)
    scores = model.score([(context_ids, continuation_ids), ...])  # [(sum log p(continuation), is_greedy)]
    texts  = model.generate_ids([prompt_ids, ...], max_new_tokens=32)

Every rank calls every method with the SAME requests (so the collectives of
the tensor/pipeline groups line up) and gets the same answers back. Requests
are cut into batches; each data-parallel replica runs a share of the batches
and the answers are gathered. Log-probabilities are read from the vocab-parallel
logits at the scored positions only, with the all-reduces of the training
cross-entropy (no rank ever holds full-vocabulary logits), run by
`forward_backward(forward_only=True)`, so any pipeline schedule works. Options
of a multiple-choice question that share the context and are one token long
share one row (one forward for all four letters).
"""
from __future__ import annotations

import json

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import device as devices
from ..config import ConfigError
from ..parallel import comm
from ..parallel.mesh import ParallelMesh
from ..training.schedules import forward_backward


class EvalError(ConfigError):
    """Bad input to an evaluation command; the message names the file/key and the fix."""


# ---------------------------------------------------------------- tokenizer of a checkpoint
def checkpoint_tokenizer_path(checkpoint, explicit: str | None = None) -> str:
    """The tokenizer to evaluate `checkpoint` with: `explicit`, an HF dir itself, the checkpoint's
    tokenizer/ dir, or its run config's data.tokenizer."""
    from ..checkpoint.convert import find_tokenizer
    from ..checkpoint.load import resolve_source

    if explicit:
        if not Path(explicit).exists():
            raise FileNotFoundError(f"tokenizer {explicit} does not exist; pass a sentencepiece .model or HF dir")
        return str(explicit)
    kind, path = resolve_source(checkpoint)
    if kind == "hf":
        return str(path)
    found = find_tokenizer(path)
    if found is None:
        raise EvalError(f"checkpoint {path} names no tokenizer (no tokenizer/ dir, no data.tokenizer in its "
                        "config.yaml); pass --tokenizer PATH (tokenizer=PATH for lm-eval)")
    return str(found)


def check_tokenizer_fits(tokenizer, model_cfg, tokenizer_path: str, checkpoint) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise EvalError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but checkpoint {checkpoint} "
                        f"has vocab_size={model_cfg.vocab_size}: they do not belong together; pass the tokenizer "
                        "the checkpoint was trained with (--tokenizer), or resize the checkpoint "
                        "(`jinpan convert resize`)")


def jsonl_records(path):
    """(line number, record) for each non-blank line of a JSONL file; malformed JSON is an EvalError
    naming `path:line`."""
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path}:{line}: not JSON ({exc.msg})") from None


# ---------------------------------------------------------------- mesh
def open_mesh(tp: int, pp: int, device: str = "auto") -> ParallelMesh:
    """This process's mesh: joins torchrun's / our launcher's process group, or a 1-process group."""
    return ParallelMesh.create(int(tp), int(pp), devices.resolve_device(device))


# ---------------------------------------------------------------- the scoring loss
def _score_loss(output, mb, *, vocab_size: int, mesh):
    """Sum of log p(label) per scored target and whether each of its tokens was the arg-max.

    Only the scored positions are read: `t_row`/`t_pos` pick them out of the vocab-split logits
    [b, s, V/tp], `t_label` are their labels and `t_owner` the target (request) each belongs to. The
    log-softmax normaliser and the arg-max go over the whole vocabulary with two small TP all-reduces
    (max, sum of exp) and a third for the label's logit, as in `vocab_parallel_cross_entropy`; no rank
    holds full-vocabulary logits. Padded vocabulary columns never count."""
    x = output[mb["t_row"], mb["t_pos"]].float()  # [N, V/tp]
    tp = mesh.tp
    start = mesh.tp_rank * x.shape[-1] if tp > 1 else 0
    if vocab_size - start < x.shape[-1]:
        x[:, max(vocab_size - start, 0):] = float("-inf")
    top = x.max(dim=-1).values
    if tp > 1:
        comm.all_reduce(top, mesh.tp_group, op=torch.distributed.ReduceOp.MAX)
    sum_exp = (x - top.unsqueeze(-1)).exp().sum(-1)
    labels = mb["t_label"]
    outside = (labels < start) | (labels >= start + x.shape[-1])
    target = x.gather(-1, (labels - start).masked_fill(outside, 0).unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    if tp > 1:
        comm.all_reduce(sum_exp, mesh.tp_group)
        comm.all_reduce(target, mesh.tp_group)
    logprob = (target - top - sum_exp.log()).double()
    missed = (target < top).double()  # not the greedy token
    n = mb["n_targets"]
    per_target = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, mb["t_owner"], logprob)
    misses = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, mb["t_owner"], missed)
    return per_target.sum(), {"target_logprob": per_target, "target_greedy": (misses == 0).double()}


def _pad_to(n: int, multiple: int = 8) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclass
class EvalModel:
    cfg: object          # Config (model section = the checkpoint's shape)
    chunks: list
    mesh: ParallelMesh
    tokenizer: object | None = None
    tokenizer_path: str | None = None
    checkpoint: str = ""
    micro_batch: int = 0  # rows per micro-batch inside one batch; 0 = batch / pp (fills the pipeline)
    dtype: str = "fp32"
    share_context: bool = True  # one row for one-token options of the same context (benchmarks turn it off)

    # ------------------------------------------------------------ building
    @classmethod
    def open(cls, checkpoint, tp: int = 1, pp: int = 1, *, device: str = "auto", dtype: str = "fp32",
             tokenizer: str | None = None, need_tokenizer: bool = True, mesh: ParallelMesh | None = None,
             pp_schedule: str = "1f1b", cfg=None) -> "EvalModel":
        """Load `checkpoint` (ours, any saved layout, or an HF dir) onto a (tp, pp) mesh in eval mode.

        `cfg` (a Config, default the defaults) supplies data/batch settings; its model and parallel
        sections are replaced by the checkpoint's shape and the mesh."""
        from ..checkpoint.load import load_parallel_model, model_config_of
        from ..config import Config
        from ..data.tokenizer import load_tokenizer

        if not Path(str(checkpoint)).exists():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; pass a run dir, a "
                                    "checkpoints/step_N dir or a Hugging Face model dir")
        model_cfg = model_config_of(checkpoint)  # fail on a bad checkpoint before any collective work
        tok, tok_path = None, None
        if need_tokenizer or tokenizer:
            tok_path = checkpoint_tokenizer_path(checkpoint, tokenizer)
            tok = load_tokenizer(tok_path, key="tokenizer")
            check_tokenizer_fits(tok, model_cfg, tok_path, checkpoint)
        if model_cfg.num_layers % int(pp):
            raise EvalError(f"pp={pp} does not divide the checkpoint's {model_cfg.num_layers} layers; pick a divisor")
        mesh = mesh or open_mesh(tp, pp, device)
        cfg = copy.deepcopy(cfg) if cfg is not None else Config()
        cfg.train.device = str(mesh.device)
        cfg.train.dtype = dtype
        cfg.parallel.pp_schedule = pp_schedule
        cfg.parallel.zero = 0
        cfg.parallel.sp = False  # any sequence length; nothing to save in forward-only work
        cfg, chunks = load_parallel_model(checkpoint, mesh, cfg)
        return cls(cfg=cfg, chunks=chunks, mesh=mesh, tokenizer=tok, tokenizer_path=tok_path,
                   checkpoint=str(checkpoint), dtype=dtype)

    def close(self) -> None:
        self.mesh.destroy()

    @property
    def max_length(self) -> int:
        return int(self.cfg.model.max_seq_len)

    def _autocast(self):
        return devices.autocast_context(self.mesh.device, self.dtype) if self.dtype != "fp32" else contextlib.nullcontext()

    # ------------------------------------------------------------ data-parallel sharing of batches
    def _run_sharded(self, batches: list, run_one) -> list:
        """run_one(batch) -> list of results, on every rank of the replica that owns the batch;
        returns the results of all batches, in order, on every rank."""
        mine = {i: run_one(b) for i, b in enumerate(batches) if i % self.mesh.dp == self.mesh.dp_rank}
        if self.mesh.dp > 1:
            merged: dict = {}
            for part in comm.all_gather_object(mine, self.mesh.dp_group):
                merged.update(part)
            mine = merged
        return [r for i in range(len(batches)) for r in mine[i]]

    def _from_last_stage(self, values: torch.Tensor | None, shape) -> torch.Tensor:
        """The last pipeline stage's tensor on every stage of this pipeline."""
        if self.mesh.pp == 1:
            return values
        out = values if self.mesh.is_last_stage else torch.empty(shape, dtype=torch.float64, device=self.mesh.device)
        comm.broadcast(out, src=self.mesh.pp_ranks[-1], group=self.mesh.pp_group)
        return out

    # ------------------------------------------------------------ scoring
    def score(self, requests: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy decode) per (context, continuation) ids.

        context + continuation longer than max_length + 1 is cut on the left (the continuation is
        kept whole, like lm-eval's `hf` model); the context must hold at least one token. Requests with
        the same context and a one-token continuation (the options A/B/C/D of an exam question) share
        one row: the context is run once and each option read at its last position."""
        L = self.max_length
        rows: list[dict] = []
        shared: dict = {}
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:
                raise EvalError(f"request {i}: empty context; start it with BOS (lm-eval does this)")
            if not cont:
                raise EvalError(f"request {i}: empty continuation; nothing to score")
            if len(cont) > L:
                raise EvalError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's "
                                f"max_seq_len={L}")
            full = (list(ctx) + list(cont))[-(L + 1):]
            n = len(full) - 1
            target = (i, n - len(cont), list(cont))  # (request, first scored position, labels)
            if len(cont) == 1 and self.share_context:
                key = tuple(full[:-1])
                if key in shared:
                    shared[key]["targets"].append(target)
                    continue
                shared[key] = row = {"tokens": full[:-1], "targets": [target]}
            else:
                row = {"tokens": full[:-1], "targets": [target]}
            rows.append(row)
        # Longest first: similar lengths share a batch (less padding), a failure to fit shows at once.
        rows.sort(key=lambda r: -len(r["tokens"]))
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        out: list = [None] * len(requests)
        for (req, _, _), result in zip([t for b in batches for r in b for t in r["targets"]],
                                       self._run_sharded(batches, self._score_batch)):
            out[req] = result
        return out

    def _score_batch(self, rows: list[dict]) -> list[tuple[float, bool]]:
        """One forward_backward over rows; results per target, in row order."""
        import functools

        width = min(_pad_to(max(len(r["tokens"]) for r in rows)), self.max_length)
        if self.cfg.parallel.sp and self.mesh.tp > 1:
            width = -(-width // self.mesh.tp) * self.mesh.tp
        mb = self.micro_batch or max(1, -(-len(rows) // self.mesh.pp))
        n_mb = -(-len(rows) // mb)
        if self.cfg.parallel.pp_schedule == "interleaved" and self.mesh.pp > 1:
            n_mb = -(-n_mb // self.mesh.pp) * self.mesh.pp  # that schedule needs a multiple of pp
        dev = self.mesh.device
        microbatches = []
        for m in range(n_mb):
            tokens = torch.zeros(mb, width, dtype=torch.long)
            t_row, t_pos, t_label, t_owner = [], [], [], []
            n_targets = 0
            for r, row in enumerate(rows[m * mb:(m + 1) * mb]):
                tokens[r, :len(row["tokens"])] = torch.tensor(row["tokens"])
                for _, first, labels in row["targets"]:
                    t_row += [r] * len(labels)
                    t_pos += range(first, first + len(labels))
                    t_label += labels
                    t_owner += [n_targets] * len(labels)
                    n_targets += 1
            as_long = functools.partial(torch.tensor, dtype=torch.long, device=dev)
            microbatches.append({"tokens": tokens.to(dev), "position_ids": torch.arange(width, device=dev).expand(mb, width),
                                 "t_row": as_long(t_row), "t_pos": as_long(t_pos), "t_label": as_long(t_label),
                                 "t_owner": as_long(t_owner), "n_targets": n_targets})
        total = sum(m["n_targets"] for m in microbatches)
        loss_fn = functools.partial(_score_loss, vocab_size=self.cfg.model.vocab_size, mesh=self.mesh)
        with torch.no_grad():
            results = forward_backward(self.chunks, microbatches, loss_fn, self.mesh,
                                       schedule=self.cfg.parallel.pp_schedule, forward_only=True,
                                       autocast=self._autocast)
        values = None
        if self.mesh.is_last_stage:
            values = torch.stack([torch.cat([r["target_logprob"] for r in results]),
                                  torch.cat([r["target_greedy"] for r in results])], dim=1).to(torch.float64)
        values = self._from_last_stage(values, (total, 2)).cpu()
        return [(float(values[k, 0]), bool(values[k, 1] > 0.5)) for k in range(total)]

    # ------------------------------------------------------------ generation
    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int = 64, greedy: bool = True,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     batch_size: int = 8) -> list[list[int]]:
        """Response ids per prompt (stopping at EOS, which is not included), via posttrain.generation."""
        try:
            from ..posttrain.generation import generate
        except ImportError as exc:
            raise EvalError("generation needs megatron_jinpan/posttrain/generation.py (the KV-cache generator), "
                            f"which is not installed here ({exc})") from None
        eos = self.tokenizer.eos_id if self.tokenizer is not None else 2
        batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]

        def run(batch):
            out = generate(self.chunks, self.mesh, [list(prompts[i]) for i in batch], max_new_tokens=max_new_tokens,
                           greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos,
                           seed=seed + batch[0], autocast=self._autocast)
            return [_cut_at(list(map(int, r)), eos) for r in out.responses]

        return self._run_sharded(batches, run)


def _cut_at(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids

