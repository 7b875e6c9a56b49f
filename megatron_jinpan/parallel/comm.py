"""Every collective and point-to-point call of the engine goes through here.

That gives one place to (a) emulate what a backend lacks and (b) count
bytes and calls per operation and group when accounting is on (off by
default; `benchmarks/scaling.py` and the communication-volume tests turn
it on):

    with comm.accounting() as stats:
        ...train a step...
    stats.table()   # {(op, group): {"calls": n, "bytes": b}}

Bytes are the logical payload of each call from this rank's view: the
input tensor for all-reduce/broadcast/send/recv, the full output for
all-gather, the full input for reduce-scatter.

The straggler detector also measures here how long this rank is *blocked*
in communication (synchronous calls plus `wait()` on asynchronous handles):

    with comm.blocked_time(stopwatch):   # a device.Stopwatch
        ...train a step...
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist

_GROUP_NAMES: dict = {}

# torch >= 2.13 renames the tensor collectives (*_single); older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def name_group(group, name: str) -> None:
    _GROUP_NAMES[group] = name


def forget_groups() -> None:
    """Drop our references to process groups (after destroy_process_group), so they are freed now
    rather than during interpreter shutdown, when freeing their threads can abort the process."""
    _GROUP_NAMES.clear()


def group_name(group) -> str:
    return _GROUP_NAMES.get(group, "world" if group is None else "other")


class CommStats:
    def __init__(self):
        self.calls: dict = defaultdict(int)
        self.bytes: dict = defaultdict(int)

    def record(self, op: str, group, nbytes: int) -> None:
        key = (op, group_name(group))
        self.calls[key] += 1
        self.bytes[key] += int(nbytes)

    def table(self) -> dict:
        return {key: {"calls": self.calls[key], "bytes": self.bytes[key]} for key in sorted(self.calls)}

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


_stats: list[CommStats] = []  # the active accounting contexts (a stack)


@contextlib.contextmanager
def accounting():
    stats = CommStats()
    _stats.append(stats)
    try:
        yield stats
    finally:
        _stats.remove(stats)


_blocked: list = []  # active stopwatches of time blocked in communication (a stack)


@contextlib.contextmanager
def blocked_time(stopwatch):
    """Add to `stopwatch` the time spent in synchronous calls and waiting on asynchronous handles."""
    _blocked.append(stopwatch)
    try:
        yield stopwatch
    finally:
        _blocked.remove(stopwatch)


class _TimedWork:
    """An async handle whose wait() counts as blocked time."""

    def __init__(self, work):
        self._work = work

    def wait(self, *args, **kwargs):
        return _blocking(lambda: self._work.wait(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._work, name)


def _blocking(call):
    if not _blocked:
        return call()
    watches = list(_blocked)
    starts = [sw.start() for sw in watches]
    try:
        return call()
    finally:
        for sw, t in zip(watches, starts):
            sw.stop(t)


def _issue(call, async_op: bool):
    """Run a collective; while a blocked-time stopwatch is active, time it (sync) or its wait() (async)."""
    if not _blocked:
        return call()
    if async_op:
        work = call()
        return None if work is None else _TimedWork(work)
    return _blocking(call)


def _record(op: str, group, tensor_bytes: int) -> None:
    for stats in _stats:
        stats.record(op, group, tensor_bytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None or dist.is_initialized() else 1


# ------------------------------------------------------------------ collectives
def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM, async_op: bool = False):
    if group_size(group) == 1:
        return None
    _record("all_reduce", group, _nbytes(tensor))
    return _issue(lambda: dist.all_reduce(tensor, op=op, group=group, async_op=async_op), async_op)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """Gather along dim 0 into `output` (size = world * input)."""
    if group_size(group) == 1:
        output.copy_(tensor)
        return None
    _record("all_gather", group, _nbytes(output))
    return _issue(lambda: _all_gather_single(output, tensor.contiguous(), group=group, async_op=async_op), async_op)


def reduce_scatter_tensor(output: torch.Tensor, tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM,
                          async_op: bool = False):
    """Reduce `tensor` across the group and keep this rank's dim-0 chunk in `output`."""
    if group_size(group) == 1:
        output.copy_(tensor)
        return None
    _record("reduce_scatter", group, _nbytes(tensor))
    return _issue(lambda: _reduce_scatter_single(output, tensor.contiguous(), op=op, group=group,
                                                 async_op=async_op), async_op)


def broadcast(tensor: torch.Tensor, src: int, group=None, async_op: bool = False):
    if group_size(group) == 1:
        return None
    _record("broadcast", group, _nbytes(tensor))
    return _issue(lambda: dist.broadcast(tensor, src=src, group=group, async_op=async_op), async_op)


def all_gather_object(obj, group=None) -> list:
    if group_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    _blocking(lambda: dist.all_gather_object(out, obj, group=group))
    return out


# ------------------------------------------------------------------ point-to-point
def batch_isend_irecv(ops: list[tuple[str, torch.Tensor, int]], group=None) -> list:
    """ops: [("send"|"recv", tensor, global_peer_rank)]; returns the requests to wait on."""
    if not ops:
        return []
    p2p = []
    for kind, tensor, peer in ops:
        _record(kind, group, _nbytes(tensor))
        fn = dist.isend if kind == "send" else dist.irecv
        p2p.append(dist.P2POp(fn, tensor, peer, group=group))
    works = dist.batch_isend_irecv(p2p)
    return [_TimedWork(w) for w in works] if _blocked else works


def wait_all(requests) -> None:
    for req in requests or []:
        if req is not None:
            req.wait()
