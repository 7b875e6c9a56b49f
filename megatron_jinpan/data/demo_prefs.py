"""The demo preference set: the demo instruction tasks with a good and a bad answer per prompt.

    jinpan data demo --output data/demo          # builds this too, under data/demo/prefs/

Writes (skipping what exists):
  prefs/{train,valid,valid_shift}.jsonl    preference pairs (held-out sets: see below)
  prefs/train, prefs/valid, prefs/valid_shift   preprocessed with `jinpan preprocess --format pairs` (plain template)

Prompts come from the SFT demo's task generators (data/demo_sft.py: reading, translation, one-digit
sums, figures, metric direction, tickers, home cities, gross profit; zh and en). The chosen answer is the correct
one; the rejected answer is one of
  wrong       (20%) an answer of the right form that is false: another number, city, ticker or direction
  irrelevant  (30%) a well-formed answer to a different question (a city for a sum, a ticker for a story)
  evasive     (25%) a refusal or a non-answer ("I'm not sure.", "这个问题我无法回答。")
  degenerate  (25%) a repeated fragment, or the answer cut off and trailing into noise
Lines alternate between the record forms users bring: {"prompt": [messages], "chosen": str,
"rejected": str} and whole conversations {"chosen": [messages], "rejected": [messages]}.
Held-out sets: `valid` holds new pairs from the training templates (new stories, figures, names; none
of them in train); `valid_shift` uses the SFT demo's held-out phrasings (`held=True`), a harder shift.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .demo_sft import FINANCE, GENERAL, fact_table

# valid: new pairs from the training templates (new stories, numbers, names; no pair of train);
# valid_shift: the SFT demo's held-out phrasings (`held=True`), a harder distribution shift.
SETS = {"train": 4000, "valid": 400, "valid_shift": 400}
EVASIVE = {"zh": ["这个问题我无法回答。", "我不确定，请咨询专业人士。", "抱歉，我不知道。", "无可奉告。"],
           "en": ["I'm not sure.", "I cannot answer that.", "Please ask someone else.", "It depends."]}
TASKS = {f.__name__.strip("_"): (f, f in FINANCE) for f in GENERAL + FINANCE}
# Share of each kind of rejected answer. "wrong" (right form, false value) needs the model to check the
# answer against the story or a memorised fact: the hard part of the set (see docs/reward.md).
KINDS = ("wrong", "irrelevant", "evasive", "degenerate")
KIND_WEIGHTS = {"wrong": 0.2, "irrelevant": 0.3, "evasive": 0.25, "degenerate": 0.25}


def _wrong(r: random.Random, answer: str, task: str, zh: bool, held: bool, facts: dict) -> str:
    """A false answer in the same form: change a number, or take another sample's answer of the task."""
    numbers = re.findall(r"\d+(?:\.\d+)?", answer)
    if numbers:
        old = r.choice(numbers)
        while True:
            step = r.choice([-3, -2, -1, 1, 2, 3, 5, 11])
            new = str(round(abs(float(old) + step), 1)) if "." in old else str(abs(int(old) + step)).zfill(len(old))
            if new != old:
                return answer.replace(old, new, 1)
    fn, finance = TASKS[task]
    for _ in range(20):
        (_, other), _ = fn(r, zh, held, facts) if finance else fn(r, zh, held)
        if other != answer:
            return other
    return EVASIVE["zh" if zh else "en"][0]


def _irrelevant(r: random.Random, answer: str, fn, zh: bool, held: bool, facts: dict) -> str:
    """The answer to a question of another task: well formed, but not an answer to this one."""
    others = [(f, fin) for f, fin in TASKS.values() if f is not fn]
    while True:
        other_fn, finance = r.choice(others)
        (_, other), _ = other_fn(r, zh, held, facts) if finance else other_fn(r, zh, held)
        if other != answer:
            return other


def _degenerate(r: random.Random, answer: str) -> str:
    if r.random() < 0.5:
        piece = answer[: max(1, len(answer) // 2)]
        return " ".join([piece] * r.randint(4, 8))
    return answer[: max(1, len(answer) // 3)] + r.choice(["... ... ...", "？？？", "|||"])


def preference_pair(r: random.Random, facts: dict, held: bool, index: int) -> dict:
    fn, finance = r.choice(list(TASKS.values()))
    zh = r.random() < 0.5
    (question, answer), _ = fn(r, zh, held, facts) if finance else fn(r, zh, held)
    kind = r.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
    task = fn.__name__.strip("_")
    if kind == "wrong":
        bad = _wrong(r, answer, task, zh, held, facts)
    elif kind == "irrelevant":
        bad = _irrelevant(r, answer, fn, zh, held, facts)
    elif kind == "evasive":
        bad = r.choice(EVASIVE["zh" if zh else "en"])
    else:
        bad = _degenerate(r, answer)
    prompt = [{"role": "user", "content": question}]
    meta = {"kind": kind, "task": task, "lang": "zh" if zh else "en"}
    if index % 2:
        return {"chosen": prompt + [{"role": "assistant", "content": answer}],
                "rejected": prompt + [{"role": "assistant", "content": bad}], **meta}
    return {"prompt": prompt, "chosen": answer, "rejected": bad, **meta}


def generate_sets(seed: int) -> dict[str, list[dict]]:
    facts = fact_table(seed)  # the same companies/cities as the SFT demo: an SFT model knows them
    out = {}
    seen: set = set()
    for name, n in SETS.items():
        r = random.Random(f"prefs:{name}:{seed}")
        pairs = []
        while len(pairs) < n:
            pair = preference_pair(r, facts, name == "valid_shift", len(pairs))
            key = json.dumps([pair.get("prompt"), pair["chosen"], pair["rejected"]], ensure_ascii=False)
            if name == "train":
                seen.add(key)
            elif key in seen:
                continue  # a held-out pair never appears in training
            pairs.append(pair)
        out[name] = pairs
    return out


def build_prefs_demo(out: Path, tokenizer: Path, seed: int, workers: int = 1, log=print) -> dict:
    """Write and preprocess the preference sets under out/prefs (idempotent); returns the prefixes."""
    from ..posttrain.pairs import preprocess_pairs

    prefs = Path(out) / "prefs"
    prefs.mkdir(parents=True, exist_ok=True)
    sets, paths = None, {}
    for name in SETS:
        path = prefs / f"{name}.jsonl"
        if not path.is_file():
            sets = sets or generate_sets(seed)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in sets[name]), encoding="utf-8")
            tmp.replace(path)
            log(f"wrote {path} ({len(sets[name])} pairs)")
        prefix = prefs / name
        if not Path(str(prefix) + ".pairs.json").is_file():
            info = preprocess_pairs(str(path), str(tokenizer), str(prefix), template="plain", max_seq_len=256,
                                    workers=workers, progress=False)
            log(f"wrote {prefix}.bin/.idx (+ .mask): {info['pairs']} pairs, skipped {info['skipped']}")
        paths[name] = str(prefix)
    return paths
