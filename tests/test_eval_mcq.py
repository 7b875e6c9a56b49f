"""`jinpan eval mcq` / the lm-eval model "jinpan" against lm-eval's own `hf` model on the converted checkpoint."""
import glob
import json

import pytest

pytest.importorskip("lm_eval")
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import megatron_jinpan.eval  # noqa: E402,F401  (registers "jinpan")
from eval_fixtures import exam_dir, hf_and_ours, trained_run  # noqa: E402
from megatron_jinpan.eval.engine import EvalError  # noqa: E402
from megatron_jinpan.eval.harness import run_harness  # noqa: E402
from megatron_jinpan.eval.local_tasks import write_exam_tasks  # noqa: E402


def _lls(samples: dict) -> dict:
    """{(task, doc_id): [per-option log-likelihood]} from lm-eval samples."""
    return {(task, s["doc_id"]): [float(r[0]) for r in s["filtered_resps"]] for task, rows in samples.items()
            for s in rows}


def _accs(results: dict) -> dict:
    return {t: (r.get("acc,none"), r.get("acc_norm,none")) for t, r in results["results"].items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcq")
    ours, hf = hf_and_ours(root)
    group, tasks = write_exam_tasks(exam_dir(root), root / "tasks", name="toy", num_fewshot=1)
    reference = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf},dtype=float32,device=cpu", tasks=[group], num_fewshot=1,
        log_samples=True, batch_size=8, bootstrap_iters=0,
        task_manager=TaskManager(include_path=[str(root / "tasks")], include_defaults=False))
    return root, ours, hf, group, reference


def test_jinpan_matches_hf_in_process(setup):
    root, ours, _, group, reference = setup
    results, model = run_harness({"checkpoint": str(ours), "tasks": [group], "include_path": [str(root / "tasks")],
                                  "num_fewshot": 1, "log_samples": True, "batch_size": 3})
    model.close()
    mine, theirs = _lls(results["samples"]), _lls(reference["samples"])
    assert mine.keys() == theirs.keys() and len(mine) == 10
    for key in theirs:
        assert mine[key] == pytest.approx(theirs[key], abs=1e-4), key
    assert _accs(results) == _accs(reference)


def _tp2_pp2_worker(opts: dict) -> None:
    """One set of 4 worker processes for both engine paths: eval ppl, then eval mcq, on one (2, 2, 1) mesh."""
    from megatron_jinpan.eval.commands import _mcq_entry
    from megatron_jinpan.eval.engine import EvalModel, open_mesh
    from megatron_jinpan.eval.ppl import run_ppl

    mesh = open_mesh(2, 2, "cpu")
    run_ppl({**opts["ppl"], "mesh": mesh, "keep_open": True})
    _mcq_entry({**opts["mcq"], "model": EvalModel.open(opts["mcq"]["checkpoint"], mesh=mesh)})  # closes the mesh


def test_layout_tp2_pp2(setup, tmp_path):
    """(tp, pp, dp) = (2, 2, 1) on 4 processes: `eval mcq` writes lm-eval's files with the `hf` model's
    numbers, and `eval ppl` gives the training loop's eval_loss of the same checkpoint."""
    from megatron_jinpan.eval.commands import run_on_ranks
    from megatron_jinpan.eval.local_tasks import write_exam_tasks

    root, ours, _, group, reference = setup
    run_dir, records = trained_run(root)
    out = tmp_path / "out"
    write_exam_tasks(root / "exam", out / "tasks", name="toy", num_fewshot=1)
    mcq = {"checkpoint": str(ours), "tasks": [group], "include_path": [str(out / "tasks")], "num_fewshot": 1,
           "batch_size": 4, "log_samples": True, "output_path": str(out), "tp": 2, "pp": 2}
    ppl = {"checkpoint": str(run_dir), "eval_iters": 2, "output": str(tmp_path / "ppl")}
    run_on_ranks(_tp2_pp2_worker, {"tp": 2, "pp": 2, "mcq": mcq, "ppl": ppl}, nproc=4)

    results = json.loads(open(glob.glob(str(out / "jinpan" / "results_*.json"))[0]).read())
    samples = {}
    for path in glob.glob(str(out / "jinpan" / "samples_*.jsonl")):
        samples[path.split("samples_")[1].rsplit("_", 1)[0]] = [json.loads(line) for line in open(path)]
    mine, theirs = _lls(samples), _lls(reference["samples"])
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert mine[key] == pytest.approx(theirs[key], abs=1e-4), key
    assert {t: (r.get("acc,none"), r.get("acc_norm,none")) for t, r in results["results"].items()} == _accs(reference)
    report = json.loads((out / "mcq.json").read_text())
    assert [r["task"] for r in report["rows"]] == ["toy", "toy_accounting", "toy_banking"]
    assert report["rows"][0]["n"] == 10 and "| toy_banking |" in (out / "mcq.md").read_text()

    rows = {r["set"]: r for r in json.loads((tmp_path / "ppl" / "ppl.json").read_text())["rows"]}
    for name in ("zh", "en"):
        assert rows[name]["loss"] == pytest.approx(records[-1][f"eval_loss_{name}"], rel=1e-5)


