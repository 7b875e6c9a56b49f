"""lm-eval task configs for local files (nothing is downloaded): exams and classification sets.

    from megatron_jinpan.eval.local_tasks import write_exam_tasks, write_classify_task
    group, subjects = write_exam_tasks("data/demo/eval/exam", "runs/eval/tasks", name="demo_exam")
    # -> runs/eval/tasks/demo_exam_<subject>.yaml per subject + the group demo_exam.yaml;
    #    run them with include_path="runs/eval/tasks", tasks=[group]

Exam directory layouts (C-Eval, CMMLU and MMLU-JSONL as distributed):
    DIR/{dev,val,test}/SUBJECT[_split].csv|jsonl     or     DIR/SUBJECT_{dev,val,test}.csv|jsonl
CSV columns: question, A, B, C, D[, E...], answer (a letter)[, explanation] (header case ignored,
extra columns such as CMMLU's index are ignored). JSONL: {"question", "choices": [...], "answer": int or
letter}. The evaluated split is `val` when present, else `test`; k-shot examples come from `dev` (first k).

Each subject config `include`s the shipped template eval/tasks/_exam_zh_yaml (CSV: "答案：" prompt) or
_exam_en_yaml (JSONL: "Answer:" prompt); the group config averages acc/acc_norm over subjects weighted by
their size (lm-eval's own aggregation). Every file is checked first: a missing column, an answer outside
the options, an empty file or directory fails with the file and line named.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import yaml

from .engine import EvalError, jsonl_records

TEMPLATES = Path(__file__).parent / "tasks"
SPLITS = ("dev", "val", "test")
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------- exams: discovery and checks
def discover_exam(exam_dir) -> tuple[str, dict[str, dict[str, Path]]]:
    """(format "csv"|"jsonl", {subject: {split: file}}) of an exam directory."""
    root = Path(exam_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"exam directory {root} does not exist")
    found: dict[str, dict[str, Path]] = {}
    formats = set()
    for split in SPLITS:
        candidates = list((root / split).glob("*")) if (root / split).is_dir() else []
        candidates += list(root.glob(f"*_{split}.*"))
        for f in sorted(candidates):
            if f.suffix not in (".csv", ".jsonl") or not f.is_file():
                continue
            stem = f.stem[: -len(split) - 1] if f.stem.endswith("_" + split) else f.stem
            found.setdefault(stem, {})[split] = f
            formats.add(f.suffix[1:])
    if not found:
        raise EvalError(f"exam directory {root} has no exam files; expected {root}/val/SUBJECT_val.csv "
                        f"(C-Eval), {root}/test/SUBJECT.csv (CMMLU) or SUBJECT_val.jsonl files with "
                        "dev/val/test splits")
    if len(formats) > 1:
        raise EvalError(f"exam directory {root} mixes .csv and .jsonl files; keep one format per directory")
    return formats.pop(), found


def _answer_index(raw, n_options: int, where: str) -> int:
    text = str(raw).strip() if raw is not None else ""
    if isinstance(raw, int) and not isinstance(raw, bool):
        index = raw
    elif text.isdigit():
        index = int(text)
    elif len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    else:
        raise EvalError(f"{where}: answer {raw!r} is not an option letter (A-{LETTERS[n_options - 1]}) "
                        "or an option index; fix the answer column")
    if not 0 <= index < n_options:
        raise EvalError(f"{where}: answer {raw!r} is outside the {n_options} options "
                        f"(A-{LETTERS[n_options - 1]}); fix the answer or add the option column")
    return index


def check_exam_csv(path: Path, need_answers: bool = True) -> int:
    """Rows of a C-Eval/CMMLU CSV after checking columns and answers; errors name file:line."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise EvalError(f"{path}: empty file; expected a header question,A,B,C,D,answer")
        cols = [h.strip().lower() for h in header]
        options = []
        for letter in LETTERS:
            if letter.lower() not in cols:
                break
            options.append(letter)
        missing = [c for c in ("question", "answer") if c not in cols]
        if missing or len(options) < 2:
            missing += [] if len(options) >= 2 else ["A", "B"][len(options):]
            raise EvalError(f"{path}:1: missing column(s) {', '.join(missing)}; the header must be "
                            f"question,A,B,C,D,answer[,explanation] (got {','.join(header)})")
        q, a = cols.index("question"), cols.index("answer")
        rows = 0
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise EvalError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}; "
                                "quote fields that contain commas")
            if not row[q].strip():
                raise EvalError(f"{path}:{line}: empty question")
            if need_answers:
                _answer_index(row[a], len(options), f"{path}:{line}")
            rows += 1
    if rows == 0:
        raise EvalError(f"{path}: no questions after the header")
    return rows


def check_exam_jsonl(path: Path, need_answers: bool = True) -> int:
    rows = 0
    for line, rec in jsonl_records(path):
        where = f"{path}:{line}"
        if not isinstance(rec, dict) or "question" not in rec or "choices" not in rec:
            raise EvalError(f"{where}: needs fields question, choices (a list) and answer (an index)")
        if not isinstance(rec["choices"], list) or not 2 <= len(rec["choices"]) <= len(LETTERS):
            raise EvalError(f"{where}: choices must be a list of 2-{len(LETTERS)} options")
        if need_answers:
            if "answer" not in rec:
                raise EvalError(f"{where}: missing field answer (the index of the right choice)")
            _answer_index(rec["answer"], len(rec["choices"]), where)
        rows += 1
    if rows == 0:
        raise EvalError(f"{path}: no questions")
    return rows


