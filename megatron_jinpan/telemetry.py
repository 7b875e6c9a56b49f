"""GPU telemetry through NVML (`pynvml`, from the nvidia-ml-py package), beside device.py.

    from megatron_jinpan import telemetry
    telemetry.sample(device)     # {"gpu_util_pct": 97, "gpu_power_w": 612.4, ...} now, for this rank's GPU
    telemetry.metadata(device)   # driver, clocks, ECC, NVLink/PCIe topology, for benchmark CSVs

On a CPU, without the nvidia-ml-py package or without a driver, both return
{}: the fields are simply absent, never an error, and nothing is printed.
Each field is read on its own, so a GPU that does not report one (e.g.
power on some boards) still reports the others.

Throttle reasons are NVML's bitmask (nvml.h `nvmlClocksEventReason*`);
`throttle_names(mask)` spells it out. The idle bit alone is not a problem.
"""
from __future__ import annotations

from . import device as devices

SAMPLE_FIELDS = ("gpu_util_pct", "gpu_mem_used_gb", "gpu_power_w", "gpu_sm_clock_mhz", "gpu_temp_c",
                 "gpu_throttle_reasons")

# nvml.h clocks-event (throttle) reason bits; stable across driver versions.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}

_state: dict = {}  # "nvml": the initialised pynvml module, or None once it is known to be unusable


def _nvml():
    """pynvml, initialised once per process; None when it is missing or NVML cannot start."""
    if "nvml" not in _state:
        try:
            import pynvml

            pynvml.nvmlInit()
            _state["nvml"] = pynvml
        except Exception:  # no package, no driver, no GPU: telemetry is simply off
            _state["nvml"] = None
    return _state["nvml"]


def reset() -> None:
    """Forget the NVML state (tests swap the pynvml module)."""
    _state.clear()


def _handle(nvml, device_id):
    if isinstance(device_id, str):
        return nvml.nvmlDeviceGetHandleByUUID(device_id)
    return nvml.nvmlDeviceGetHandleByIndex(int(device_id))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read(out: dict, key: str, fn) -> None:
    try:
        out[key] = fn()
    except Exception:  # this GPU does not report the field: leave it out
        pass


def _open(device, device_id):
    """(nvml, handle) of one GPU given its torch device or NVML index / UUID; (None, None) without NVML."""
    if device_id is None:
        device_id = devices.nvml_device_id(device) if device is not None else None
    nvml = _nvml() if device_id is not None else None
    if nvml is None:
        return None, None
    try:
        return nvml, _handle(nvml, device_id)
    except Exception:
        return None, None


def sample(device=None, device_id=None) -> dict:
    """Utilisation, memory used, power, SM clock, temperature and throttle reasons of one GPU, now.
    Pass the torch device (its NVML id is looked up) or an NVML index / UUID."""
    nvml, h = _open(device, device_id)
    if h is None:
        return {}
    clock_sm = getattr(nvml, "NVML_CLOCK_SM", 1)
    temp_gpu = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
    reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons")
    out: dict = {}
    _read(out, "gpu_util_pct", lambda: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu))
    _read(out, "gpu_mem_used_gb", lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30)
    _read(out, "gpu_power_w", lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW
    _read(out, "gpu_sm_clock_mhz", lambda: float(nvml.nvmlDeviceGetClockInfo(h, clock_sm)))
    _read(out, "gpu_temp_c", lambda: float(nvml.nvmlDeviceGetTemperature(h, temp_gpu)))
    _read(out, "gpu_throttle_reasons", lambda: int(reasons(h)))
    return out


def throttle_names(mask: int) -> list[str]:
    """The reasons set in an NVML throttle bitmask, e.g. 0x24 -> ['sw_power_cap', 'sw_thermal']."""
    mask = int(mask)
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    return names + ([f"0x{unknown:x}"] if unknown else [])


def metadata(device=None, device_id=None) -> dict:
    """Driver, GPU clocks, ECC mode and interconnect of one GPU (plus how it reaches the others),
    for the metadata columns of every benchmark. {} without NVML."""
    nvml, h = _open(device, device_id)
    if h is None:
        return {}
    clock_sm = getattr(nvml, "NVML_CLOCK_SM", 1)
    clock_mem = getattr(nvml, "NVML_CLOCK_MEM", 2)
    out: dict = {}
    _read(out, "gpu_driver", lambda: _text(nvml.nvmlSystemGetDriverVersion()))
    _read(out, "gpu_name", lambda: _text(nvml.nvmlDeviceGetName(h)))
    _read(out, "gpu_max_sm_clock_mhz", lambda: int(nvml.nvmlDeviceGetMaxClockInfo(h, clock_sm)))
    _read(out, "gpu_max_mem_clock_mhz", lambda: int(nvml.nvmlDeviceGetMaxClockInfo(h, clock_mem)))
    _read(out, "gpu_sm_clock_mhz", lambda: int(nvml.nvmlDeviceGetClockInfo(h, clock_sm)))
    _read(out, "gpu_power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)
    _read(out, "gpu_ecc", lambda: "on" if nvml.nvmlDeviceGetEccMode(h)[0] else "off")
    _read(out, "gpu_pcie", lambda: f"gen{nvml.nvmlDeviceGetCurrPcieLinkGeneration(h)} "
                                   f"x{nvml.nvmlDeviceGetCurrPcieLinkWidth(h)}")
    _read(out, "gpu_nvlink_links", lambda: _active_nvlinks(nvml, h))
    _read(out, "gpu_topology", lambda: _topology(nvml, h))
    return out


def _active_nvlinks(nvml, h) -> int:
    active = 0
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            active += int(bool(nvml.nvmlDeviceGetNvLinkState(h, link)))
        except Exception:  # past the last link of this GPU, or no NVLink at all
            break
    return active


_TOPOLOGY_LEVELS = {0: "internal", 10: "pcie-switch", 20: "pcie-switches", 30: "pcie-host-bridge", 40: "numa-node",
                    50: "system"}


def _topology(nvml, h) -> str:
    """How this GPU reaches each other GPU of the node: 'i:level' items, the PCIe common ancestor
    (NVLink-connected pairs are additionally counted in gpu_nvlink_links)."""
    items = []
    for i in range(nvml.nvmlDeviceGetCount()):
        other = nvml.nvmlDeviceGetHandleByIndex(i)
        try:
            level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(h, other))
        except Exception:
            continue
        if level:  # 0 = the GPU itself
            items.append(f"{i}:{_TOPOLOGY_LEVELS.get(level, level)}")
    return " ".join(items)
