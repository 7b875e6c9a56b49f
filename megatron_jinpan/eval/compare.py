"""`jinpan eval compare`: several models (or stages) side by side, and a run's held-out metrics over steps.

    jinpan eval compare runs/eval/base runs/eval/cpt runs/eval/sft --names base,cpt,sft --output runs/eval/compare
    jinpan eval compare runs/cpt_stage1 runs/cpt_stage2 --data finance=valid.jsonl   # evaluate checkpoints
    jinpan eval compare runs/cpt --all-steps --data zh=data/demo/zh_valid --output runs/eval/cpt_steps

Each argument is one of:
- an eval output directory holding reports of the other commands (ppl.json, mcq.json, classify.json,
  generate.json, judge.json; also one level down, e.g. OUT/ppl/ppl.json) -> one column;
- a run directory with metrics.jsonl -> one column with its last eval_* values, and its eval_* curves
  over training steps in the plot;
- a checkpoint (or run dir) with --data NAME=PATH -> `eval ppl` is run on it first (OUTPUT/<name>/);
  with --all-steps every checkpoints/step_N of a run dir becomes a column (the run across stages/steps).
Output: compare.json, compare.md (one row per metric, one column per model) and compare.png.
"""
from __future__ import annotations

import json
from pathlib import Path

from .engine import EvalError
from .report import write_json, write_report

REPORTS = ("ppl", "mcq", "classify", "generate", "judge")


def _find_reports(d: Path) -> dict[str, dict]:
    found = {}
    for name in REPORTS:
        for candidate in (d / f"{name}.json", *sorted(d.glob(f"*/{name}.json"))):
            if candidate.is_file():
                found.setdefault(name, json.loads(candidate.read_text(encoding="utf-8")))
    return found


def metrics_of_reports(reports: dict[str, dict]) -> dict[str, float]:
    """Flat {metric name: value} from the reports of one model."""
    out: dict[str, float] = {}
    if "ppl" in reports:
        for r in reports["ppl"]["rows"]:
            label = "overall" if r["set"].startswith("overall") else r["set"]
            out[f"ppl/{label}"] = r["ppl"]
            out[f"loss/{label}"] = r["loss"]
    if "mcq" in reports:
        for r in reports["mcq"]["rows"]:
            for metric in ("acc", "acc_norm"):
                if r.get(metric) is not None:
                    out[f"{metric}/{r['task']}"] = r[metric]
    if "classify" in reports:
        c = reports["classify"]
        out["classify/accuracy"], out["classify/macro_f1"] = c["accuracy"], c["macro_f1"]
    if "generate" in reports:
        g = reports["generate"]
        for metric in ("exact", "contains", "numeric"):
            if g.get(metric) is not None:
                out[f"generate/{metric}"] = g[metric]
    if "judge" in reports:
        j = reports["judge"]
        for metric in ("win_rate", "tie_adjusted_win_rate", "candidate_mean_score"):
            if j.get(metric) is not None:
                out[f"judge/{metric}"] = j[metric]
    return out


def read_metrics_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{eval_* key: [(step, value)]} from a run's metrics.jsonl."""
    curves: dict[str, list] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in rec.items():
            if k.startswith("eval_") and isinstance(v, (int, float)):
                curves.setdefault(k, []).append((int(rec.get("step", 0)), float(v)))
    return curves


def _is_checkpoint(p: Path) -> bool:
    return (p / "meta.json").is_file() or (p / "checkpoints").is_dir() or (p / "config.json").is_file()


def collect(paths: list[str], output: Path, names: list[str] | None = None, data: list[str] | None = None,
            all_steps: bool = False) -> tuple[list[str], dict[str, dict], dict[str, dict]]:
    """(column names, {column: metrics}, {column: eval curves}) for the arguments."""
    from .ppl import run_ppl

    columns: list[tuple[str, Path]] = []
    for i, arg in enumerate(paths):
        p = Path(arg)
        if not p.exists():
            raise FileNotFoundError(f"compare: {p} does not exist")
        name = names[i] if names and i < len(names) else (p.name if p.name not in ("", ".") else str(p))
        if all_steps and (p / "checkpoints").is_dir():
            steps = sorted(s for s in (p / "checkpoints").glob("step_*") if s.is_dir())
            if not steps:
                raise EvalError(f"compare --all-steps: {p}/checkpoints has no step_N directories")
            columns += [(f"{name}@{int(s.name.split('_')[1])}", s) for s in steps]
        else:
            columns.append((name, p))
    metrics, curves = {}, {}
    for name, p in columns:
        reports = _find_reports(p) if p.is_dir() else {}
        if data and _is_checkpoint(p):
            out = output / name.replace("@", "_step")
            run_ppl({"checkpoint": str(p), "data": list(data), "output": str(out)})
            reports.update(_find_reports(out))
        col = metrics_of_reports(reports)
        if (p / "metrics.jsonl").is_file():
            curves[name] = read_metrics_curves(p)
            for k, series in curves[name].items():
                col.setdefault(f"last {k}", series[-1][1])
        if not col:
            raise EvalError(f"compare: {p} has no eval reports ({', '.join(r + '.json' for r in REPORTS)}) and no "
                            "metrics.jsonl; run `jinpan eval ...` into it first, or pass --data to evaluate it")
        metrics[name] = col
    return [n for n, _ in columns], metrics, curves


def plot(path: Path, names: list[str], metrics: dict, curves: dict) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[str]] = {}
    for key in sorted({k for col in metrics.values() for k in col if not k.startswith("last ")}):
        families.setdefault(key.split("/")[0], []).append(key)
    curve_keys = sorted({k for c in curves.values() for k in c if k.startswith("eval_loss")})
    panels = len(families) + (1 if curve_keys else 0)
    if not panels:
        return None
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    axes = [a for row in axes for a in row]
    for ax, (family, keys) in zip(axes, families.items()):
        for key in keys[:8]:
            ys = [metrics[n].get(key) for n in names]
            ax.plot(range(len(names)), [float("nan") if y is None else y for y in ys], marker="o",
                    label=key.split("/", 1)[1])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(family)
        ax.legend(fontsize=7)
    if curve_keys:
        ax = axes[len(families)]
        for run, c in curves.items():
            for key in curve_keys[:6]:
                if key in c:
                    ax.plot(*zip(*c[key]), marker="o", markersize=3, label=f"{run}: {key[5:]}")
        ax.set_xlabel("step")
        ax.set_title("held-out loss during training")
        ax.legend(fontsize=7)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(paths: list[str], output, names: str | list[str] | None = None, data: list[str] | None = None,
                all_steps: bool = False) -> dict:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    columns, metrics, curves = collect(paths, output, names, data, all_steps)
    keys = []
    for col in metrics.values():
        keys += [k for k in col if k not in keys]
    rows = [{"metric": k, **{c: metrics[c].get(k) for c in columns}} for k in keys]
    png = plot(output / "compare.png", columns, metrics, curves)
    data_out = {"columns": columns, "metrics": metrics, "curves": curves, "plot": str(png) if png else None}
    write_report(output, "compare", data_out, rows, ["metric", *columns], title="Comparison",
                 notes=["ppl/loss: lower is better; acc, F1, match rates and win rates: higher is better",
                        f"plot: {png}" if png else "no plot (nothing numeric to draw)"])
    write_json(output / "compare.json", data_out)
    return data_out
