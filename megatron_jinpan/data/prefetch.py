"""Data off the critical path: the next steps' micro-batches are prepared in background threads.

    prefetcher = Prefetcher(train_data, start=state.step, dp_rank=mesh.dp_rank, dp=mesh.dp,
                            device=mesh.device, depth=cfg.data.prefetch, workers=cfg.data.num_workers)
    microbatches = prefetcher.get(step)   # this step's, usually ready; step+1 .. step+depth are under way
    prefetcher.close()

`data.prefetch` = how many steps ahead are prepared (0 = read in the loop, as before);
`data.num_workers` = background threads (0 means one). The results are identical with prefetch
on or off: every dataset's `microbatches(step, dp_rank, dp)` is a pure function of the step (its
randomness is seeded by step/index, never by a global RNG), so when and on which thread it runs
does not matter. Threads, not processes: reading the memory-mapped .bin/.idx and collating are
numpy/torch calls that release the GIL, and nothing has to be pickled. On a GPU the tensors are
pinned in the background so the loop's host-to-device copies are asynchronous.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import device as devices


class Prefetcher:
    def __init__(self, data, start: int, dp_rank: int, dp: int, device: torch.device, depth: int = 2,
                 workers: int = 0, stop: int | None = None):
        if depth < 0 or workers < 0:
            from ..config import ConfigError

            raise ConfigError(f"data.prefetch={depth} and data.num_workers={workers} must be >= 0 (0 = off / one thread)")
        self.data, self.dp_rank, self.dp, self.device = data, dp_rank, dp, device
        self.depth, self.stop = depth, stop
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="jinpan-data") if depth else None
        self.pending: dict[int, Future] = {}
        self._fill(start)

    def _load(self, step: int) -> list[dict]:
        try:
            mbs = self.data.microbatches(step, self.dp_rank, self.dp)
        except Exception as exc:
            raise RuntimeError(f"preparing the micro-batches of step {step} (dp rank {self.dp_rank}) failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        if devices.is_accelerator(self.device.type):
            mbs = [{k: devices.pin_memory(v) for k, v in mb.items()} for mb in mbs]
        return mbs

    def _fill(self, first: int) -> None:
        """Keep steps first .. first+depth-1 submitted (bounded memory: at most `depth` steps ahead)."""
        if self.pool is None:
            return
        for step in range(first, first + self.depth):
            if self.stop is not None and step >= self.stop:
                break
            if step not in self.pending:
                self.pending[step] = self.pool.submit(self._load, step)
        for step in [s for s in self.pending if s < first]:  # skipped steps (not expected): drop them
            self.pending.pop(step).cancel()

    def get(self, step: int) -> list[dict]:
        """This step's micro-batches (on the host; pinned on GPU). Errors of the background read are raised here."""
        if self.pool is None:
            return self._load(step)
        future = self.pending.pop(step, None) or self.pool.submit(self._load, step)
        self._fill(step + 1)
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()
