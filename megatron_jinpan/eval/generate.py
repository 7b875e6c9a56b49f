"""`jinpan eval generate`: answers to a JSONL of questions, scored by exact / contains / numeric match.

    jinpan eval generate --checkpoint runs/sft --input data/demo/eval/qa.jsonl --template plain \\
        --max-new-tokens 32 --output runs/eval/gen [--nproc 4 --tp 2 --pp 2] [--sample --temperature 0.7]

Input lines: {"question": ..., "answer": ... (a string, a number or a list of accepted answers)} (field
names: --question-field/--answer-field; "id" is kept), or chat records (OpenAI `messages`, ShareGPT
`conversations`, Alpaca `instruction/input/output`, as SFT reads them) whose last assistant turn is
the reference and whose earlier turns are the prompt (needs --template). With --template the question is one user turn
of that chat template (posttrain/chat.py, as SFT trained it) followed by the assistant header;
without, the prompt is BOS + the question. Decoding runs on the engine's KV-cache generator
(posttrain/generation.py) on any layout; data-parallel replicas split the questions.

Metrics (per answer, then averaged):
- exact:    normalised response == a normalised reference (case, spaces, outer punctuation ignored);
- contains: a normalised reference occurs in the normalised response;
- numeric:  the last number in the response equals the reference's number (a reference holding exactly
            one number, e.g. "70分钟"; commas and % ignored, relative tolerance 1e-6); questions without
            one are left out of it.
Output: OUTPUT/answers.jsonl ({id, question, reference, response, exact, contains, numeric} per line,
the input `jinpan eval judge` reads), generate.json and generate.md.
"""
from __future__ import annotations

import json
import re
import string
import time
import unicodedata
from pathlib import Path

from .engine import EvalError, jsonl_records

_PUNCT = string.punctuation + "。，、；：？！“”‘’（）【】《》…·"
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text)).lower().strip()
    text = re.sub(r"\s+", " ", text)
    return text.strip(_PUNCT + " ")


def numbers_in(text: str) -> list[float]:
    out = []
    for m in _NUMBER.findall(unicodedata.normalize("NFKC", str(text))):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            continue
    return out


def as_number(reference) -> float | None:
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return float(reference)
    found = numbers_in(str(reference))
    return found[0] if len(found) == 1 else None  # "70分钟", "94 minutes", "12.5%": the one number


def match(response: str, references: list) -> dict:
    """{exact, contains, numeric (None when no reference is a number)} for one response."""
    resp = normalize(response)
    refs = [normalize(r) for r in references]
    nums = [n for n in (as_number(r) for r in references) if n is not None]
    numeric = None
    if nums:
        found = numbers_in(response)
        numeric = bool(found) and any(abs(found[-1] - n) <= 1e-6 * max(1.0, abs(n)) for n in nums)
    return {"exact": any(resp == r for r in refs), "contains": any(r and r in resp for r in refs),
            "numeric": numeric}


