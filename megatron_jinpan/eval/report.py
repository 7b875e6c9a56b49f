"""Every evaluation command writes NAME.json (everything) and NAME.md (the table a person reads).

    from megatron_jinpan.eval.report import write_report, markdown_table
    write_report("runs/eval", "ppl", {"checkpoint": ..., "rows": rows}, rows, ["set", "tokens", "loss", "ppl"])

JSON files are written atomically (a crash never leaves half a report); rows are
dicts; columns pick and order what the Markdown table shows.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def fmt_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt_value(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_json(path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(out_dir, name: str, data: dict, rows: list[dict], columns: list[str], title: str | None = None,
                 notes: list[str] | None = None, extra_tables: list[tuple[str, list[dict], list[str]]] = ()) -> Path:
    """out_dir/name.json (data) and out_dir/name.md (title, notes, the table); returns the JSON path."""
    out = Path(out_dir)
    path = write_json(out / f"{name}.json", data)
    parts = [f"# {title or name}", ""]
    for note in notes or []:
        parts.append(f"- {note}")
    if notes:
        parts.append("")
    parts += [markdown_table(rows, columns), ""]
    for heading, more_rows, more_cols in extra_tables:
        parts += [f"## {heading}", "", markdown_table(more_rows, more_cols), ""]
    (out / f"{name}.md").write_text("\n".join(parts), encoding="utf-8")
    return path
