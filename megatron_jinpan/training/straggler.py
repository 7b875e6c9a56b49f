"""Straggler detector: which rank sets the pace of every step, and the GPU telemetry that explains it.

    jinpan pretrain --config configs/pretrain/demo.yaml --nproc 4 parallel.tp=2 parallel.pp=2 \\
        log.straggler_interval=10 log.straggler_threshold=1.1

In synchronous training every rank waits for the slowest one, so wall time
per step is the same everywhere and says nothing about who is slow. What
differs is how a rank spends it. Each rank times, every step:

- `data_s`      fetching its micro-batches (host time; with prefetch, the wait for them);
- `forward_s`   inside its model chunks' forward (TP collectives of the forward included);
- `backward_s`  the rest of forward_backward: backward compute, TP collectives of the
                backward, pipeline receives;
- `optimizer_s` the optimizer step (waiting for DP gradient reductions, grad norm, update,
                ZeRO-1 parameter all-gathers);
- `comm_s`      time *blocked* in communication (parallel/comm.py: synchronous collectives
                and waits on asynchronous handles), wherever it happens in the step;
- `step_s`      the whole step; and `busy_s = step_s - comm_s`: time spent working rather
                than waiting for other ranks. A straggler has the largest busy time; its
                peers show the same step time but a large comm_s (they wait for it).

Every `log.straggler_interval` steps each rank averages these over the interval,
adds its GPU telemetry (telemetry.py; absent without NVML), and one all-gather
of that small vector (world x 13 float64) gives every rank the table. The score
of a rank is busy_s / median busy_s of comparable ranks: those of the same
pipeline stage (identical work; stages differ, the last one has the LM head
and loss) when the stage has >= 2 ranks, else all ranks.
metrics.jsonl / TensorBoard get `straggler_*` keys (slowest and fastest rank,
their (pp, dp, tp) coordinates, host, score and phase times) and cross-rank
max/min of the telemetry (`gpu_*_max`/`gpu_*_min`); the console gets one line
when a rank's score exceeds `log.straggler_threshold`.

Timers use device events on a GPU (read back once per interval), the host
clock on CPU; with the detector off (interval 0) nothing is timed.
"""
from __future__ import annotations

import contextlib
import math
import socket

import torch

from .. import device as devices
from .. import telemetry
from ..parallel import comm
from ..parallel.mesh import rank_coords

TIMES = ("data_s", "forward_s", "backward_s", "optimizer_s", "comm_s", "step_s", "busy_s")
FIELDS = TIMES + telemetry.SAMPLE_FIELDS
PHASES = ("data_s", "forward_s", "backward_s", "optimizer_s", "comm_s")


class NullTimers:
    """What run_step times with when no detector is given: nothing."""

    def phase(self, name: str):
        return contextlib.nullcontext()


NO_TIMERS = NullTimers()


