"""Rule rewards for `ppo.reward_fn` (module:function(prompts, responses) -> list[float]).

    ppo.reward_fn: megatron_jinpan.posttrain.rewards:letter_a

Each function receives the prompt texts and the decoded responses (EOS removed) of a rollout
batch and returns one float per response. Write your own the same way (any importable module).
"""
from __future__ import annotations

import re


def letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's letters that are 'a' (0..1): a toy target any policy can learn fast."""
    out = []
    for text in responses:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c == "a" for c in letters) / len(letters) if letters else 0.0)
    return out


def echo_first_word(prompts: list[str], responses: list[str]) -> list[float]:
    """1 when the response starts with the last word of the prompt (case-insensitive), else 0 --
    a rule-checkable instruction ("repeat the last word") for the tiny RLHF demo."""
    out = []
    for prompt, text in zip(prompts, responses):
        words = re.findall(r"\w+", prompt.lower())
        got = re.findall(r"\w+", text.lower())
        out.append(1.0 if words and got and got[0] == words[-1] else 0.0)
    return out


def arithmetic(prompts: list[str], responses: list[str]) -> list[float]:
    """1 when the response's first number equals the value of the prompt's 'A + B' / 'A - B' / 'A * B'."""
    out = []
    for prompt, text in zip(prompts, responses):
        m = re.search(r"(-?\d+)\s*([-+*])\s*(-?\d+)", prompt)
        got = re.search(r"-?\d+", text)
        if not m or not got:
            out.append(0.0)
            continue
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        want = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(1.0 if int(got.group()) == want else 0.0)
    return out


def demo_answer(prompts: list[str], responses: list[str]) -> list[float]:
    """The tiny RLHF demo's rule check (launch/rlhf_demo.sh): arithmetic prompts ('Compute 3 + 4.')
    score 1 for the right number; reading prompts ('... spends 94 minutes ...') score 1 when the answer's
    first number is the one in the prompt; 0 otherwise."""
    out = []
    for prompt, text in zip(prompts, responses):
        if re.search(r"-?\d+\s*[-+*]\s*-?\d+", prompt):
            out.extend(arithmetic([prompt], [text]))
            continue
        want = re.findall(r"\d+(?:\.\d+)?", prompt)
        got = re.findall(r"\d+(?:\.\d+)?", text)
        out.append(1.0 if want and got and got[0] in want else 0.0)
    return out
