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


def test_embedding_gradient_sits_alone_in_the_last_bucket():
    """The last gradient of backward (the token embedding) does not hold back the layer-0 weights,
    and the comm model's bucket sizes mirror the engine's layout."""
    from types import SimpleNamespace

    import torch

    from megatron_jinpan.config import load_config
    from megatron_jinpan.models import Llama
    from megatron_jinpan.parallel.data import DataParallel
    from megatron_jinpan.perf.comm_model import bucket_numels

    for bucket_mb in ("25", "0.01"):
        cfg = load_config(None, ["model.name=debug", f"parallel.bucket_mb={bucket_mb}"])
        model = Llama(cfg.model)
        mesh = SimpleNamespace(dp=2, dp_rank=0, pp=1, tp=1, tp_rank=0, device=torch.device("cpu"), dp_group=None)
        dp = DataParallel(model, mesh, cfg)
        assert dp.buckets[-1].params == ["embed_tokens.weight"]
        assert "embed_tokens.weight" not in dp.buckets[-2].params
        params = [(n, p.numel()) for n, p in model.named_parameters()]
        assert bucket_numels(params, 2, float(bucket_mb)) == [b.numel for b in dp.buckets]