class StragglerDetector:
    def __init__(self, cfg, mesh, chunks):
        self.interval = int(cfg.log.straggler_interval)
        self.threshold = float(cfg.log.straggler_threshold)
        self.mesh = mesh
        self.enabled = self.interval > 0
        self.hosts: list | None = None
        self._active = False
        if self.interval < 0:
            from ..config import ConfigError

            raise ConfigError(f"log.straggler_interval={self.interval} must be >= 0 (0 = off)")
        if not self.enabled:
            return
        dev = mesh.device
        self.watches = {name: devices.Stopwatch(dev) for name in ("forward", "forward_backward", "optimizer", "comm")}
        self.watches["step"] = devices.Stopwatch(dev, host=True)
        self.data_s = 0.0
        self.steps = 0
        self.samples: list[dict] = []
        self._forward_starts: list = []
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            module.register_forward_pre_hook(self._forward_start)
            module.register_forward_hook(self._forward_stop)

    # ------------------------------------------------------------------ timing
    def _forward_start(self, *args):
        if self._active:
            self._forward_starts.append(self.watches["forward"].start())

    def _forward_stop(self, *args):
        if self._active and self._forward_starts:
            self.watches["forward"].stop(self._forward_starts.pop())

    @contextlib.contextmanager
    def step(self):
        """Time one training step (data included); comm.py adds the blocked time."""
        if not self.enabled:
            yield
            return
        started = self.watches["step"].start()
        self._active = True
        try:
            with comm.blocked_time(self.watches["comm"]):
                yield
        finally:
            self._active = False
            self._forward_starts.clear()
            self.watches["step"].stop(started)
        self.steps += 1
        self.samples.append(telemetry.sample(self.mesh.device))

    @contextlib.contextmanager
    def phase(self, name: str):
        """run_step's phases: "forward_backward" and "optimizer"."""
        if not (self.enabled and self._active):
            yield
            return
        watch = self.watches[name]
        started = watch.start()
        try:
            yield
        finally:
            watch.stop(started)

    def add_data_time(self, seconds: float) -> None:
        if self.enabled and self._active:
            self.data_s += seconds

    # ------------------------------------------------------------------ reporting
    def _local_row(self) -> list[float]:
        n = max(self.steps, 1)
        sec = {name: watch.seconds() / n for name, watch in self.watches.items()}
        row = {"data_s": self.data_s / n, "forward_s": sec["forward"],
               "backward_s": max(sec["forward_backward"] - sec["forward"], 0.0), "optimizer_s": sec["optimizer"],
               "comm_s": sec["comm"], "step_s": sec["step"], "busy_s": max(sec["step"] - sec["comm"], 0.0)}
        row.update(summarize_samples(self.samples))
        return [float(row.get(key, math.nan)) for key in FIELDS]

    def _reset(self) -> None:
        for watch in self.watches.values():
            watch.reset()
        self.data_s = 0.0
        self.steps = 0
        self.samples = []

    def report(self, step: int, writer=None) -> dict:
        """Every `interval` steps (all ranks call it after every step): gather the per-rank table,
        return the straggler_* / gpu_* metrics and print the console line on the logging rank.
        {} on the other steps and when the detector is off."""
        if not self.enabled or step % self.interval or self.steps == 0:
            return {}
        mesh = self.mesh
        if self.hosts is None:
            self.hosts = comm.all_gather_object(socket.gethostname())
        local = torch.tensor(self._local_row(), dtype=torch.float64, device=mesh.device)
        table = torch.empty(mesh.world_size * len(FIELDS), dtype=torch.float64, device=mesh.device)
        comm.all_gather_into_tensor(table, local)
        self._reset()
        rows = [dict(zip(FIELDS, r)) for r in table.view(mesh.world_size, len(FIELDS)).tolist()]
        coords = [rank_coords(r, mesh.tp, mesh.dp) for r in range(mesh.world_size)]
        metrics, lines = build_report(rows, coords, self.hosts, self.threshold)
        if mesh.is_logging_rank:
            for line in lines:
                text = f"step {step}: {line}"
                if writer is not None and getattr(writer, "bar", None) is not None:
                    writer.bar.write(text)
                else:
                    print(text, flush=True)
        return metrics


def summarize_samples(samples: list[dict]) -> dict:
    """One rank's telemetry over an interval: means, memory at its max, throttle reasons OR-ed."""
    out = {}
    for key in telemetry.SAMPLE_FIELDS:
        values = [s[key] for s in samples if key in s]
        if not values:
            continue
        if key == "gpu_throttle_reasons":
            mask = 0
            for v in values:
                mask |= int(v)
            out[key] = mask
        elif key == "gpu_mem_used_gb":
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def scores(rows: list[dict], coords: list[tuple]) -> list[float]:
    """busy_s of each rank over the median busy_s of its comparable ranks (same pipeline stage when the
    stage has >= 2 ranks — stages do different work — else all ranks)."""
    all_busy = [r["busy_s"] for r in rows]
    by_stage: dict = {}
    for r, (pp, _, _) in zip(rows, coords):
        by_stage.setdefault(pp, []).append(r["busy_s"])
    out = []
    for r, (pp, _, _) in zip(rows, coords):
        peers = by_stage[pp] if len(by_stage[pp]) >= 2 else all_busy
        median = _median(peers)
        out.append(r["busy_s"] / median if median > 0 else 1.0)
    return out


