"""`python benchmarks/scaling.py --smoke --out <tmp>` runs and writes one CSV row per run."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_sweep(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "scaling_smoke.csv")))
    assert len(rows) >= 4
    ok = [r for r in rows if r["status"] == "ok"]
    assert {int(r["world_size"]) for r in ok} >= {1, 2}
    for r in ok:
        assert float(r["tokens_per_s"]) > 0 and float(r["step_time_s"]) > 0
        assert float(r["peak_mem_mb"]) > 0 and r["git_commit"] and r["hardware"]
        if int(r["world_size"]) > 1:
            assert int(r["comm_bytes_per_step"]) > 0
