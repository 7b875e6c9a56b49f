"""`jinpan eval generate`: answers on the engine's generator, scored by exact/contains/numeric match."""
import json

import pytest

from eval_fixtures import hf_and_ours
from megatron_jinpan.eval.commands import _generate_entry, run_on_ranks
from megatron_jinpan.eval.engine import EvalError
from megatron_jinpan.eval.generate import match, read_questions


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return hf_and_ours(tmp_path_factory.mktemp("gen"))[0]


def test_match_rules():
    assert match("  The answer is Paris. ", ["paris"]) == {"exact": False, "contains": True, "numeric": None}
    assert match("Paris。", ["paris"])["exact"]
    assert match("营收增长了 1,234.5 亿", ["1234.5"]) == {"exact": False, "contains": False, "numeric": True}
    assert match("it was 3 then 12", [12])["numeric"] and not match("it was 12 then 3", [12])["numeric"]
    assert match("no number", ["7"])["numeric"] is False
    assert match("B", ["A", "b"])["exact"]  # any accepted answer


def test_generate_end_to_end_and_dp2(ours, tmp_path):
    qs = tmp_path / "qa.jsonl"
    qs.write_text("\n".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in
                            [("利润 是", "银行"), ("the market", "rose"), ("收入 增长", 12), ("bond rate", ["a", "b"]),
                             ("公司 市场", "x")]) + "\n")
    opts = {"checkpoint": str(ours), "input": str(qs), "max_new_tokens": 6, "batch_size": 2}
    summary = _generate_entry({**opts, "output": str(tmp_path / "one")})
    rows = [json.loads(line) for line in (tmp_path / "one" / "answers.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == ["利润 是", "the market", "收入 增长", "bond rate", "公司 市场"]
    assert all(0 < r["response_tokens"] <= 6 for r in rows)
    for r in rows:  # the saved scores are the match rules applied to the saved response
        refs = r["reference"] if isinstance(r["reference"], list) else [r["reference"]]
        assert {k: r[k] for k in ("exact", "contains", "numeric")} == match(r["response"], refs)
    assert summary["n"] == 5 and summary["numeric_n"] == 1
    assert (tmp_path / "one" / "generate.md").is_file()
    # Two data-parallel replicas split the questions and give the same greedy answers.
    run_on_ranks(_generate_entry, {**opts, "output": str(tmp_path / "dp2")}, nproc=2)
    dp2 = [json.loads(line) for line in (tmp_path / "dp2" / "answers.jsonl").read_text().splitlines()]
    assert [r["response"] for r in dp2] == [r["response"] for r in rows]
    assert json.loads((tmp_path / "dp2" / "generate.json").read_text())["layout"]["dp"] == 2


def test_bad_questions(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "q"}\n')
    with pytest.raises(EvalError, match=r"q.jsonl:1: missing field 'answer'"):
        read_questions(f)


def test_chat_records(tmp_path):
    from megatron_jinpan.eval.generate import encode_prompts

    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "周艳每天看电影多少分钟？"}, '
                 '{"role": "assistant", "content": "70分钟"}]}\n')
    (q,) = read_questions(f)
    assert q["references"] == ["70分钟"] and q["messages"][-1]["role"] == "user"
    assert match("她每天看 70 分钟", q["references"])["numeric"]
    with pytest.raises(EvalError, match="need --template"):
        encode_prompts([q], None, None)


def test_lm_eval_generate_until(ours):
    from lm_eval.api.instance import Instance

    from megatron_jinpan.eval.engine import EvalModel
    from megatron_jinpan.eval.lm import JinpanLM

    model = EvalModel.open(str(ours))
    lm = JinpanLM(model=model)
    reqs = [Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 8}), i)
            for i, (ctx, stop) in enumerate([("利润 是", "\n"), ("the market", "e"), ("收入 增长", "\n")])]
    texts = lm.generate_until(reqs)
    tok = model.tokenizer
    for (ctx, kw), text in zip([r.args for r in reqs], texts):
        ids = model.generate_ids([[tok.bos_id] + tok.encode(ctx)], max_new_tokens=8)[0]
        full = tok.decode(ids)
        stop = kw["until"][0]
        assert text == (full[:full.index(stop)] if stop in full else full)
    model.close()
