"""What every benchmark row records about where it ran: commit, hardware, versions, time, and on a GPU
the driver, clocks, ECC mode and NVLink/PCIe topology from NVML (telemetry.metadata; absent without it)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def hardware() -> str:
    import torch

    from .. import device as devices

    if devices.accelerator_available():
        from .. import telemetry

        device = devices.resolve_device("auto", 0)
        nvml = telemetry.metadata(device)
        extra = ", ".join(f"{k[4:]} {nvml[k]}" for k in ("gpu_driver", "gpu_ecc", "gpu_nvlink_links", "gpu_pcie")
                          if k in nvml)
        return devices.device_name(device) + (f" ({extra})" if extra else "")
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} {os.cpu_count()} cores, torch {torch.__version__}"


def run_metadata(device) -> dict:
    """device name, torch/triton versions, git commit and time, for the rows of a benchmark CSV;
    plus gpu_driver, gpu_*clock*, gpu_ecc, gpu_pcie, gpu_nvlink_links, gpu_topology where NVML answers."""
    import torch

    from .. import device as devices
    from .. import telemetry

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {"device": devices.device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit(), "time": datetime.datetime.now().isoformat(timespec="seconds"),
            **telemetry.metadata(device)}
