"""Blend weights that change with the step, and a deterministic, stateless
allocation of each global batch to the blended datasets.

    sched = BlendSchedule(names=["zh", "en"], weights=[3, 1],
                          schedule=[{"step": 0, "weights": [3, 1]}, {"step": 1000, "weights": [1, 1]}],
                          global_batch=64)
    sched.weights(500)        # [0.666.., 0.333..] (normalised, piecewise-linear)
    sched.allocation(500)     # samples of step 500 per dataset, e.g. [43, 21]
    sched.consumed(500)       # samples each dataset gave to steps 0..499

Allocation is error-diffusion over steps: the cumulative target of dataset
k after step t is T_k(t) = GB * sum_{s<=t} w_k(s); step t gives each dataset
floor(T_k(t) - C_k(t)) samples and hands the few left over (largest
remainders, only to datasets with weight > 0 at that step) so that
sum_k n_k(t) = GB exactly and |T_k - C_k| stays below 1 sample. With static
weights this equals megatron-core's BlendedDataset rule (each sample goes to
the dataset furthest below its target) up to order within a step. It depends
only on (weights, schedule, GB, t): the consumed counters C_k(t) are
recomputed (and memoised) from step 0, so resume needs only the step.
"""
from __future__ import annotations

import math

from ..config import ConfigError


def _parse_weights(raw, names: list[str], key: str) -> list[float]:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(f"{key} names unknown dataset {unknown[0]!r}; blend names are {', '.join(names)}")
        raw = [raw.get(n, 0.0) for n in names]
    if not isinstance(raw, (list, tuple)) or len(raw) != len(names):
        raise ConfigError(f"{key} must list {len(names)} weights (one per data.blend entry: {', '.join(names)}), got {raw!r}")
    out = []
    for w in raw:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{key} weights must be non-negative numbers, got {raw!r}")
        out.append(float(w))
    if sum(out) <= 0:
        raise ConfigError(f"{key} weights sum to zero; give at least one dataset a positive weight")
    return out


class BlendSchedule:
    def __init__(self, names: list[str], weights: list[float], schedule: list | None, global_batch: int):
        self.names = list(names)
        self.global_batch = int(global_batch)
        base = _parse_weights(list(weights), self.names, "data.blend[*].weight")
        points: list[tuple[int, list[float]]] = []
        for i, item in enumerate(schedule or []):
            key = f"data.blend_schedule[{i}]"
            if not isinstance(item, dict) or "step" not in item or "weights" not in item:
                raise ConfigError(f"{key} must be a mapping {{step: N, weights: [...]}}, got {item!r}")
            step = item["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ConfigError(f"{key}.step must be a non-negative integer, got {step!r}")
            if points and step <= points[-1][0]:
                raise ConfigError(f"{key}.step={step} must be larger than the previous entry's step {points[-1][0]}")
            points.append((step, _parse_weights(item["weights"], self.names, f"{key}.weights")))
        if points and points[0][0] > 0:
            points.insert(0, (0, base))  # the blend's own weights hold at step 0
        if not points:
            points = [(0, base)]
        self.points = [(s, [w / sum(ws) for w in ws]) for s, ws in points]
        # memo of consumed counts: _consumed[t] = counts before step t
        self._consumed: list[tuple[int, ...]] = [tuple(0 for _ in self.names)]
        self._target = [0.0 for _ in self.names]

    # -------------------------------------------------------------- weights
    def weights(self, step: int) -> list[float]:
        """Normalised weights at `step` (piecewise-linear between schedule points, constant outside)."""
        pts = self.points
        if step <= pts[0][0]:
            return list(pts[0][1])
        for (s0, w0), (s1, w1) in zip(pts, pts[1:]):
            if step < s1:
                a = (step - s0) / (s1 - s0)
                ws = [x0 + a * (x1 - x0) for x0, x1 in zip(w0, w1)]
                total = sum(ws)
                return [w / total for w in ws]
        return list(pts[-1][1])

    # ----------------------------------------------------------- allocation
    def _extend_to(self, step: int) -> None:
        gb = self.global_batch
        k = len(self.names)
        while len(self._consumed) <= step:
            t = len(self._consumed) - 1
            consumed = self._consumed[-1]
            w = self.weights(t)
            target = [self._target[i] + gb * w[i] for i in range(k)]
            need = [target[i] - consumed[i] for i in range(k)]
            n = [max(0, math.floor(x)) for x in need]
            left = gb - sum(n)
            if left > 0:
                order = sorted((i for i in range(k) if w[i] > 0), key=lambda i: (-(need[i] - n[i]), i))
                j = 0
                while left > 0:
                    n[order[j % len(order)]] += 1
                    left -= 1
                    j += 1
            elif left < 0:
                order = sorted(range(k), key=lambda i: (-(n[i] - need[i]), i))
                j = 0
                while left < 0:
                    i = order[j % k]
                    if n[i] > 0:
                        n[i] -= 1
                        left += 1
                    j += 1
            self._target = target
            self._consumed.append(tuple(consumed[i] + n[i] for i in range(k)))

    def consumed(self, step: int) -> list[int]:
        """Samples each dataset contributed to steps [0, step)."""
        self._extend_to(step)
        return list(self._consumed[step])

    def allocation(self, step: int) -> list[int]:
        """Samples each dataset contributes to `step` (sums to the global batch)."""
        self._extend_to(step + 1)
        return [b - a for a, b in zip(self._consumed[step], self._consumed[step + 1])]
