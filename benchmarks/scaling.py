"""Scaling benchmark: real training steps per layout -> one CSV row per run.

    python benchmarks/scaling.py --smoke --out /tmp/bench       # CI: CPU sweep, world sizes 1-4, < 90 s
    python benchmarks/scaling.py --model debug --world-sizes 1,2,4,8 --steps 4
    python benchmarks/scaling.py --device auto --model llama-7b --layouts 8:2:1:1:1:selective:sp  # on GPUs

Same as `jinpan bench scaling`. See megatron_jinpan/perf/runner.py for what
each column measures and docs/scaling.md for the model behind the projection
(`python benchmarks/project.py`).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_jinpan.perf.commands import main_scaling  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_scaling())
