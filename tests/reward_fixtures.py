"""Shared test data for the reward model and DPO: a small tokenizer and real-world-shaped preference pairs."""
from __future__ import annotations

import json
import random

from megatron_jinpan.data.tokenizer import train_tokenizer

VOCAB = 320  # tokenizer pieces; the debug model is run with model.vocab_size=VOCAB

CODE = "def f(a):\n    return a  # 🙂\n"
LONG = "Please explain step by step, with care and detail, " * 6


def pair_records(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic questions: chosen = the right sum, rejected = a wrong / evasive / degenerate answer.
    Mixed shapes: string pairs, whole conversations (ShareGPT and OpenAI), margins, code, emoji, CJK."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        q = f"What is {a} plus {b}?"
        good = f"{a} plus {b} is {a + b}."
        bad = rng.choice([f"{a} plus {b} is {a + b + rng.randint(1, 9)}.", "I cannot help with that.",
                          "is is is is is is"])
        kind = i % 4
        if kind == 0:
            out.append({"prompt": q, "chosen": good, "rejected": bad})
        elif kind == 1:
            conv = [{"role": "system", "content": "Be terse. 数"}, {"role": "user", "content": q}]
            out.append({"chosen": conv + [{"role": "assistant", "content": good}],
                        "rejected": conv + [{"role": "assistant", "content": bad}], "margin": 0.5})
        elif kind == 2:
            conv = [{"from": "human", "value": CODE + q}]
            out.append({"chosen": conv + [{"from": "gpt", "value": good + " 🙂"}],
                        "rejected": conv + [{"from": "gpt", "value": bad}]})
        else:
            out.append({"prompt": [{"role": "user", "content": q}], "chosen": good, "rejected": bad})
    return out


def write_pairs(path, records, extra_lines=()) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")


def make_tokenizer(d):
    text = [json.dumps(r, ensure_ascii=False) for r in pair_records(300, seed=99)] + [CODE, LONG, "Human: Assistant:"]
    (d / "tok.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    return train_tokenizer(d / "tok.txt", VOCAB, d / "tok.model")


# Lines every preprocessing run must count and skip (not fail on).
SKIPPED_LINES = [
    json.dumps({"prompt": "Hi", "chosen": "same", "rejected": "same"}),                    # identical
    json.dumps({"prompt": "Hi", "chosen": "", "rejected": "something"}),                   # empty side
    json.dumps({"prompt": "Hi", "chosen": "   ", "rejected": "x"}),                        # blank side
    json.dumps({"prompt": LONG * 8, "chosen": "a", "rejected": "b"}),                      # too long
]
