"""lm-evaluation-harness on our engine: `jinpan eval mcq` and `jinpan eval classify` run this on every rank.

    jinpan eval mcq --checkpoint runs/demo --exam data/demo/eval/exam --num_fewshot 2 --output_path runs/eval/mcq
    jinpan eval mcq --checkpoint C --tasks my_task --include_path my_tasks/ --nproc 4 --tp 2 --pp 2
    torchrun --nproc-per-node 4 -m megatron_jinpan eval mcq --checkpoint C --tp 2 --pp 2 --tasks ...

`run_harness(opts)` opens the checkpoint on a (tp, pp) mesh, wraps it in the
"jinpan" lm-eval model (eval/lm.py) and calls `lm_eval.simple_evaluate` with
lm-eval's own options; global rank 0 writes lm-eval's files (results_*.json and,
with --log_samples, samples_<task>_*.jsonl under output_path/<model>/, via
lm-eval's EvaluationTracker, exactly as `lm_eval --output_path` does) and our
report (mcq.json / mcq.md: one row per subject, the group rows first).
Nothing is downloaded: tasks are local configs (eval/tasks/, --include_path, or
the ones --exam writes), and the HF hub/datasets run offline.
"""
from __future__ import annotations

import os
from pathlib import Path

from .report import write_report

TASKS_DIR = Path(__file__).parent / "tasks"


def _offline() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def results_rows(results: dict) -> list[dict]:
    """One row per group and task of lm-eval's results (groups first), with n and acc/acc_norm(+stderr)."""
    groups = list((results.get("groups") or {}).keys())
    order = groups + [t for t in results.get("results", {}) if t not in groups]
    rows = []
    for name in order:
        res = results["results"].get(name) or results.get("groups", {}).get(name, {})
        row = {"task": name.strip(" -"), "kind": "group" if name in groups else "task",
               "n": (results.get("n-samples", {}).get(name) or {}).get("effective")}
        for key, value in res.items():
            if "," not in key or isinstance(value, str):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}[{filt}]"] = value
        if row["n"] is None and name in groups:
            subtasks = results.get("group_subtasks", {}).get(name, [])
            row["n"] = sum((results.get("n-samples", {}).get(t) or {}).get("effective", 0) for t in subtasks) or None
        rows.append(row)
    return rows


def run_harness(opts: dict):
    """Run lm-eval with opts on this rank; returns (results, model) on global rank 0, (None, model) elsewhere.

    opts: checkpoint, tp, pp, tasks (list), include_path (list), num_fewshot, batch_size, limit,
    log_samples, output_path, tokenizer, dtype, device, micro_batch, seed, keep_open."""
    _offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .engine import EvalModel
    from .lm import JinpanLM

    model = opts.get("model") or EvalModel.open(opts["checkpoint"], int(opts.get("tp", 1)), int(opts.get("pp", 1)),
                                                device=opts.get("device", "auto"), dtype=opts.get("dtype", "fp32"),
                                                tokenizer=opts.get("tokenizer"))
    lm = JinpanLM(model=model, batch_size=opts.get("batch_size") or None, micro_batch=opts.get("micro_batch", 0))
    include = [str(TASKS_DIR)] + [str(p) for p in opts.get("include_path") or []]
    seed = int(opts.get("seed", 0))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(opts["tasks"]), num_fewshot=opts.get("num_fewshot"), limit=opts.get("limit"),
        log_samples=bool(opts.get("log_samples")),
        task_manager=TaskManager(include_path=include, include_defaults=bool(opts.get("builtin_tasks"))),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=int(opts.get("bootstrap_iters", 0)), verbosity="WARNING")
    if model.mesh.rank != 0:
        results = None
    return results, model


def save_lm_eval_outputs(results: dict, output_path, model_args: str = "") -> dict:
    """lm-eval's own files (what `lm_eval --output_path --log_samples` writes); returns the samples."""
    from lm_eval.loggers import EvaluationTracker

    samples = results.pop("samples", None)
    tracker = EvaluationTracker(output_path=str(output_path))
    tracker.general_config_tracker.model_name = "jinpan"
    tracker.general_config_tracker.model_name_sanitized = "jinpan"
    tracker.general_config_tracker.model_args = model_args
    tracker.save_results_aggregated(results=results, samples=samples)
    if samples:
        for task_name in results["configs"]:
            if task_name in samples:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return samples or {}


def mcq_report(results: dict, output_path, opts: dict, name: str = "mcq") -> list[dict]:
    rows = results_rows(results)
    cols = ["task", "n"] + [c for c in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
                            if any(c in r for r in rows)]
    data = {"checkpoint": str(opts.get("checkpoint")), "layout": {"tp": opts.get("tp", 1), "pp": opts.get("pp", 1)},
            "tasks": list(opts.get("tasks") or []), "num_fewshot": opts.get("num_fewshot"),
            "limit": opts.get("limit"), "rows": rows}
    write_report(output_path, name, data, rows, cols, title=f"Multiple choice: {opts.get('checkpoint')}",
                 notes=[f"num_fewshot={opts.get('num_fewshot')}, limit={opts.get('limit')}, "
                        f"acc and acc_norm are lm-eval's definitions (acc_norm: arg-max of log-likelihood divided by the option's length in characters)"])
    return rows


def classification_metrics(golds: list[int], preds: list[int], labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and macro-F1 (classes with no support count 0)."""
    per = []
    for k, label in enumerate(labels):
        tp = sum(1 for g, p in zip(golds, preds) if g == k and p == k)
        fp = sum(1 for g, p in zip(golds, preds) if g != k and p == k)
        fn = sum(1 for g, p in zip(golds, preds) if g == k and p != k)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per.append({"class": label, "precision": precision, "recall": recall, "f1": f1, "support": tp + fn,
                    "predicted": tp + fp})
    n = len(golds)
    return {"n": n, "accuracy": sum(1 for g, p in zip(golds, preds) if g == p) / n if n else 0.0,
            "macro_f1": sum(r["f1"] for r in per) / len(per) if per else 0.0, "per_class": per}


def predictions_from_samples(samples: list[dict]) -> tuple[list[int], list[int]]:
    """(gold, arg-max log-likelihood choice) per doc of an lm-eval multiple_choice task's samples."""
    golds, preds = [], []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        preds.append(max(range(len(lls)), key=lambda i: lls[i]))
        golds.append(int(s["target"]))
    return golds, preds