def read_questions(path, question_field: str = "question", answer_field: str = "answer",
                   limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist; pass a JSONL of {{question, answer}} lines")
    out = []
    for line, rec in jsonl_records(path):
        if isinstance(rec, dict) and question_field not in rec and answer_field not in rec:
            chat = _chat_question(rec, f"{path}:{line}")
            if chat is not None:
                out.append({"id": rec.get("id", len(out)), **chat})
                if limit and len(out) >= limit:
                    break
                continue
        if not isinstance(rec, dict) or question_field not in rec:
            raise EvalError(f"{path}:{line}: missing field {question_field!r} (set --question-field; chat records "
                            "with messages/conversations/instruction are read too)")
        if answer_field not in rec:
            raise EvalError(f"{path}:{line}: missing field {answer_field!r} (the reference; set --answer-field)")
        ref = rec[answer_field]
        refs = ref if isinstance(ref, list) else [ref]
        out.append({"id": rec.get("id", len(out)), "question": str(rec[question_field]), "references": refs})
        if limit and len(out) >= limit:
            break
    if not out:
        raise EvalError(f"{path}: no questions")
    return out


def _chat_question(rec: dict, where: str) -> dict | None:
    """A chat record (OpenAI messages / ShareGPT / Alpaca): the turns before the last assistant answer are
    the question, that answer the reference. None when the record is not a chat record."""
    if not any(k in rec for k in ("messages", "conversations", "instruction")):
        return None
    from ..posttrain.chat import to_messages

    messages = to_messages(rec, where)
    if not messages or messages[-1]["role"] != "assistant":
        raise EvalError(f"{where}: the conversation must end with the assistant's reference answer")
    turns = messages[:-1]
    return {"question": "\n".join(m["content"] for m in turns if m["role"] == "user"), "messages": turns,
            "references": [messages[-1]["content"]]}


def encode_prompts(questions: list[dict], tokenizer, template: str | None) -> list[list[int]]:
    if any("messages" in q for q in questions) and not template:
        raise EvalError("chat records (messages/conversations/instruction) need --template (plain, llama2, "
                        "or the Jinja template the model was fine-tuned with)")
    if template:
        from ..posttrain.chat import load_template

        chat = load_template(template)
        return [chat.encode_prompt(q.get("messages") or [{"role": "user", "content": q["question"]}], tokenizer,
                                   f"question {q['id']}") for q in questions]
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    return [bos + tokenizer.encode(q["question"]) for q in questions]


def run_generate(opts: dict) -> dict | None:
    from .engine import EvalModel
    from .report import write_report

    questions = read_questions(opts["input"], opts.get("question_field", "question"),
                               opts.get("answer_field", "answer"), opts.get("limit"))
    model = EvalModel.open(opts["checkpoint"], int(opts.get("tp", 1)), int(opts.get("pp", 1)),
                           device=opts.get("device", "auto"), dtype=opts.get("dtype", "fp32"),
                           tokenizer=opts.get("tokenizer"))
    try:
        tok = model.tokenizer
        max_new = int(opts.get("max_new_tokens", 64))
        prompts = [p[-max(1, model.max_length - max_new):] for p in encode_prompts(questions, tok, opts.get("template"))]
        start = time.perf_counter()
        ids = model.generate_ids(prompts, max_new_tokens=max_new, greedy=bool(opts.get("greedy", True)),
                                 temperature=float(opts.get("temperature", 1.0)), top_k=int(opts.get("top_k", 0)),
                                 top_p=float(opts.get("top_p", 1.0)), seed=int(opts.get("seed", 0)),
                                 batch_size=int(opts.get("batch_size", 8)))
        elapsed = time.perf_counter() - start
        if model.mesh.rank != 0:
            return None
        out = Path(opts["output"])
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        with open(out / "answers.jsonl", "w", encoding="utf-8") as fh:
            for q, r in zip(questions, ids):
                response = tok.decode(r).strip()
                scored = match(response, q["references"])
                reference = q["references"][0] if len(q["references"]) == 1 else q["references"]
                row = {"id": q["id"], "question": q["question"], "reference": reference, "response": response,
                       "response_tokens": len(r), **scored}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows.append(row)
        numeric = [r["numeric"] for r in rows if r["numeric"] is not None]
        summary = {"n": len(rows), "exact": sum(r["exact"] for r in rows) / len(rows),
                   "contains": sum(r["contains"] for r in rows) / len(rows),
                   "numeric": sum(numeric) / len(numeric) if numeric else None, "numeric_n": len(numeric),
                   "mean_response_tokens": sum(r["response_tokens"] for r in rows) / len(rows),
                   "generate_s": elapsed}
        data = {"checkpoint": opts["checkpoint"], "input": opts["input"], "template": opts.get("template"),
                "decoding": {"greedy": bool(opts.get("greedy", True)), "temperature": opts.get("temperature"),
                             "top_p": opts.get("top_p"), "top_k": opts.get("top_k"), "max_new_tokens": max_new,
                             "seed": opts.get("seed", 0)},
                "layout": {"tp": model.mesh.tp, "pp": model.mesh.pp, "dp": model.mesh.dp}, **summary}
        write_report(out, "generate", data, [{"checkpoint": opts["checkpoint"], **summary}],
                     ["checkpoint", "n", "exact", "contains", "numeric", "numeric_n", "mean_response_tokens"],
                     title=f"Generation: {opts['checkpoint']} on {opts['input']}",
                     notes=[f"answers saved to {out / 'answers.jsonl'} (input for `jinpan eval judge`)",
                            "greedy" if data["decoding"]["greedy"] else
                            f"sampled: temperature={opts.get('temperature')} top_p={opts.get('top_p')}"])
        return summary
    finally:
        model.close()
