"""lm-eval hooks of the local task configs in this directory (`!function utils.NAME`).

Exam files are normalised to {question, options, letters, answer} whatever
their layout: C-Eval / CMMLU CSV (question,A,B,C,D,answer[,explanation];
headers in any case) or MMLU-style JSONL (question, choices, integer answer
or letter). Files are checked with file/line messages by
megatron_jinpan.eval.exam before lm-eval runs; the checks here only repeat
what a hand-written config could get wrong.
"""
from __future__ import annotations

LETTERS = "ABCDEFGHIJ"


def _exam_row(doc: dict) -> dict:
    keys = {str(k).strip().lower(): k for k in doc}
    question = str(doc[keys["question"]]).strip()
    if "choices" in keys:
        options = [str(o) for o in doc[keys["choices"]]]
    else:
        options = []
        for letter in LETTERS:
            if letter.lower() not in keys:
                break
            options.append(str(doc[keys[letter.lower()]]).strip())
    answer = doc[keys["answer"]]
    if isinstance(answer, str):
        answer = answer.strip()
        answer = int(answer) if answer.isdigit() else LETTERS.index(answer.upper())
    return {"question": question, "options": options, "letters": list(LETTERS[:len(options)]), "answer": int(answer)}


def process_exam(dataset):
    """Any exam layout -> question, options, letters, answer (index)."""
    return dataset.map(_exam_row, remove_columns=list(dataset.column_names))


def _listed(doc: dict) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip(doc["letters"], doc["options"]))


def exam_text_zh(doc: dict) -> str:
    return f"{doc['question']}\n{_listed(doc)}\n答案："


def exam_text_en(doc: dict) -> str:
    return f"{doc['question']}\n{_listed(doc)}\nAnswer:"
