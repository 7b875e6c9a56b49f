"""benchmarks/overhead.py --mode interleaved: a plain Hugging Face step runs inside each of our steps and is
timed apart from it (short sequences here: a check that the measurement works, not a speed claim)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("overhead", sys.argv[1] + "/benchmarks/overhead.py")
overhead = importlib.util.module_from_spec(spec)
spec.loader.exec_module(overhead)
overhead.SEQ = 32
calls = []
real_call = overhead.PlainLoop.__call__
def counted(self):
    seconds = real_call(self)
    calls.append(seconds)
    return seconds
overhead.PlainLoop.__call__ = counted
ours, plain = overhead.interleaved(3, 1, sys.argv[2])
n_calls = len(calls)
ours_ms, plain_ms = overhead.profile_ops(1, sys.argv[2] + "-profiled")
rows = overhead.profile_rows(ours_ms, plain_ms, top=5)
print(json.dumps({"ours": ours, "plain": plain, "calls": calls[:n_calls], "profile_rows": rows,
                  "profiled_plain_steps": len(calls) - n_calls}))
"""


def test_interleaved_overhead_measurement(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["calls"]) == 3  # one plain step inside each of our three steps
    assert out["ours"] > 0 and out["plain"] > 0
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(metrics) == 3
    # each plain step ran inside our timed step (which is why interleaved() subtracts it)
    assert all(m["step_time_s"] > c for m, c in zip(metrics, out["calls"]))
    # --profile-out: both loops profiled (two warm-up steps + one profiled plain step), GEMMs found in both
    assert out["profiled_plain_steps"] == 3
    rows = {r["op"]: r for r in out["profile_rows"]}
    for loop in ("ours_ms_per_step", "plain_hf_ms_per_step"):
        assert rows["aten::mm"][loop] > 0
        assert rows["GEMM"][loop] + rows["non-GEMM"][loop] == pytest.approx(rows["TOTAL"][loop])


def test_profile_rows_totals_and_order():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    rows = overhead.profile_rows({"aten::mm": 10.0, "aten::mul": 3.0, "aten::max": 1.0},
                                 {"aten::mm": 9.0, "aten::addmm": 2.0, "aten::_log_softmax": 4.0}, top=3)
    assert [r["op"] for r in rows] == ["TOTAL", "GEMM", "non-GEMM", "aten::mm", "aten::_log_softmax", "aten::mul"]
    assert (rows[0]["ours_ms_per_step"], rows[0]["plain_hf_ms_per_step"]) == (14.0, 15.0)
    assert (rows[1]["ours_ms_per_step"], rows[1]["plain_hf_ms_per_step"]) == (10.0, 11.0)
    assert (rows[2]["ours_ms_per_step"], rows[2]["plain_hf_ms_per_step"]) == (4.0, 4.0)
    assert rows[4]["ours_ms_per_step"] == 0.0  # an op only one loop runs
