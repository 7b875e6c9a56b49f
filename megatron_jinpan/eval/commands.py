"""`jinpan eval ...`: ppl, mcq, classify, generate, judge, compare (docs/eval.md).

    jinpan eval ppl --checkpoint runs/cpt --data finance=data/demo/valid_finance.jsonl --output runs/eval/ppl
    jinpan eval mcq --checkpoint runs/cpt --exam data/demo/eval/exam --num_fewshot 2 --output_path runs/eval/mcq
    jinpan eval classify --checkpoint runs/sft --data data/demo/eval/sentiment.jsonl --labels "pos:积极,neg:消极"
    jinpan eval generate --checkpoint runs/sft --input data/demo/eval/qa.jsonl --output runs/eval/gen
    jinpan eval judge --answers runs/eval/gen/answers.jsonl --judge-url http://host/v1 --judge-model gpt-4o
    jinpan eval compare runs/eval/stage1 runs/eval/stage2 --output runs/eval/compare

Engine commands run on every rank: under torchrun, or `--nproc N` spawns N
local workers (tp * pp * dp = N); the files are written by global rank 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..parallel.local import free_port, set_worker_env


# ---------------------------------------------------------------- running on ranks
def _worker(rank: int, world: int, port: int, entry, opts: dict) -> None:
    set_worker_env(rank, world, port)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    entry(opts)


def run_on_ranks(entry, opts: dict, nproc: int = 1):
    """entry(opts) on every rank: in this process under torchrun (or nproc=1), else on nproc spawned workers."""
    tp, pp = int(opts.get("tp", 1)), int(opts.get("pp", 1))
    world = int(os.environ.get("WORLD_SIZE", nproc))
    if world % (tp * pp):
        from .engine import EvalError

        raise EvalError(f"{world} processes do not divide into tp={tp} x pp={pp}; use --nproc as a multiple of "
                        f"{tp * pp}")
    if "WORLD_SIZE" in os.environ or nproc == 1:
        return entry(opts)
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    mp.spawn(_worker, args=(nproc, free_port(), entry, opts), nprocs=nproc, join=True)
    return None


def _is_writer() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _show(path: Path) -> None:
    if _is_writer() and path.is_file():
        print(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- entries (module level: spawned workers pickle them)
def _ppl_entry(opts: dict):
    from .ppl import run_ppl

    return run_ppl(opts)


def _mcq_entry(opts: dict):
    from .harness import mcq_report, run_harness, save_lm_eval_outputs

    results, model = run_harness(opts)
    if results is not None:
        save_lm_eval_outputs(results, opts["output_path"], model_args=f"checkpoint={opts['checkpoint']}")
        mcq_report(results, opts["output_path"], opts)
    model.close()


def _classify_entry(opts: dict):
    from .harness import classification_metrics, predictions_from_samples, run_harness, save_lm_eval_outputs
    from .report import write_report

    results, model = run_harness({**opts, "log_samples": True})
    if results is not None:
        samples = save_lm_eval_outputs(results, opts["output_path"], model_args=f"checkpoint={opts['checkpoint']}")
        golds, preds = predictions_from_samples(samples[opts["tasks"][0]])
        labels = list(opts["labels"])
        metrics = classification_metrics(golds, preds, labels)
        rows = [dict(r) for r in metrics["per_class"]]
        rows.append({"class": "macro avg", "precision": sum(r["precision"] for r in rows) / len(rows),
                     "recall": sum(r["recall"] for r in rows) / len(rows), "f1": metrics["macro_f1"],
                     "support": metrics["n"]})
        data = {"checkpoint": opts["checkpoint"], "data": opts["data"], "labels": opts["labels"],
                "prompt": opts["prompt"], "num_fewshot": opts.get("num_fewshot"), **metrics,
                "predictions": [{"doc_id": i, "gold": labels[g], "pred": labels[p]}
                                for i, (g, p) in enumerate(zip(golds, preds))]}
        write_report(opts["output_path"], "classify", data, rows, ["class", "precision", "recall", "f1", "support"],
                     title=f"Classification: {opts['checkpoint']} on {opts['data']}",
                     notes=[f"accuracy={metrics['accuracy']:.4f}, macro-F1={metrics['macro_f1']:.4f}, "
                            f"n={metrics['n']}", "prediction = label word with the highest log-likelihood"])
    model.close()


def _generate_entry(opts: dict):
    from .generate import run_generate

    return run_generate(opts)


# ---------------------------------------------------------------- commands
def _limit(text):
    if text is None:
        return None
    value = float(text)
    return int(value) if value >= 1 and float(text).is_integer() and "." not in str(text) else value


def _check_inputs(args, need_tokenizer: bool = True) -> None:
    """A missing/corrupt checkpoint or a tokenizer that does not fit it fails here, before any worker starts."""
    from ..checkpoint.load import model_config_of
    from ..data.tokenizer import load_tokenizer
    from .engine import check_tokenizer_fits, checkpoint_tokenizer_path

    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist; pass a run dir, a "
                                "checkpoints/step_N dir or a Hugging Face model dir")
    cfg = model_config_of(args.checkpoint)
    if need_tokenizer or args.tokenizer:
        path = checkpoint_tokenizer_path(args.checkpoint, args.tokenizer)
        check_tokenizer_fits(load_tokenizer(path, key="--tokenizer"), cfg, path, args.checkpoint)


def _engine_opts(args) -> dict:
    return {"checkpoint": args.checkpoint, "tp": args.tp, "pp": args.pp, "tokenizer": args.tokenizer,
            "dtype": args.dtype, "device": args.device, "micro_batch": args.micro_batch}


def cmd_ppl(args) -> int:
    _check_inputs(args, need_tokenizer=any(d.endswith(".jsonl") for d in args.data or []))
    out = Path(args.output)
    opts = {**_engine_opts(args), "data": args.data, "output": str(out), "eval_iters": args.eval_iters,
            "seq_len": args.seq_len, "global_batch": args.global_batch, "micro_batch": args.micro_batch}
    run_on_ranks(_ppl_entry, opts, args.nproc)
    _show(out / "ppl.md")
    return 0


def _harness_opts(args) -> dict:
    return {**_engine_opts(args), "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
            "limit": _limit(args.limit), "output_path": args.output_path, "seed": args.seed,
            "include_path": list(args.include_path or []), "builtin_tasks": args.builtin_tasks}


def cmd_mcq(args) -> int:
    from .engine import EvalError
    from .local_tasks import write_exam_tasks

    _check_inputs(args)
    opts = {**_harness_opts(args), "log_samples": args.log_samples}
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if args.exam:
        task_dir = Path(args.output_path) / "tasks"
        subjects = [s for s in (args.subjects or "").split(",") if s] or None
        group, _ = write_exam_tasks(args.exam, task_dir, name=args.exam_name or Path(args.exam).name,
                                    split=args.split, num_fewshot=args.num_fewshot or 0, subjects=subjects)
        opts["include_path"].append(str(task_dir))
        tasks.append(group)
    if not tasks:
        raise EvalError("name the tasks: --tasks T1,T2 (with --include_path DIR for your configs) or --exam DIR")
    opts["tasks"] = tasks
    run_on_ranks(_mcq_entry, opts, args.nproc)
    _show(Path(args.output_path) / "mcq.md")
    return 0


def cmd_classify(args) -> int:
    from .local_tasks import parse_labels, read_classify_jsonl, write_classify_task

    _check_inputs(args)
    labels = parse_labels(args.labels)
    _, labels = read_classify_jsonl(args.data, args.text_field, args.label_field, labels or None)
    name = args.name or Path(args.data).stem
    task_dir = Path(args.output_path) / "tasks"
    task = write_classify_task(args.data, task_dir, name, labels, prompt=args.prompt, text_field=args.text_field,
                               label_field=args.label_field, fewshot_data=args.fewshot_data,
                               target_delimiter=args.target_delimiter)
    opts = {**_harness_opts(args), "tasks": [task], "data": args.data, "labels": labels, "prompt": args.prompt}
    opts["include_path"].append(str(task_dir))
    run_on_ranks(_classify_entry, opts, args.nproc)
    _show(Path(args.output_path) / "classify.md")
    return 0


def cmd_generate(args) -> int:
    _check_inputs(args)
    opts = {**_engine_opts(args), "input": args.input, "output": args.output, "max_new_tokens": args.max_new_tokens,
            "greedy": not args.sample, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": args.seed, "template": args.template, "match": args.match, "batch_size": args.batch_size,
            "limit": args.limit, "question_field": args.question_field, "answer_field": args.answer_field}
    run_on_ranks(_generate_entry, opts, args.nproc)
    _show(Path(args.output) / "generate.md")
    return 0


def cmd_judge(args) -> int:
    from .judge import run_judge_command

    run_judge_command(args)
    _show(Path(args.output) / "judge.md")
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare

    run_compare(args.runs, args.output, names=args.names, data=args.data, all_steps=args.all_steps)
    _show(Path(args.output) / "compare.md")
    return 0


def _add_engine_args(p, batch: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, help="one of our checkpoints / run dirs (any layout) or an HF dir")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to evaluate with")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to evaluate with")
    p.add_argument("--nproc", type=int, default=1, help="local worker processes when not under torchrun")
    p.add_argument("--tokenizer", help="tokenizer (default: the checkpoint's tokenizer/ or run config)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (the device helper picks per rank)")
    p.add_argument("--micro-batch", "--micro_batch", dest="micro_batch", type=int, default=0,
                   help="rows per pipeline micro-batch (0: batch/pp)")


def _add_harness_args(p) -> None:
    p.add_argument("--num_fewshot", "--num-fewshot", dest="num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", default=None,
                   help="requests per forward (lm-eval's option; 'auto' = 16)")
    p.add_argument("--limit", default=None, help="lm-eval --limit: N docs per task, or a fraction < 1")
    p.add_argument("--include_path", "--include-path", dest="include_path", action="append",
                   help="more lm-eval task config dirs (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--builtin_tasks", "--builtin-tasks", dest="builtin_tasks", action="store_true",
                   help="also index lm-eval's built-in tasks (they download their data: not offline)")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluation: ppl, mcq, classify, generate, judge, compare",
                              description="Evaluate checkpoints on the training engine (docs/eval.md).")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    q = sub.add_parser("ppl", help="held-out loss/perplexity per domain (token-weighted)")
    _add_engine_args(q)
    q.add_argument("--data", action="append", help="NAME=PREFIX_or_JSONL (repeatable; default: the run's "
                                                   "held-out sets)")
    q.add_argument("--output", default="runs/eval/ppl", help="report directory")
    q.add_argument("--eval-iters", type=int, default=None,
                   help="batches per set, like train.eval_iters (default: each set exactly once)")
    q.add_argument("--seq-len", type=int, default=None)
    q.add_argument("--global-batch", type=int, default=None)
    q.set_defaults(func=cmd_ppl)

    q = sub.add_parser("mcq", help="multiple-choice exams through lm-evaluation-harness")
    _add_engine_args(q)
    _add_harness_args(q)
    q.add_argument("--tasks", help="comma-separated lm-eval task/group names")
    q.add_argument("--exam", help="a C-Eval/CMMLU CSV or MMLU JSONL directory (dev/val/test); becomes a task group")
    q.add_argument("--exam-name", help="group name of --exam (default: the directory name)")
    q.add_argument("--split", help="split of --exam to evaluate (default val, else test)")
    q.add_argument("--subjects", help="comma-separated subjects of --exam (default all)")
    q.add_argument("--log_samples", "--log-samples", dest="log_samples", action="store_true")
    q.add_argument("--output_path", "--output-path", dest="output_path", default="runs/eval/mcq")
    q.set_defaults(func=cmd_mcq)

    q = sub.add_parser("classify", help="label words by log-likelihood: per-class P/R/F1, macro-F1, accuracy")
    _add_engine_args(q)
    _add_harness_args(q)
    q.add_argument("--data", required=True, help="JSONL with a text and a label field per line")
    q.add_argument("--labels", help="label:word,... (default: the labels in the file, as their own words)")
    q.add_argument("--prompt", default="{text}\n答案：", help="prompt with {field} slots; the label word follows it")
    q.add_argument("--target-delimiter", default="", help="text between prompt and label word")
    q.add_argument("--text-field", default="text")
    q.add_argument("--label-field", default="label")
    q.add_argument("--fewshot-data", help="JSONL of labelled examples for --num_fewshot")
    q.add_argument("--name", help="task name (default: the data file's stem)")
    q.add_argument("--output_path", "--output-path", dest="output_path", default="runs/eval/classify")
    q.set_defaults(func=cmd_classify)

    q = sub.add_parser("generate", help="answers to questions, scored by exact/contains/numeric match")
    _add_engine_args(q)
    q.add_argument("--input", required=True, help="JSONL: question (or prompt/messages) and answer per line")
    q.add_argument("--output", default="runs/eval/generate")
    q.add_argument("--question-field", default="question")
    q.add_argument("--answer-field", default="answer")
    q.add_argument("--template", default=None, help="chat template (plain, llama2, or a Jinja file); "
                                                    "default: the question as is")
    q.add_argument("--max-new-tokens", type=int, default=64)
    q.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--top-k", type=int, default=0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--match", default="exact,contains,numeric", help="metrics to report")
    q.set_defaults(func=cmd_generate)

    q = sub.add_parser("judge", help="pairwise judging: an OpenAI-compatible judge or our reward model")
    from .judge import add_judge_args

    add_judge_args(q)
    q.set_defaults(func=cmd_judge)

    q = sub.add_parser("compare", help="put eval reports of several checkpoints/stages side by side (+ PNG)")
    q.add_argument("runs", nargs="+", help="eval output dirs, run dirs (metrics.jsonl) or report JSON files")
    q.add_argument("--names", help="comma-separated column names (default: the directory names)")
    q.add_argument("--data", action="append", help="NAME=PREFIX_or_JSONL: run `eval ppl` on checkpoint arguments")
    q.add_argument("--all-steps", action="store_true", help="every checkpoints/step_N of a run dir is a column")
    q.add_argument("--output", default="runs/eval/compare")
    q.set_defaults(func=cmd_compare)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="jinpan")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args()
    sys.exit(args.func(args))