def _subject_title(subject: str) -> str:
    return subject.replace("_", " ").strip()


def _write_yaml(path: Path, tree: dict) -> None:
    # Atomic: under torchrun every rank writes the same configs.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def write_exam_tasks(exam_dir, out_dir, name: str = "exam", split: str | None = None,
                     num_fewshot: int = 0, subjects: list[str] | None = None) -> tuple[str, list[str]]:
    """Write one lm-eval config per subject + a group config into out_dir; returns (group, task names)."""
    fmt, found = discover_exam(exam_dir)
    if subjects:
        unknown = sorted(set(subjects) - set(found))
        if unknown:
            raise EvalError(f"subject(s) {', '.join(unknown)} not in {exam_dir}; it has {', '.join(sorted(found))}")
        found = {s: found[s] for s in subjects}
    check = check_exam_csv if fmt == "csv" else check_exam_jsonl
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = TEMPLATES / ("_exam_zh_yaml" if fmt == "csv" else "_exam_en_yaml")
    tasks = []
    for subject, files in sorted(found.items()):
        use = split or ("val" if "val" in files else "test")
        if use not in files:
            raise EvalError(f"{exam_dir}: subject {subject} has no {use} split (has {', '.join(sorted(files))})")
        check(files[use])
        data_files = {use: str(files[use].resolve())}
        if num_fewshot > 0:
            if "dev" not in files:
                raise EvalError(f"{exam_dir}: subject {subject} has no dev split for --num_fewshot {num_fewshot}; "
                                "add dev files or use --num_fewshot 0")
            if check(files["dev"]) < num_fewshot:
                raise EvalError(f"{files['dev']}: fewer than {num_fewshot} dev questions for {num_fewshot}-shot")
            data_files["dev"] = str(files["dev"].resolve())
        elif "dev" in files:
            data_files["dev"] = str(files["dev"].resolve())
        title = _subject_title(subject)
        description = (f"以下是关于{title}的单项选择题，请选出其中的正确答案。\n\n" if fmt == "csv" else
                       f"The following are multiple choice questions (with answers) about {title}.\n\n")
        task = f"{name}_{subject}"
        tree = {"include": str(template.resolve()), "task": task, "tag": [f"{name}_subjects"],
                "dataset_kwargs": {"data_files": data_files}, "test_split": use, "description": description}
        if "dev" not in data_files:
            tree["fewshot_split"] = None
        _write_yaml(out / f"{task}.yaml", tree)
        tasks.append(task)
    agg = [{"metric": m, "aggregation": "mean", "weight_by_size": True} for m in ("acc", "acc_norm")]
    _write_yaml(out / f"{name}.yaml", {"group": name, "task": tasks, "aggregate_metric_list": agg,
                                        "metadata": {"version": 1.0}})
    return name, tasks


# ---------------------------------------------------------------- classification
def parse_labels(spec: str | None) -> dict[str, str]:
    """"pos:积极,neg:消极" (label:word) or "pos,neg" (the label is its own word) -> {label: word}."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        label, _, word = item.partition(":")
        out[label.strip()] = (word or label).strip()
    return out


def read_classify_jsonl(path, text_field: str = "text", label_field: str = "label",
                        labels: dict[str, str] | None = None) -> tuple[list[dict], dict[str, str]]:
    """Records of a classification JSONL and the label words (given, or the labels seen in file order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classification data {path} does not exist")
    records, seen = [], {}
    for line, rec in jsonl_records(path):
        if not isinstance(rec, dict) or text_field not in rec or label_field not in rec:
            raise EvalError(f"{path}:{line}: needs fields {text_field!r} and {label_field!r} "
                            "(set --text-field/--label-field)")
        label = str(rec[label_field])
        if labels and label not in labels:
            raise EvalError(f"{path}:{line}: label {label!r} is not one of --labels {', '.join(labels)}")
        seen.setdefault(label, label)
        records.append(rec)
    if not records:
        raise EvalError(f"{path}: no records")
    labels = labels or seen
    if len(labels) < 2:
        raise EvalError(f"{path}: only one label ({next(iter(labels))}); classification needs two or more "
                        "(list them with --labels)")
    return records, labels


def _jinja_prompt(prompt: str) -> str:
    """"{text}\\n情感：" (Python-style fields) -> the Jinja template lm-eval renders."""
    return re.sub(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})", r"{{\1}}", prompt)


def write_classify_task(data, out_dir, name: str, labels: dict[str, str], prompt: str = "{text}\n答案：",
                        text_field: str = "text", label_field: str = "label", fewshot_data=None,
                        target_delimiter: str = "") -> str:
    """One lm-eval multiple_choice config scoring the label words; returns its task name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(labels)
    data_files = {"test": str(Path(data).resolve())}
    if fewshot_data:
        read_classify_jsonl(fewshot_data, text_field, label_field, labels)
        data_files["dev"] = str(Path(fewshot_data).resolve())
    tree = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files},
        "output_type": "multiple_choice", "test_split": "test",
        "fewshot_split": "dev" if fewshot_data else None, "fewshot_config": {"sampler": "first_n"},
        "doc_to_text": _jinja_prompt(prompt),
        "doc_to_choice": [labels[n] for n in names],
        "doc_to_target": "{{ " + json.dumps(names, ensure_ascii=False) + f".index({label_field} | string) }}}}",
        "target_delimiter": target_delimiter,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "labels": names},
    }
    _write_yaml(out / f"{name}.yaml", tree)
    return name
