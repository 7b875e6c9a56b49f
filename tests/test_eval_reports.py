"""Classification metrics and `jinpan eval classify`, and `jinpan eval compare` over reports and steps."""
import json

import pytest

from eval_fixtures import hf_and_ours, trained_run
from megatron_jinpan.eval.harness import classification_metrics


def test_classification_metrics_hand_made():
    # gold: a a a b b c ; pred: a a b b c c
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    a, b, c = m["per_class"]
    assert (a["precision"], a["recall"]) == (1.0, pytest.approx(2 / 3)) and a["f1"] == pytest.approx(0.8)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"]) == (0.5, 1.0) and c["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert classification_metrics([0, 0], [1, 1], ["x", "y"])["per_class"][1]["f1"] == 0.0  # no support, no div by 0


def test_classify_command(tmp_path_factory, tmp_path):
    from megatron_jinpan.cli import main
    from megatron_jinpan.eval.engine import EvalModel

    root = tmp_path_factory.mktemp("cls")
    ours, _ = hf_and_ours(root)
    data = tmp_path / "sent.jsonl"
    texts = [("利润 上涨", "pos"), ("收入 下跌", "neg"), ("银行 股票 上涨", "pos"), ("债券 下跌 市场", "neg"),
             ("公司 增长", "pos")]
    data.write_text("\n".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in texts) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "classify", "--checkpoint", str(ours), "--data", str(data), "--labels", "pos:积极,neg:消极",
                 "--prompt", "{text}\n情感：", "--output_path", str(out)]) == 0
    report = json.loads((out / "classify.json").read_text())
    # Predictions are the arg-max of our own log-likelihoods of the label words.
    model = EvalModel.open(str(ours))
    tok = model.tokenizer
    preds = []
    for t, _ in texts:
        ctx = [tok.bos_id] + tok.encode(f"{t}\n情感：")
        scores = []
        for word in ("积极", "消极"):
            whole = [tok.bos_id] + tok.encode(f"{t}\n情感：{word}")
            scores.append(model.score([(ctx, whole[len(ctx):])])[0][0])
        preds.append("pos" if scores[0] > scores[1] else "neg")
    model.close()
    assert [p["pred"] for p in report["predictions"]] == preds
    assert [p["gold"] for p in report["predictions"]] == [y for _, y in texts]
    golds = [0 if y == "pos" else 1 for _, y in texts]
    expect = classification_metrics(golds, [0 if p == "pos" else 1 for p in preds], ["pos", "neg"])
    assert report["accuracy"] == pytest.approx(expect["accuracy"]) and report["macro_f1"] == pytest.approx(expect["macro_f1"])
    assert "macro avg" in (out / "classify.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "pos"}\n{"text": "y", "label": "meh"}\n')
    assert main(["eval", "classify", "--checkpoint", str(ours), "--data", str(bad), "--labels", "pos,neg",
                 "--output_path", str(tmp_path / "o2")]) == 2


def test_compare_reports_and_steps(tmp_path_factory, tmp_path):
    from megatron_jinpan.eval.compare import run_compare
    from megatron_jinpan.eval.report import write_json

    root = tmp_path_factory.mktemp("cmp")
    run, records = trained_run(root, steps=2)
    a, b = tmp_path / "base", tmp_path / "sft"
    write_json(a / "mcq.json", {"rows": [{"task": "exam", "acc": 0.25, "acc_norm": 0.3}]})
    write_json(b / "mcq" / "mcq.json", {"rows": [{"task": "exam", "acc": 0.5, "acc_norm": 0.45}]})
    write_json(b / "judge.json", {"win_rate": 0.6, "tie_adjusted_win_rate": 0.7})
    out = run_compare([str(a), str(b), str(run)], tmp_path / "cmp", names="base,sft,cpt",
                      data=[f"zh={root / 'data' / 'zh_valid'}"])
    m = out["metrics"]
    assert m["base"]["acc/exam"] == 0.25 and m["sft"]["acc/exam"] == 0.5 and m["sft"]["judge/win_rate"] == 0.6
    assert m["cpt"]["last eval_loss_zh"] == pytest.approx(records[-1]["eval_loss_zh"])
    assert "ppl/zh" in m["cpt"] and (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| metric | base | sft | cpt |" in table and "| acc/exam | 0.2500 | 0.5000 | - |" in table
    steps = run_compare([str(run)], tmp_path / "steps", all_steps=True, data=[f"zh={root / 'data' / 'zh_valid'}"])
    assert steps["columns"] == ["run@2"] and "ppl/zh" in steps["metrics"]["run@2"]


def test_demo_eval_sets_are_valid_inputs(tmp_path):
    from megatron_jinpan.eval.demo import build_eval_demo
    from megatron_jinpan.eval.generate import read_questions
    from megatron_jinpan.eval.local_tasks import read_classify_jsonl, write_exam_tasks

    paths = build_eval_demo(tmp_path / "eval", log=lambda *_: None)
    group, subjects = write_exam_tasks(paths["exam"], tmp_path / "t", name="demo_exam", num_fewshot=2)
    assert len(subjects) == 5 and (tmp_path / "t" / "demo_exam.yaml").is_file()
    _, en = write_exam_tasks(paths["exam_en"], tmp_path / "t", name="demo_exam_en", num_fewshot=2)
    assert len(en) == 3
    records, labels = read_classify_jsonl(paths["sentiment"])
    assert set(labels) == {"positive", "negative"} and len(records) == 200
    assert len(read_questions(paths["qa"])) == 60
    before = (tmp_path / "eval" / "qa.jsonl").read_text()
    build_eval_demo(tmp_path / "eval", log=lambda *_: None)  # idempotent: existing files are kept
    assert (tmp_path / "eval" / "qa.jsonl").read_text() == before
