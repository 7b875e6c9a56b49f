"""The one object that holds the process groups (DESIGN rule 2).

Ranks are laid out as (pp, dp, tp) with tp varying fastest, so a
tensor-parallel group is a run of consecutive ranks (inside one node):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

    mesh = ParallelMesh.create(tp=2, pp=2, device=torch.device("cpu"))
    mesh.tp_group, mesh.dp_group, mesh.pp_group, mesh.is_last_stage, ...

A single process also gets a mesh (world size 1, a local gloo group), so
the same code runs everywhere. Nothing here is a module global: code that
communicates receives the mesh.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import device as devices
from . import comm


@dataclass
class ParallelMesh:
    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    device: torch.device
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    # tp x pp: every rank holding a distinct slice of the model (grad-norm reduction).
    model_group: object = None
    # first and last pipeline stage of this (dp, tp) column: tied-embedding grads.
    embedding_group: object = None
    pp_ranks: list = field(default_factory=list)  # global ranks of my pipeline, by stage
    owns_process_group: bool = False

    # ---------------------------------------------------------------- ranks
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Global rank 0 of the last pipeline stage (tp 0, dp 0) writes metrics."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    def global_rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} (pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}, tp {self.tp_rank}/{self.tp})"

    # ---------------------------------------------------------------- building
    @classmethod
    def create(cls, tp: int = 1, pp: int = 1, device: torch.device | None = None,
               timeout_s: float = 1800.0) -> "ParallelMesh":
        """Join (or start) the default process group and build every sub-group."""
        device = device or devices.resolve_device("auto")
        owns = False
        if not dist.is_initialized():
            world = int(os.environ.get("WORLD_SIZE", 1))
            kwargs = dict(backend=devices.distributed_backend(device), timeout=datetime.timedelta(seconds=timeout_s))
            if world == 1 and "MASTER_ADDR" not in os.environ:
                kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
            dist.init_process_group(**kwargs)
            owns = True
        world, rank = dist.get_world_size(), dist.get_rank()
        check_world_size(world, tp, pp)
        mesh = cls(tp=tp, pp=pp, dp=world // (tp * pp), rank=rank, world_size=world, device=device,
                   owns_process_group=owns)
        mesh._build_groups()
        return mesh

    def _new_group(self, ranks: list[int], name: str):
        # Every rank must create every group, in the same order.
        group = dist.new_group(ranks)
        comm.name_group(group, name)
        return group

    def _build_groups(self) -> None:
        tp, pp, dp = self.tp, self.pp, self.dp
        me = self.rank
        for p in range(pp):
            for d in range(dp):
                ranks = [self.global_rank(p, d, t) for t in range(tp)]
                group = self._new_group(ranks, "tp")
                if me in ranks:
                    self.tp_group = group
        for p in range(pp):
            for t in range(tp):
                ranks = [self.global_rank(p, d, t) for d in range(dp)]
                group = self._new_group(ranks, "dp")
                if me in ranks:
                    self.dp_group = group
        for d in range(dp):
            for t in range(tp):
                ranks = [self.global_rank(p, d, t) for p in range(pp)]
                group = self._new_group(ranks, "pp")
                if me in ranks:
                    self.pp_group, self.pp_ranks = group, ranks
                emb_ranks = sorted({ranks[0], ranks[-1]})
                group = self._new_group(emb_ranks, "embedding")
                if me in emb_ranks:
                    self.embedding_group = group
        for d in range(dp):
            ranks = [self.global_rank(p, d, t) for p in range(pp) for t in range(tp)]
            group = self._new_group(ranks, "model")
            if me in ranks:
                self.model_group = group

    def barrier(self) -> None:
        dist.barrier()

    def destroy(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            # No rank tears down its connections while another still uses them
            # (a rank leaving early can crash a slower one's store/gloo threads).
            if self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()
            self.tp_group = self.pp_group = self.dp_group = self.model_group = self.embedding_group = None
            comm.forget_groups()
            import gc

            gc.collect()


def rank_coords(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(pp, dp, tp) coordinates of a global rank (tp varies fastest), e.g. for reports about other ranks."""
    return rank // (dp * tp), (rank // tp) % dp, rank % tp


def check_world_size(world_size: int, tp: int, pp: int) -> None:
    from ..config import ConfigError

    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {tp}*{pp}; "
                          f"launch a multiple of {tp * pp} processes or change parallel.tp/pp")
