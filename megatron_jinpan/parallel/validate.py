"""Check a config against a world size before any process-group work (DESIGN rule 7).

Every problem is reported at once, each naming the key and the fix.
"""
from __future__ import annotations

import os

from ..config import Config, ConfigError


def layout_problems(cfg: Config, world_size: int) -> list[str]:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    problems: list[str] = []
    if p.tp < 1 or p.pp < 1 or p.virtual_stages < 1:
        return ["parallel.tp, parallel.pp and parallel.virtual_stages must be >= 1"]
    if world_size % (p.tp * p.pp):
        problems.append(f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {p.tp * p.pp}; "
                        f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp/pp")
        return problems
    dp = world_size // (p.tp * p.pp)
    if m.num_heads % p.tp:
        problems.append(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}; pick tp dividing it")
    if m.num_kv_heads % p.tp:
        problems.append(f"model.num_kv_heads={m.num_kv_heads} is not divisible by parallel.tp={p.tp}; "
                        f"pick tp dividing it (or raise model.num_kv_heads)")
    if m.intermediate_size % p.tp:
        problems.append(f"model.intermediate_size={m.intermediate_size} is not divisible by parallel.tp={p.tp}")
    if m.padded_vocab_size(p.tp) % p.tp:
        problems.append(f"padded vocab {m.padded_vocab_size(p.tp)} is not divisible by parallel.tp={p.tp}; "
                        f"set model.vocab_pad_multiple to a multiple of {p.tp}")
    stages = p.pp * p.virtual_stages
    if p.pp_layers is not None:
        if len(p.pp_layers) != stages or any((not isinstance(n, int)) or n < 1 for n in p.pp_layers):
            problems.append(f"parallel.pp_layers must list {stages} positive layer counts (pp*virtual_stages)")
        elif sum(p.pp_layers) != m.num_layers:
            problems.append(f"parallel.pp_layers sums to {sum(p.pp_layers)} but model.num_layers={m.num_layers}")
    elif m.num_layers % stages:
        problems.append(f"model.num_layers={m.num_layers} is not divisible by parallel.pp*virtual_stages={stages}; "
                        f"change pp/virtual_stages or give parallel.pp_layers for an uneven split")
    if p.virtual_stages > 1 and p.pp_schedule != "interleaved":
        problems.append("parallel.virtual_stages > 1 needs parallel.pp_schedule=interleaved")
    if p.pp_schedule == "interleaved" and p.pp > 1 and p.virtual_stages < 2:
        problems.append("parallel.pp_schedule=interleaved needs parallel.virtual_stages >= 2")
    if p.zero not in (0, 1):
        problems.append(f"parallel.zero={p.zero}; choose 0 or 1")
    if t.micro_batch < 1 or t.global_batch < 1:
        problems.append("train.micro_batch and train.global_batch must be >= 1")
    elif t.global_batch % (t.micro_batch * dp):
        problems.append(f"train.global_batch={t.global_batch} is not divisible by train.micro_batch*dp = "
                        f"{t.micro_batch}*{dp}; make global_batch a multiple of {t.micro_batch * dp}")
    else:
        n_micro = t.global_batch // (t.micro_batch * dp)
        if p.pp_schedule == "interleaved" and p.pp > 1 and n_micro % p.pp:
            problems.append(f"interleaved schedule needs micro-batches per step ({n_micro}) divisible by "
                            f"parallel.pp={p.pp}; change train.global_batch or train.micro_batch")
    if p.sp and p.tp > 1 and t.seq_len % p.tp:
        problems.append(f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp} (needed by parallel.sp)")
    if t.seq_len > m.max_seq_len:
        problems.append(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                        f"lower train.seq_len or set model.max_seq_len")
    if t.steps < 1:
        problems.append("train.steps must be >= 1")
    return problems


def kernel_problems(cfg: Config) -> list[str]:
    """kernels.*=triton where Triton cannot run: no GPU for this run and no TRITON_INTERPRET=1.
    (Otherwise Triton itself fails deep inside the first kernel launch with '0 active drivers'.)"""
    from .. import device as devices

    keys = [k for k in ("attention", "norm", "rope", "swiglu") if getattr(cfg.kernels, k) == "triton"]
    if not keys or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return []
    device = cfg.train.device
    if devices.accelerator_available() and (device == "auto" or devices.is_accelerator(device.split(":")[0])):
        return []
    why = (f"train.device={device} runs on the CPU" if devices.accelerator_available()
           else "no GPU driver or device is visible on this machine")
    return [f"kernels.{k}=triton needs a GPU, but {why}; set kernels.{k}="
            f"{'sdpa' if k == 'attention' else 'torch'} (or auto), or export TRITON_INTERPRET=1 to run the "
            f"Triton CPU interpreter (slow, for tests)" for k in keys]


def validate_config(cfg: Config, world_size: int) -> None:
    problems = layout_problems(cfg, world_size)
    if problems:
        raise ConfigError("bad parallel layout: " + "; ".join(problems))
    problems = kernel_problems(cfg)
    if cfg.train.compile != "none":
        from .. import device as devices
        from .compile import compile_problems

        device = cfg.train.device
        problems += compile_problems(cfg, devices.default_device_type() if device == "auto" else device.split(":")[0])
    if problems:
        raise ConfigError("; ".join(problems))
