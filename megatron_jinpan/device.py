"""The one place that knows about accelerators (DESIGN rule 1).

Everything else asks this module for the device, the distributed backend,
memory figures and the peak FLOP/s used for MFU, so every code path runs on
CPU with gloo and on GPU with nccl unchanged.
"""
from __future__ import annotations

import functools
import os
import time

import torch


def accelerator_available() -> bool:
    return torch.cuda.is_available()


def is_accelerator(device_type: str) -> bool:
    """Whether tensors of this device type run on a GPU (where Triton kernels are the default)."""
    return device_type == "cuda"


def default_device_type() -> str:
    return "cuda" if accelerator_available() else "cpu"


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' picks the local GPU when there is one, else the CPU."""
    if name == "auto":
        name = default_device_type()
    if name == "cuda":
        if not accelerator_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        idx = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device(name)


def distributed_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_memory_gb(device: torch.device) -> float:
    """Peak allocated memory since the last reset (GPU), or the process RSS high-water mark (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:  # pragma: no cover - non-Linux
        return 0.0


def pin_memory(value):
    """A page-locked copy of a host tensor (so host-to-GPU copies are asynchronous); anything else as is."""
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and accelerator_available():
        return value.pin_memory()
    return value


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


# Dense bf16 peak (TFLOP/s) by device-name substring; used only for MFU.
_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A800": 312.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
}


def peak_tflops(device: torch.device) -> float | None:
    """Peak dense bf16 TFLOP/s of the device, or None where unknown (CPU: MFU is null)."""
    override = os.environ.get("JINPAN_PEAK_TFLOPS")
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on GPU; on CPU bf16 autocast too (slow but correct), fp32 = no-op."""
    import contextlib

    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def manual_seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if accelerator_available():
        torch.cuda.manual_seed_all(seed)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Stopwatch:
    """Sums the durations of timed regions: the host clock on CPU (or with host=True), device events on
    a GPU, so asynchronous kernels are timed when they actually run. Events are read back only in
    `seconds()` (one synchronisation), which keeps timing every step cheap.

        sw = Stopwatch(device)
        t = sw.start(); ...; sw.stop(t)
        sw.seconds(); sw.reset()
    """

    def __init__(self, device: torch.device, host: bool = False):
        self.events = device.type == "cuda" and not host
        self.total = 0.0
        self.pending: list = []

    def start(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pending.append((started, event))
        else:
            self.total += time.perf_counter() - started

    def seconds(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self.pending) / 1e3
            self.pending.clear()
        return self.total

    def reset(self) -> None:
        self.total = 0.0
        self.pending.clear()


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (kernels size their grids by it), queried once per device."""
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(index: int) -> int:
    try:
        return int(torch.cuda.get_device_properties(index).multi_processor_count)
    except Exception:  # pragma: no cover - exotic drivers
        return 128


def nvml_device_id(device: torch.device) -> int | str | None:
    """What NVML calls this device: its UUID (robust to CUDA_VISIBLE_DEVICES), or None off GPU."""
    if device.type != "cuda" or not accelerator_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    except Exception:
        return index
