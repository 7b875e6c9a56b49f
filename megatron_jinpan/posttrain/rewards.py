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


# Two numbers joined by an operator, as the demo's SFT prompts write sums: "3 + 4", "3+4=", "3 plus 4",
# "3加4"; and the worded sums "Add 3 and 4", "Sum of 3 and 4?", "3和4的和", "3与4相加".
_OPERATORS = {"+": "+", "plus": "+", "加": "+", "-": "-", "minus": "-", "减": "-", "*": "*", "times": "*",
              "乘": "*", "乘以": "*"}
_SUM = re.compile(r"(-?\d+)\s*(\+|-|\*|plus|minus|times|加|减|乘以|乘)\s*(-?\d+)", re.IGNORECASE)
_ADD = re.compile(r"\b(?:add|sum of)\s+(-?\d+)\s+and\s+(-?\d+)|(-?\d+)\s*[和与]\s*(-?\d+)\s*(?:的和|相加)",
                  re.IGNORECASE)


def sum_of(prompt: str) -> int | None:
    """The value a demo arithmetic prompt asks for ('Compute 3 + 4.', 'What is 3 plus 4?', '3加4等于多少？',
    'Add 3 and 4.', '3和4的和是多少？'), or None when the prompt is not one."""
    m = _SUM.search(prompt)
    if m:
        a, op, b = int(m.group(1)), _OPERATORS[m.group(2).lower()], int(m.group(3))
        return a + b if op == "+" else a - b if op == "-" else a * b
    m = _ADD.search(prompt)
    if not m:
        return None
    a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    return int(a) + int(b)


def demo_answer(prompts: list[str], responses: list[str]) -> list[float]:
    """The tiny RLHF demo's rule check (launch/rlhf_demo.sh), 1 or 0 per response: arithmetic prompts
    (see `sum_of`) score 1 when the response's first number is the value; reading prompts ('... spends
    3 hours cycling every week. How many hours ...?') score 1 when the response's first number is one
    of the prompt's."""
    out = []
    for prompt, text in zip(prompts, responses):
        got = re.findall(r"-?\d+(?:\.\d+)?", text)
        want = sum_of(prompt)
        if want is not None:
            out.append(1.0 if got and got[0] == str(want) else 0.0)
            continue
        numbers = re.findall(r"\d+(?:\.\d+)?", prompt)
        out.append(1.0 if numbers and got and got[0] in numbers else 0.0)
    return out
