"""benchmarks/overhead.py --mode interleaved: a plain Hugging Face step runs inside each of our steps and is
timed apart from it (short sequences here: a check that the measurement works, not a speed claim)."""
import json
import subprocess
import sys
from pathlib import Path

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
print(json.dumps({"ours": ours, "plain": plain, "calls": calls}))
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
