"""`train.eval_tasks`: multiple-choice / classification tasks at every eval_interval of a training run.

    train:
      eval_interval: 100
      eval_tasks:
        - {name: exam, exam: data/demo/eval/exam, num_fewshot: 0, limit: 50}
        - {name: sentiment, classify: data/demo/eval/sentiment.jsonl, labels: "pos:积极,neg:消极",
           prompt: "{text}\\n情感："}
        - {name: my_task, task: my_task, include_path: my_tasks/}     # any local lm-eval config

Each eval logs eval_acc_<name> (and eval_acc_norm_<name> for exams, eval_macro_f1_<name> for
classification) to metrics.jsonl and TensorBoard, so a drifting stage shows while it runs. The live
training chunks are scored through the "jinpan" lm-eval model (eval/lm.py) on the training layout,
every rank taking part; no copy of the weights is made.
"""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError

KEYS = {"name", "exam", "classify", "task", "include_path", "num_fewshot", "limit", "labels", "prompt", "split",
        "text_field", "label_field", "batch_size"}


def _tasks_of(cfg) -> list[dict]:
    """Validated eval_tasks entries with their lm-eval task names (configs written under run_dir/eval_tasks)."""
    from .local_tasks import parse_labels, read_classify_jsonl, write_classify_task, write_exam_tasks

    out_dir = Path(cfg.run_dir) / "eval_tasks"
    specs = []
    for i, entry in enumerate(cfg.train.eval_tasks):
        key = f"train.eval_tasks[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{key} must be a mapping with a name and one of exam/classify/task, got {entry!r}")
        unknown = sorted(set(entry) - KEYS)
        if unknown:
            raise ConfigError(f"unknown key {key}.{unknown[0]}; valid keys: {', '.join(sorted(KEYS))}")
        kinds = [k for k in ("exam", "classify", "task") if k in entry]
        if len(kinds) != 1:
            raise ConfigError(f"{key} needs exactly one of exam: DIR, classify: JSONL or task: LM_EVAL_TASK")
        name, spec = str(entry["name"]), dict(entry)
        include = [str(p) for p in (entry.get("include_path") or [])] if not isinstance(
            entry.get("include_path"), str) else [entry["include_path"]]
        if "exam" in entry:
            task, _ = write_exam_tasks(entry["exam"], out_dir / name, name=f"train_{name}",
                                       split=entry.get("split"), num_fewshot=int(entry.get("num_fewshot") or 0))
            include.append(str(out_dir / name))
        elif "classify" in entry:
            labels = parse_labels(entry.get("labels"))
            text_field, label_field = entry.get("text_field", "text"), entry.get("label_field", "label")
            _, labels = read_classify_jsonl(entry["classify"], text_field, label_field, labels or None)
            task = write_classify_task(entry["classify"], out_dir / name, f"train_{name}", labels,
                                       prompt=entry.get("prompt", "{text}\n答案："), text_field=text_field,
                                       label_field=label_field)
            include.append(str(out_dir / name))
            spec["label_list"] = list(labels)
        else:
            task = str(entry["task"])
        spec.update(lm_eval_task=task, include=include)
        specs.append(spec)
    return specs


def training_eval_hook(cfg):
    """Task.extra_eval for train.eval_tasks: (chunks, mesh) -> {eval_acc_<name>: ...} on every rank."""
    if not cfg.train.eval_tasks:
        return None
    if not cfg.data.tokenizer:
        raise ConfigError("train.eval_tasks needs data.tokenizer (the tasks are text)")
    specs = _tasks_of(cfg)  # configs written and files checked before training starts

    def extra_eval(chunks, mesh) -> dict:
        from ..data.tokenizer import load_tokenizer
        from ..parallel import comm
        from .engine import EvalModel
        from .harness import classification_metrics, predictions_from_samples, run_harness

        model = EvalModel(cfg=cfg, chunks=chunks, mesh=mesh, tokenizer=load_tokenizer(cfg.data.tokenizer),
                          tokenizer_path=cfg.data.tokenizer, checkpoint=f"{cfg.run_dir} (training)",
                          dtype=cfg.train.dtype)
        metrics: dict = {}
        for spec in specs:
            results, _ = run_harness({"model": model, "tasks": [spec["lm_eval_task"]], "include_path": spec["include"],
                                      "num_fewshot": spec.get("num_fewshot"), "limit": spec.get("limit"),
                                      "batch_size": spec.get("batch_size"), "log_samples": "classify" in spec})
            if results is None:
                continue
            name, task = spec["name"], spec["lm_eval_task"]
            res = (results.get("groups") or {}).get(task) or results["results"][task]
            metrics[f"eval_acc_{name}"] = float(res["acc,none"])
            if res.get("acc_norm,none") is not None:
                metrics[f"eval_acc_norm_{name}"] = float(res["acc_norm,none"])
            if "classify" in spec:
                golds, preds = predictions_from_samples(results["samples"][task])
                metrics[f"eval_macro_f1_{name}"] = classification_metrics(golds, preds, spec["label_list"])["macro_f1"]
        # lm-eval returns results on global rank 0 only; the metrics are logged by the last stage.
        shared = [m for m in comm.all_gather_object(metrics) if m]
        return shared[0] if shared else {}

    return extra_eval
