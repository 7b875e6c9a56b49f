"""Checkpoint manager (placeholder until DCP checkpoints land: saves nothing, resumes nothing)."""
from __future__ import annotations


class CheckpointManager:
    def __init__(self, cfg, mesh):
        self.cfg, self.mesh = cfg, mesh

    def resume(self, chunks, optimizer):
        return None

    def install_signal_handler(self) -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def maybe_save(self, state, chunks, optimizer) -> None:
        pass

    def save_final(self, state, chunks, optimizer) -> None:
        pass
