"""When a rank dies: which one, how, that the others were stopped, and where to resume from.

`jinpan pretrain --nproc N` supervises its workers with `supervise()` (training/commands.py): the
first worker to fail is named with its (pp, dp, tp) coordinates and how it ended (a Python
exception, an exit code, or a signal such as SIGKILL from the out-of-memory killer), the others
are killed at once (they would otherwise block in collectives until the timeout), and the last
complete checkpoint is named:

    jinpan pretrain: error: rank 3 of 4 (pp 1, dp 0, tp 1) died: killed by signal SIGKILL (often the
    out-of-memory killer: see `dmesg`); the other 3 ranks were stopped. Resume from the last complete
    checkpoint runs/demo/checkpoints/step_0000050: rerun the same command (checkpoint.resume=auto).

Under torchrun the elastic agent names the failed rank in its "Root Cause" summary; launch/torchrun.sh
then prints the resume advice with

    python -m megatron_jinpan.training.failure pretrain --config F.yaml [key=value ...]
"""
from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import signal
import sys
from pathlib import Path

# Errors a surviving rank raises because a peer vanished: not the root cause.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ProcessGroupGloo",
              "NCCL communicator was aborted", "Socket Timeout")


class RankFailure(RuntimeError):
    """A worker process died; the message says which, how, and where to resume."""

    user_facing = True
    exit_code = 1


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a resumed run would start from: `latest`, else the newest complete step dir."""
    from ..checkpoint import format as fmt

    root = Path(run_dir) / "checkpoints"
    try:
        latest = fmt.read_latest(root)
    except Exception:
        latest = None
    if latest is not None and latest.is_dir():
        return latest
    steps = fmt.list_step_dirs(root)
    return steps[-1] if steps else None


def resume_advice(cfg) -> str:
    path = last_checkpoint(cfg.run_dir)
    if path is None:
        return (f"No complete checkpoint in {Path(cfg.run_dir) / 'checkpoints'}: a rerun starts from step 0 "
                f"(set checkpoint.interval to save periodically).")
    if str(cfg.checkpoint.resume) == "never":
        return (f"The last complete checkpoint is {path}: rerun with checkpoint.resume=auto "
                f"(or checkpoint.resume={path}) to continue from it.")
    return f"Resume from the last complete checkpoint {path}: rerun the same command (checkpoint.resume=auto)."


def how_it_ended(exitcode: int, error: str | None) -> str:
    if error:
        last = [line for line in error.strip().splitlines() if line.strip()]
        return f"raised {last[-1].strip() if last else 'an exception'} (traceback above)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (often the out-of-memory killer: see `dmesg`)" if name == "SIGKILL" else ""
        return f"killed by signal {name}{hint}"
    return f"exited with code {exitcode}"


def failure_message(rank: int, world: int, cfg, exitcode: int, error: str | None) -> str:
    from ..parallel.mesh import rank_coords

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = max(world // (tp * pp), 1)
    p, d, t = rank_coords(rank, tp, dp)
    others = world - 1
    return (f"rank {rank} of {world} (pp {p}, dp {d}, tp {t}) died: {how_it_ended(exitcode, error)}; the other "
            f"{others} rank{'s were' if others != 1 else ' was'} stopped. {resume_advice(cfg)}")


def _read_error(path: str) -> str | None:
    if not os.access(path, os.R_OK):
        return None
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception:
        return None


def _root_cause(failed: list[tuple[int, int, str | None]]) -> tuple[int, int, str | None]:
    """Of the workers found dead together, the one that did not merely lose a peer."""
    def rank_of(item):
        _, exitcode, error = item
        if exitcode < 0:
            return 0                                  # killed by a signal: the cause
        if error and not any(s in error for s in _PEER_LOST):
            return 1                                  # its own exception
        return 2                                      # a consequence of another rank's death
    return min(failed, key=rank_of)


def supervise(context, cfg) -> None:
    """Wait for the workers of `torch.multiprocessing.start_processes(..., join=False)`; on the first
    failure kill the rest and raise RankFailure naming the rank. Returns when all exited cleanly."""
    processes = context.processes
    pending = {p.sentinel: i for i, p in enumerate(processes)}
    while pending:
        ready = multiprocessing.connection.wait(list(pending))
        failed = []
        for sentinel in ready:
            i = pending.pop(sentinel)
            processes[i].join()
            if processes[i].exitcode != 0:
                failed.append((i, processes[i].exitcode, _read_error(context.error_files[i])))
        if not failed:
            continue
        for p in processes:
            if p.is_alive():
                p.kill()  # blocked in a collective with a dead peer: nothing left to finish cleanly
        for p in processes:
            p.join()
        rank, exitcode, error = _root_cause(failed)
        if error:
            print(f"-- rank {rank} failed with:\n{error}", file=sys.stderr, flush=True)
        raise RankFailure(failure_message(rank, len(processes), cfg, exitcode, error))


def main(argv: list[str] | None = None) -> int:
    """Resume advice for a failed run of `COMMAND --config F [key=value ...]` (used by launch/torchrun.sh)."""
    import argparse

    from ..config import load_config

    ap = argparse.ArgumentParser(prog="python -m megatron_jinpan.training.failure")
    ap.add_argument("command")
    ap.add_argument("--config")
    args, rest = ap.parse_known_args(argv)
    overrides = [item for item in rest if "=" in item and not item.startswith("-")]
    try:
        cfg = load_config(args.config, overrides)
    except Exception as exc:
        print(f"(could not read the run's config to find its checkpoints: {exc})", file=sys.stderr)
        return 1
    print(resume_advice(cfg), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