def _where(rank: int, coords: list[tuple], hosts: list) -> str:
    pp, dp, tp = coords[rank]
    return f"rank {rank} (pp {pp}, dp {dp}, tp {tp}) on {hosts[rank]}"


def _gpu_text(row: dict) -> str:
    parts = []
    if not math.isnan(row.get("gpu_util_pct", math.nan)):
        parts.append(f"util {row['gpu_util_pct']:.0f}%")
    if not math.isnan(row.get("gpu_temp_c", math.nan)):
        parts.append(f"{row['gpu_temp_c']:.0f}C")
    if not math.isnan(row.get("gpu_power_w", math.nan)):
        parts.append(f"{row['gpu_power_w']:.0f} W")
    if not math.isnan(row.get("gpu_sm_clock_mhz", math.nan)):
        parts.append(f"SM {row['gpu_sm_clock_mhz']:.0f} MHz")
    throttle = row.get("gpu_throttle_reasons", math.nan)
    if not math.isnan(throttle):
        names = [n for n in telemetry.throttle_names(int(throttle)) if n != "gpu_idle"]
        parts.append("throttle: " + (",".join(names) if names else "none"))
    return f" [gpu {' '.join(parts)}]" if parts else ""


def build_report(rows: list[dict], coords: list[tuple], hosts: list, threshold: float) -> tuple[dict, list[str]]:
    """(metrics, console lines) from the gathered per-rank rows (FIELDS; NaN = not measured)."""
    score = scores(rows, coords)
    slow = max(range(len(rows)), key=lambda r: score[r])
    fast = min(range(len(rows)), key=lambda r: score[r])
    metrics: dict = {"straggler_median_busy_s": _median([r["busy_s"] for r in rows]),
                     "straggler_median_step_s": _median([r["step_s"] for r in rows])}
    for tag, rank in (("slowest", slow), ("fastest", fast)):
        pp, dp, tp = coords[rank]
        metrics.update({f"straggler_{tag}_rank": rank, f"straggler_{tag}_pp": pp, f"straggler_{tag}_dp": dp,
                        f"straggler_{tag}_tp": tp, f"straggler_{tag}_host": hosts[rank],
                        f"straggler_{tag}_score": score[rank]})
        for key in ("busy_s",) + PHASES:
            metrics[f"straggler_{tag}_{key}"] = rows[rank][key]
    for key in telemetry.SAMPLE_FIELDS:
        if not math.isnan(rows[slow][key]):
            metrics[f"straggler_slowest_{key}"] = rows[slow][key]
        values = [r[key] for r in rows if not math.isnan(r[key])]
        if not values:
            continue
        if key == "gpu_throttle_reasons":
            idle = 0x1
            metrics["gpu_throttled_ranks"] = sum(1 for v in values if int(v) & ~idle)
        else:
            metrics[f"{key}_max"], metrics[f"{key}_min"] = max(values), min(values)
    over = sorted((r for r in range(len(rows)) if score[r] > threshold), key=lambda r: -score[r])
    metrics["straggler_count"] = len(over)
    lines = []
    for rank in over[:3]:
        row = rows[rank]
        phases = " ".join(f"{k[:-2]} {row[k]:.3f}" for k in PHASES)
        lines.append(f"straggler: {_where(rank, coords, hosts)} is {score[rank]:.2f}x the median busy time "
                     f"({row['busy_s']:.3f} s/step; {phases}){_gpu_text(row)}; fastest {_where(fast, coords, hosts)} "
                     f"{score[fast]:.2f}x")
    if len(over) > 3:
        lines.append(f"straggler: {len(over) - 3} more ranks above {threshold}x the median busy time")
    return metrics, lines
