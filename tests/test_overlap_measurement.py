"""The projection's DP overlap fraction comes from benchmarks/overlap.py's CSV, not an assumption.

    python -m pytest -q tests/test_overlap_measurement.py
"""
import csv

from megatron_jinpan.perf.projection import cpu_overlap_measurement, measured_inputs

FIELDS = ["model", "nproc", "zero", "link_gbps", "hidden_fraction_wait"]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(dict(zip(FIELDS, r)) for r in rows)


def test_latest_reference_rows_per_zero_are_averaged(tmp_path):
    path = tmp_path / "overlap_cpu.csv"
    _write(path, [("tiny", 2, 0, 2.0, 0.5), ("tiny", 2, 1, 2.0, 0.6),      # older rows
                  ("tiny", 2, 0, 8.0, 0.1), ("tiny-L24", 2, 0, 2.0, 0.99),  # other link / model: ignored
                  ("tiny", 2, 0, 2.0, 0.7), ("tiny", 2, 1, 2.0, 0.9)])      # the latest of each zero
    got = cpu_overlap_measurement(path)
    assert abs(got["overlap"] - 0.8) < 1e-9
    assert "zero=0: 0.700" in got["overlap_source"] and "zero=1: 0.900" in got["overlap_source"]
    assert measured_inputs(tmp_path)["overlap"] == got["overlap"]


def test_no_measurement_means_no_value(tmp_path):
    assert cpu_overlap_measurement(tmp_path / "missing.csv") == {}
    _write(tmp_path / "overlap_cpu.csv", [("tiny", 2, 0, 8.0, 0.3)])
    assert "overlap" not in measured_inputs(tmp_path)
