"""Straggler detector and NVML telemetry (training/straggler.py, telemetry.py).

    python -m pytest -q tests/test_straggler.py
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import types

import pytest
import torch
import torch.multiprocessing as mp

from megatron_jinpan import telemetry
from megatron_jinpan.parallel.local import free_port, set_worker_env
from megatron_jinpan.training import straggler

BASE = [
    "model.name=debug", "data.mock=true", "train.global_batch=8", "train.micro_batch=2", "train.seq_len=32",
    "train.device=cpu", "optim.warmup=1", "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never",
    "checkpoint.save_on_exit=false",
]
SLOW_RANK = 3        # (pp 1, dp 0, tp 1) under tp=2, pp=2 on 4 processes
DELAY_S = 0.15       # per micro-batch backward: 4 micro-batches -> 0.6 s per step


def _slow_backward_task(cfg, mesh):
    """The default language-model task, with a test-only delay in one rank's backward: a hook on the
    gradient of its first parameter sleeps, once per micro-batch."""
    from megatron_jinpan.parallel.parallelize import build_model
    from megatron_jinpan.training.task import language_model_task

    def build(cfg, mesh):
        chunks = build_model(cfg, mesh)
        if mesh.rank == SLOW_RANK:
            param = next(p for p in chunks[0].parameters() if p.requires_grad)
            param.register_hook(lambda grad: (time.sleep(DELAY_S), grad)[1])
        return chunks

    task = language_model_task(cfg, mesh)
    task.build_model = build
    return task


def _worker(rank, world, port, overrides):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.config import load_config
    from megatron_jinpan.training.loop import pretrain

    pretrain(load_config(None, overrides), make_task=_slow_backward_task)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]


def test_delayed_rank_is_named_with_its_coordinates(tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = BASE + ["parallel.tp=2", "parallel.pp=2", "train.steps=4", "log.straggler_interval=2",
                        f"run_dir={run_dir}"]
    mp.spawn(_worker, args=(4, free_port(), overrides), nprocs=4, join=True)
    reports = [r for r in _records(run_dir) if "straggler_slowest_rank" in r]
    assert [r["step"] for r in reports] == [2, 4]
    for r in reports:
        assert r["straggler_slowest_rank"] == SLOW_RANK
        assert (r["straggler_slowest_pp"], r["straggler_slowest_dp"], r["straggler_slowest_tp"]) == (1, 0, 1)
        assert r["straggler_slowest_host"] == socket.gethostname()
        assert r["straggler_fastest_rank"] != SLOW_RANK
        assert r["straggler_slowest_score"] > 1.1 and r["straggler_count"] >= 1
        # The delay shows as the slow rank's backward; its peers wait for it in communication.
        assert r["straggler_slowest_backward_s"] >= 4 * DELAY_S
        assert r["straggler_fastest_comm_s"] > r["straggler_slowest_comm_s"]
        assert not any(k.startswith("gpu_") for k in r)  # no NVML on this machine: silent
    plain = [r for r in _records(run_dir) if "straggler_slowest_rank" not in r]
    assert [r["step"] for r in plain] == [1, 3] and all("data_time_s" in r for r in plain)


def _row(busy, comm=0.0, **gpu):
    row = {k: math.nan for k in straggler.FIELDS}
    row.update(data_s=0.01, forward_s=busy / 3, backward_s=busy / 2, optimizer_s=0.01, comm_s=comm,
               step_s=busy + comm, busy_s=busy)
    row.update(gpu)
    return row


def test_report_scores_against_the_stage_median_and_spells_out_telemetry():
    # 2 stages x 4 ranks; stage 1 is legitimately slower (it has the LM head): compared within its stage.
    coords = [(pp, dp, 0) for pp in range(2) for dp in range(4)]
    hosts = [f"node{r // 4}" for r in range(8)]
    busy = [1.0, 1.0, 1.0, 1.0, 1.5, 1.5, 2.4, 1.5]
    rows = [_row(b, comm=2.5 - b, gpu_temp_c=60.0 + r, gpu_power_w=500.0, gpu_throttle_reasons=0x1)
            for r, b in enumerate(busy)]
    rows[6]["gpu_throttle_reasons"] = 0x1 | 0x20 | 0x40
    metrics, lines = straggler.build_report(rows, coords, hosts, threshold=1.1)
    assert metrics["straggler_slowest_rank"] == 6 and metrics["straggler_slowest_host"] == "node1"
    assert (metrics["straggler_slowest_pp"], metrics["straggler_slowest_dp"]) == (1, 2)
    assert metrics["straggler_slowest_score"] == pytest.approx(2.4 / 1.5)
    assert metrics["straggler_count"] == 1  # stage 1's 1.5 s is not a straggler against stage 0's 1.0 s
    assert metrics["gpu_temp_c_max"] == 67.0 and metrics["gpu_temp_c_min"] == 60.0
    assert metrics["gpu_throttled_ranks"] == 1 and metrics["straggler_slowest_gpu_temp_c"] == 66.0
    assert len(lines) == 1 and "rank 6 (pp 1, dp 2, tp 0) on node1" in lines[0]
    assert "sw_thermal,hw_thermal" in lines[0] and "gpu_idle" not in lines[0]
    # Without telemetry the gpu fields are absent; below the threshold no console line.
    metrics, lines = straggler.build_report([_row(1.0) for _ in range(4)], coords[:4], hosts[:4], threshold=1.1)
    assert not any("gpu" in k for k in metrics) and lines == [] and metrics["straggler_count"] == 0


class _Reading:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _fake_pynvml(init_error: bool = False) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 1, 2, 0
    nvml.calls = []

    def init():
        if init_error:
            raise RuntimeError("NVML Shared Library Not Found")
    nvml.nvmlInit = init
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nvml.nvmlDeviceGetHandleByUUID = lambda u: ("gpu", u)
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetUtilizationRates = lambda h: _Reading(gpu=87, memory=40)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: _Reading(used=3 * 2**30, total=80 * 2**30)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 412_500  # mW
    nvml.nvmlDeviceGetClockInfo = lambda h, kind: {1: 1755, 2: 2619}[kind]
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, kind: {1: 1980, 2: 2619}[kind]
    nvml.nvmlDeviceGetTemperature = lambda h, kind: 71
    nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4 | 0x20
    nvml.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    nvml.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000

    def ecc(h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # a field the GPU does not report is left out
    nvml.nvmlDeviceGetEccMode = ecc
    nvml.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 5
    nvml.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16

    def nvlink_state(h, link):
        if link >= 18:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return 1
    nvml.nvmlDeviceGetNvLinkState = nvlink_state
    nvml.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: 0 if a == b else 40
    return nvml


@pytest.fixture
def fresh_nvml():
    telemetry.reset()
    yield
    telemetry.reset()


def test_telemetry_fields_from_nvml(monkeypatch, fresh_nvml):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    got = telemetry.sample(device_id=0)
    assert got == {"gpu_util_pct": 87.0, "gpu_mem_used_gb": 3.0, "gpu_power_w": 412.5, "gpu_sm_clock_mhz": 1755.0,
                   "gpu_temp_c": 71.0, "gpu_throttle_reasons": 0x24}
    assert telemetry.throttle_names(got["gpu_throttle_reasons"]) == ["sw_power_cap", "sw_thermal"]
    meta = telemetry.metadata(device_id=0)
    assert meta["gpu_driver"] == "550.54.15" and meta["gpu_max_sm_clock_mhz"] == 1980
    assert meta["gpu_pcie"] == "gen5 x16" and meta["gpu_nvlink_links"] == 18 and meta["gpu_power_limit_w"] == 700.0
    assert meta["gpu_topology"] == "1:numa-node" and "gpu_ecc" not in meta
    assert telemetry.sample(torch.device("cpu")) == {}  # a CPU rank has no GPU to ask about


@pytest.mark.parametrize("missing", ["no package", "no driver"])
def test_missing_nvml_is_silent(monkeypatch, capsys, fresh_nvml, missing):
    monkeypatch.setitem(sys.modules, "pynvml", None if missing == "no package" else _fake_pynvml(init_error=True))
    assert telemetry.sample(device_id=0) == {} and telemetry.metadata(device_id=0) == {}
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_telemetry_reaches_metrics_and_detector_off_adds_nothing(tmp_path, monkeypatch):
    from megatron_jinpan.config import load_config
    from megatron_jinpan.training.loop import pretrain

    samples = iter([{"gpu_temp_c": 60.0 + i, "gpu_util_pct": 90.0, "gpu_throttle_reasons": 0x1} for i in range(4)])
    monkeypatch.setattr(telemetry, "sample", lambda device: next(samples))
    on = pretrain(load_config(None, BASE + ["train.steps=4", "log.straggler_interval=2", f"run_dir={tmp_path}/on"]))
    reports = [r for r in on.records if "straggler_slowest_rank" in r]
    assert [r["step"] for r in reports] == [2, 4]
    # one rank: max = min = its own interval mean
    assert reports[0]["gpu_temp_c_max"] == reports[0]["gpu_temp_c_min"] == 60.5 and reports[1]["gpu_temp_c_max"] == 62.5
    assert reports[0]["gpu_throttled_ranks"] == 0 and reports[0]["straggler_slowest_score"] == 1.0
    assert _records(f"{tmp_path}/on")[1]["gpu_util_pct_max"] == 90.0
    off = pretrain(load_config(None, BASE + ["train.steps=2", f"run_dir={tmp_path}/off"]))
    assert not any(k.startswith(("straggler_", "gpu_")) for r in off.records for k in r)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in off.records]),
                               torch.tensor([r["loss"] for r in on.records[:2]]), rtol=0, atol=0)


def test_benchmark_metadata_carries_driver_clocks_and_topology(monkeypatch, fresh_nvml):
    from megatron_jinpan import device as devices
    from megatron_jinpan.perf.metadata import run_metadata

    assert not any(k.startswith("gpu_") for k in run_metadata(torch.device("cpu")))  # CPU: nothing added
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    monkeypatch.setattr(devices, "nvml_device_id", lambda device: 0)  # as if this were GPU 0
    meta = run_metadata(torch.device("cpu"))
    assert meta["gpu_driver"] == "550.54.15" and meta["gpu_pcie"] == "gen5 x16" and meta["commit"]
