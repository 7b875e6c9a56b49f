"""The demo instruction set (data/demo_sft.py): held-out prompts are never trained on, the facts they ask
are taught in training, the mix is as documented, and the sets built on it (preferences, PPO's rule
reward) still work.

    python -m pytest -q tests/test_demo_sft.py
"""
import re

import pytest

from megatron_jinpan.data import demo_prefs, demo_sft
from megatron_jinpan.posttrain.rewards import demo_answer

SEED = 1234
LOOKUPS = ("translate", "arithmetic", "ticker", "home_city")


@pytest.fixture(scope="module")
def sets():
    return demo_sft.generate_sets(SEED)


def _first_user(c):
    return next(m["content"] for m in c["messages"] if m["role"] == "user")


def test_heldout_prompts_never_trained_on(sets):
    trained = set().union(*(demo_sft.prompts_of(c) for name in ("stage1", "stage2") for c in sets[name]))
    for name in ("valid", "heldout", "heldout_facts", "heldout_rephrased"):
        assert not any(demo_sft.prompts_of(c) & trained for c in sets[name]), name


def test_heldout_lookups_ask_trained_facts_in_a_reserved_phrasing(sets):
    facts = demo_sft.fact_table(SEED)
    taught = {}  # (task, lang, fact) -> {answer}; phrasings used per (task, lang, fact)
    phrasings = {}
    for c in sets["stage1"] + sets["stage2"]:
        if c["task"] in LOOKUPS:
            key = demo_sft.fact_key(c, facts)
            taught.setdefault(key, set()).add(c["messages"][-1]["content"])
            phrasings.setdefault(key, set()).add(_first_user(c))
    lookups = sets["heldout_facts"]
    assert {c["task"] for c in lookups} == set(LOOKUPS)
    for c in lookups:
        key = demo_sft.fact_key(c, facts)
        assert c["messages"][-1]["content"] in taught[key], c  # the fact, with this answer, is in training
        assert _first_user(c) not in phrasings[key]            # ... never asked this way


def _names(tasks):
    return {f.__name__.strip("_") for f in tasks}


def test_mix_languages_and_turns(sets):
    every = demo_sft.GENERAL + demo_sft.FINANCE
    for name, tasks in (("stage1", every), ("stage2", every), ("heldout", demo_sft.CONTEXT),
                        ("heldout_facts", demo_sft.LOOKUPS)):
        rows = sets[name]
        general = sum(c["domain"] == "general" for c in rows) / len(rows)
        assert 0.75 < general < 0.87, (name, general)
        assert 0.4 < sum(c["lang"] == "zh" for c in rows) / len(rows) < 0.6
        assert {c["task"] for c in rows} == _names(tasks), name
        if name != "heldout_facts":
            assert any(sum(m["role"] == "user" for m in c["messages"]) == 2 for c in rows)
    context = sum(c["task"] in _names(demo_sft.CONTEXT) for c in sets["stage1"]) / len(sets["stage1"])
    assert 0.4 < context < 0.6, context  # training: about half questions on a text, half lookups


def test_heldout_answers_come_from_the_prompt(sets):
    """heldout.jsonl (the headline exact-match) asks about a text in the prompt: the reference's number or
    city is written there (gross profit: both operands are), never a fact only training taught."""
    for c in sets["heldout"]:
        prompt = " ".join(m["content"] for m in c["messages"][:-1])
        answer = c["messages"][-1]["content"]
        if c["task"] == "direction":
            assert ("增长" in prompt) == (answer == "增长") or ("rose" in prompt) == (answer == "increase"), c
        elif c["task"] != "gross":
            assert re.sub(r"[$亿元小时]|billion|hours", "", answer).strip() in prompt, c


def test_ppo_rule_reward_checks_stage2_answers(sets):
    """launch/rlhf_demo.sh takes stage-2 arithmetic and reading prompts for the rule reward demo_answer
    (which reads sums in the 'A + B' form: "Compute 3 + 4.", "计算：3+4=")."""
    rows = [c for c in sets["stage2"] if c["task"] == "reading" or (c["task"] == "arithmetic" and "+" in _first_user(c))]
    assert len(rows) > 300
    prompts = [_first_user(c) for c in rows]
    answers = [next(m["content"] for m in c["messages"] if m["role"] == "assistant") for c in rows]
    assert demo_answer(prompts, answers) == [1.0] * len(rows)
    wrong = [re.sub(r"\d+", lambda m: str(int(m.group()) + 10), a) for a in answers]
    assert demo_answer(prompts, wrong) == [0.0] * len(rows)


def test_preference_pairs_still_build():
    sets = demo_prefs.generate_sets(SEED)
    assert {name: len(rows) for name, rows in sets.items()} == demo_prefs.SETS
    for pair in sets["train"][:200]:
        assert pair["chosen"] != pair["rejected"]
