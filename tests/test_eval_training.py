"""`train.eval_tasks`: exams and classification during pretraining -> eval_acc_<name> in metrics.jsonl."""
import json

import pytest

from eval_fixtures import exam_dir, trained_run
from megatron_jinpan.config import ConfigError


def test_eval_tasks_logged_and_equal_to_eval_mcq(tmp_path):
    from megatron_jinpan.eval.harness import run_harness
    from megatron_jinpan.eval.local_tasks import write_exam_tasks

    exam = exam_dir(tmp_path, subjects=("banking",), n_val=4)
    sent = tmp_path / "sent.jsonl"
    sent.write_text("\n".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in
                              [("利润 上涨", "pos"), ("收入 下跌", "neg"), ("股票 上涨", "pos")]) + "\n")
    tasks = (f"train.eval_tasks=[{{name: exam, exam: {exam}}}, "
             f"{{name: senti, classify: {sent}, labels: 'pos:积极,neg:消极'}}]")
    run, records = trained_run(tmp_path, extra=[tasks])
    last = records[-1]
    assert {"eval_acc_exam", "eval_acc_norm_exam", "eval_acc_senti", "eval_macro_f1_senti"} <= set(last)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval_acc_exam"] == last["eval_acc_exam"]
    # The same number as `jinpan eval mcq` on the checkpoint saved at that step.
    group, _ = write_exam_tasks(exam, tmp_path / "t", name="again")
    results, model = run_harness({"checkpoint": str(run), "tasks": [group], "include_path": [str(tmp_path / "t")]})
    model.close()
    assert results["results"]["again_banking"]["acc,none"] == pytest.approx(last["eval_acc_exam"])


def test_eval_tasks_bad_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"train.eval_tasks\[0\] needs exactly one of exam"):
        trained_run(tmp_path, extra=["train.eval_tasks=[{name: x}]"])
    with pytest.raises(ConfigError, match=r"unknown key train.eval_tasks\[0\].shots"):
        trained_run(tmp_path, extra=["train.eval_tasks=[{name: x, exam: d, shots: 1}]"])
