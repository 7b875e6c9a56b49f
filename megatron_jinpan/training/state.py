"""The training position a checkpoint stores beside weights and optimizer.

    from megatron_jinpan.training.state import TrainState   # also: from megatron_jinpan.training.loop import TrainState

Its own module so that checkpoint/manager.py (which saves and restores it) and training/loop.py (which
advances it and uses the manager) import it from below instead of from each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """What a checkpoint needs beyond weights and optimizer to continue exactly."""

    step: int = 0               # optimizer steps done
    consumed_samples: int = 0   # global samples consumed (the data position)
    tokens: int = 0             # tokens trained on

    def to_dict(self) -> dict:
        return asdict(self)
