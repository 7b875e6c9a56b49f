"""`jinpan eval ppl`: held-out loss and perplexity per domain (token-weighted), on any (tp, pp, dp) layout.

    jinpan eval ppl --checkpoint runs/cpt --data finance=data/demo/zh_finance_valid_text_document \\
        --data general=valid.jsonl --output runs/eval/ppl [--nproc 4 --tp 2 --pp 2]
    jinpan eval ppl --checkpoint runs/cpt --eval-iters 4     # the run's own held-out sets, as training did

It is the training loop's `evaluate` (training/loop.py): the same held-out
datasets (`data.valid` entries), the same batches, the same forward-only
`forward_backward` and vocab-parallel loss, so `--eval-iters N` with the run's
train.seq_len/global_batch reproduces the eval_loss_<set> the run logged for
that checkpoint. Settings come from the checkpoint's config.yaml (seq_len, global
batch, seed, packing), overridable with --seq-len/--global-batch/--micro-batch.

Without --eval-iters every set is read exactly once ("full pass"): the last
batch's samples beyond the end of the set are masked out (the training eval
wraps around instead). A `--data` path is a preprocessed prefix (.bin/.idx)
or a .jsonl (tokenized first with the checkpoint's tokenizer into
OUTPUT/data/, EOD appended like `jinpan preprocess --append-eod`).

Output: OUTPUT/ppl.json and ppl.md: per set tokens, loss, ppl; overall token-weighted.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..data.datasets import EvalData
from .engine import EvalError


class FullPassEvalData(EvalData):
    """EvalData whose wrapped-around samples (index >= len) carry no loss: each sample counted once."""

    def microbatches(self, i: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
        mbs = super().microbatches(i, dp_rank, dp_size)
        gb = self.cfg.train.global_batch
        first = i * gb + dp_rank * (gb // dp_size)
        n = len(self.source)
        row = 0
        for mb in mbs:
            for r in range(mb["loss_mask"].shape[0]):
                if first + row >= n:
                    mb["loss_mask"][r] = 0.0
                row += 1
        return mbs

    def passes(self) -> int:
        return -(-len(self.source) // self.cfg.train.global_batch)


def parse_data_specs(specs: list[str]) -> list[tuple[str, str]]:
    out, names = [], set()
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec).stem.removesuffix("_text_document")
        if not name or not path:
            raise EvalError(f"--data {spec!r} must look like NAME=PREFIX_OR_JSONL")
        if name in names:
            raise EvalError(f"--data name {name!r} is used twice; give each set its own name")
        names.add(name)
        out.append((name, path))
    return out


def prepare_data(specs: list[tuple[str, str]], tokenizer_path: str | None, work_dir: Path) -> list[dict]:
    """data.valid entries for the specs; .jsonl files are tokenized into work_dir/data/NAME once."""
    from ..data.preprocess import preprocess

    entries = []
    for name, path in specs:
        if path.endswith(".jsonl"):
            if not Path(path).is_file():
                raise FileNotFoundError(f"--data {name}={path} does not exist")
            if tokenizer_path is None:
                raise EvalError(f"--data {name}={path} is JSONL: pass --tokenizer to tokenize it")
            prefix = work_dir / "data" / name
            src = Path(path)
            stamp = prefix.with_suffix(".source")
            key = f"{src.resolve()}:{src.stat().st_mtime_ns}:{src.stat().st_size}:{tokenizer_path}"
            if not (stamp.is_file() and stamp.read_text() == key and prefix.with_suffix(".idx").is_file()):
                preprocess(str(src), tokenizer_path, str(prefix), append_eod=True, progress=False)
                stamp.write_text(key)
            path = str(prefix)
        entries.append({"path": path, "name": name})
    return entries


def base_config(checkpoint, overrides: dict):
    """The run's Config (from the checkpoint's config.yaml when it has one) with the eval overrides."""
    from ..checkpoint.load import resolve_source
    from ..config import Config, load_config

    kind, path = resolve_source(checkpoint)
    cfg = Config()
    if kind == "ours" and (path / "config.yaml").is_file():
        cfg = load_config(path / "config.yaml")
    t = cfg.train
    for key in ("seq_len", "global_batch", "micro_batch"):
        if overrides.get(key):
            setattr(t, key, int(overrides[key]))
    t.eval_interval = 1
    cfg.checkpoint.resume = "never"
    return cfg


def run_ppl(opts: dict) -> dict | None:
    """On every rank: per-set and overall loss/ppl (returned on the logging rank, None elsewhere)."""
    from ..data import build_eval_data
    from ..training.loop import evaluate
    from ..training.losses import language_model_loss
    from ..training.task import Task, language_model_summary
    from .engine import EvalModel, checkpoint_tokenizer_path
    from .report import write_report

    checkpoint = opts["checkpoint"]
    cfg = base_config(checkpoint, opts)
    out_dir = Path(opts.get("output") or "runs/eval/ppl")
    cfg.run_dir = str(out_dir)
    specs = parse_data_specs(opts.get("data") or [])
    if specs:
        tok = None
        if any(p.endswith(".jsonl") for _, p in specs):
            tok = checkpoint_tokenizer_path(checkpoint, opts.get("tokenizer"))
        cfg.data.valid = prepare_data(specs, tok, out_dir)
        cfg.data.mock = False
    elif not (cfg.data.valid or cfg.data.blend) or cfg.data.mock:
        raise EvalError(f"checkpoint {checkpoint} has no held-out sets in its config; pass --data NAME=PREFIX_OR_JSONL")
    model = EvalModel.open(checkpoint, int(opts.get("tp", 1)), int(opts.get("pp", 1)), device=opts.get("device", "auto"),
                           dtype=opts.get("dtype", "fp32"), need_tokenizer=False, cfg=cfg, mesh=opts.get("mesh"))
    try:
        mesh, cfg = model.mesh, model.cfg
        gb, mb = cfg.train.global_batch, cfg.train.micro_batch
        if gb % (mb * mesh.dp):
            raise EvalError(f"global batch {gb} is not divisible by micro batch {mb} x dp {mesh.dp}; "
                            "pass --global-batch / --micro-batch")
        loss_fn = language_model_loss(cfg.model.vocab_size, mesh)
        task = Task(name="ppl", train_data=None, loss_fn=loss_fn,
                    summarize=lambda sums, units, for_eval: {**language_model_summary(sums, units, for_eval),
                                                             "tokens": units})
        sets = build_eval_data(cfg)
        results: dict = {}
        if opts.get("eval_iters"):
            cfg.train.eval_iters = int(opts["eval_iters"])
            results = evaluate(model.chunks, sets, loss_fn, cfg, mesh, task)
            iters = {name: cfg.train.eval_iters for name in sets}
        else:
            iters = {}
            for name, data in sets.items():
                full = FullPassEvalData(cfg, data.source, name)
                one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_iters=full.passes()))
                results.update(evaluate(model.chunks, {name: full}, loss_fn, one, mesh, task))
                iters[name] = full.passes()
        report = None
        if mesh.is_logging_rank:
            rows = []
            total_tokens = total_loss = 0.0
            for name in sets:
                tokens, loss = results[f"eval_tokens_{name}"], results[f"eval_loss_{name}"]
                rows.append({"set": name, "tokens": int(tokens), "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                             "batches": iters[name], "samples": len(sets[name].source)})
                total_tokens += tokens
                total_loss += loss * tokens
            overall = total_loss / max(total_tokens, 1.0)
            rows.append({"set": "overall (token-weighted)", "tokens": int(total_tokens), "loss": overall,
                         "ppl": math.exp(min(overall, 50.0))})
            report = {"checkpoint": str(checkpoint), "seq_len": cfg.train.seq_len, "global_batch": gb,
                      "mode": f"eval_iters={opts['eval_iters']}" if opts.get("eval_iters") else "full pass",
                      "layout": {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp}, "rows": rows,
                      "metrics": {k: v for k, v in results.items() if isinstance(v, (int, float))}}
            write_report(out_dir, "ppl", report, rows, ["set", "samples", "tokens", "loss", "ppl"],
                         title=f"Perplexity: {checkpoint}",
                         notes=[f"seq_len={cfg.train.seq_len}, global_batch={gb}, {report['mode']}, "
                                f"layout tp={mesh.tp} pp={mesh.pp} dp={mesh.dp}"])
    except BaseException:
        if opts.get("mesh") is None:  # a failed run leaves no process group behind
            model.close()
        raise
    if not opts.get("keep_open"):
        model.close()
    return report