def test_acc_norm_hand_made(setup, tmp_path):
    """acc_norm = arg-max of log-likelihood / option length in characters (lm-eval's definition)."""
    root, ours, _, _, _ = setup
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "x", "gold": 1}\n{"q": "y", "gold": 0}\n')
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "hand.yaml").write_text(
        'task: hand\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: ' + str(data) + '\n'
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: ["A", "BBBB"]\n'
        'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    from megatron_jinpan.eval.engine import EvalModel

    model = EvalModel.open(str(ours))
    # Option "A" gets -2, "BBBB" gets -4: acc picks A (-2 > -4), acc_norm picks BBBB (-4/4 > -2/1).
    model.score = lambda requests, batch_size=8: [(-2.0 if len(cont) <= 2 else -4.0, False)
                                                  for ctx, cont in requests]
    results, _ = run_harness({"model": model, "tasks": ["hand"], "include_path": [str(tmp_path / "t")],
                              "log_samples": True})
    model.close()
    assert results["results"]["hand"]["acc,none"] == 0.5       # doc 2 (gold A) right, doc 1 wrong
    assert results["results"]["hand"]["acc_norm,none"] == 0.5  # doc 1 (gold BBBB) right, doc 2 wrong
    # and the per-doc picks are the opposite ones
    assert [s["acc"] for s in sorted(results["samples"]["hand"], key=lambda s: s["doc_id"])] == [0.0, 1.0]
    assert [s["acc_norm"] for s in sorted(results["samples"]["hand"], key=lambda s: s["doc_id"])] == [1.0, 0.0]


def test_bad_exam_files(tmp_path):
    d = tmp_path / "exam" / "val"
    d.mkdir(parents=True)
    (d / "law_val.csv").write_text("question,A,B,C,D,answer\nq1,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(EvalError, match=r"law_val.csv:3: answer 'E' is outside the 4 options"):
        write_exam_tasks(tmp_path / "exam", tmp_path / "t")
    (d / "law_val.csv").write_text("question,A,B,C,D\nq1,a,b,c,d\n")
    with pytest.raises(EvalError, match=r"law_val.csv:1: missing column\(s\) answer"):
        write_exam_tasks(tmp_path / "exam", tmp_path / "t")
    (d / "law_val.csv").unlink()
    with pytest.raises(EvalError, match="has no exam files"):
        write_exam_tasks(tmp_path / "exam", tmp_path / "t")
    (d / "law_val.csv").write_text("question,A,B,C,D,answer\nq1,a,b,c,d,A\n")
    with pytest.raises(EvalError, match="no dev split for --num_fewshot 2"):
        write_exam_tasks(tmp_path / "exam", tmp_path / "t", num_fewshot=2)
    j = tmp_path / "mm" / "val"
    j.mkdir(parents=True)
    (j / "econ.jsonl").write_text('{"question": "q", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(EvalError, match=r"econ.jsonl:1: answer 2 is outside the 2 options"):
        write_exam_tasks(tmp_path / "mm", tmp_path / "t")


def test_tokenizer_mismatch(setup, tmp_path):
    from megatron_jinpan.data.tokenizer import extend_tokenizer
    from megatron_jinpan.eval.engine import EvalModel

    root, ours, _, _, _ = setup
    big = tmp_path / "big.model"
    extend_tokenizer(root / "tok" / "tokenizer.model", [f"piece{i}" for i in range(300)], big)
    with pytest.raises(EvalError, match="has 620 tokens but checkpoint .* has vocab_size=320"):
        EvalModel.open(str(ours), tokenizer=str(big))


def test_loglikelihood_rolling(setup):
    """A whole document: one window = log p(doc | BOS); windows of max_length cover every token once."""
    from lm_eval.api.instance import Instance

    from megatron_jinpan.eval.engine import EvalModel
    from megatron_jinpan.eval.lm import JinpanLM

    _, ours, _, _, _ = setup
    model = EvalModel.open(str(ours))
    text = "the market rose 营业 收入 增长 利润 银行 股票 bond rate profit revenue 公司 市场"
    ids = model.tokenizer.encode(text)
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    whole = JinpanLM(model=model).loglikelihood_rolling(request)[0]
    assert whole == pytest.approx(model.score([([model.tokenizer.bos_id], ids)])[0][0], abs=1e-4)
    calls = []
    score = model.score
    model.score = lambda reqs, batch_size=8: calls.extend(reqs) or score(reqs, batch_size)
    windowed = JinpanLM(model=model, max_length=8).loglikelihood_rolling(request)[0]
    model.close()
    assert sum(len(cont) for _, cont in calls) == len(ids) and all(len(c) + len(x) <= 9 for c, x in calls)
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-3)  # less context, another number
