"""`jinpan eval ppl`: the training loop's held-out numbers for the same checkpoint and data
(tp=2 x pp=2: tests/test_eval_mcq.py::test_layout_tp2_pp2, which shares its worker processes)."""
import json
import math

import pytest

from eval_fixtures import domain_data, trained_run
from megatron_jinpan.eval.engine import EvalError
from megatron_jinpan.eval.ppl import run_ppl


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    run_dir, records = trained_run(root)
    return root, run_dir, records[-1]


def test_ppl_equals_training_eval(run):
    root, run_dir, last = run
    data = domain_data(root)
    # The run's own held-out sets (from the checkpoint's config) and the same sets named on the command line.
    for specs in ([], [f"zh={data['zh_valid']}", f"en={data['en_valid']}"]):
        report = run_ppl({"checkpoint": str(run_dir), "data": specs, "eval_iters": 2,
                          "output": str(root / f"out{len(specs)}")})
        rows = {r["set"]: r for r in report["rows"]}
        for name in ("zh", "en"):
            assert rows[name]["loss"] == pytest.approx(last[f"eval_loss_{name}"], rel=1e-6, abs=1e-6)
            assert rows[name]["ppl"] == pytest.approx(math.exp(last[f"eval_loss_{name}"]), rel=1e-5)
        assert rows["overall (token-weighted)"]["loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
    written = json.loads((root / "out2" / "ppl.json").read_text())
    assert written["rows"][0]["set"] == "zh" and (root / "out2" / "ppl.md").read_text().count("|") > 10


def test_full_pass_counts_each_token_once_and_jsonl_input(run):
    root, run_dir, _ = run
    data = domain_data(root)
    a = run_ppl({"checkpoint": str(run_dir), "data": [f"zh={data['zh_valid']}"], "output": str(root / "fa")})
    b = run_ppl({"checkpoint": str(run_dir), "data": [f"zh={root / 'data' / 'zh_valid.jsonl'}"],
                 "output": str(root / "fb")})
    assert a["rows"][0]["loss"] == pytest.approx(b["rows"][0]["loss"], rel=1e-7)
    # global batch 4 over a set whose sample count is not a multiple of 4: wrapped samples are masked,
    # so the token count is the set's samples x seq_len, and differs from a wrapping eval's.
    samples = a["rows"][0]["samples"]
    assert samples % 4 and a["rows"][0]["tokens"] == samples * 32


def test_ppl_bad_input(run, tmp_path):
    _, run_dir, _ = run
    with pytest.raises(EvalError, match="NAME=PREFIX"):
        run_ppl({"checkpoint": str(run_dir), "data": ["=x"], "output": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="nope"):
        run_ppl({"checkpoint": str(run_dir), "data": [f"zh={tmp_path}/nope"], "output": str(tmp_path)})
