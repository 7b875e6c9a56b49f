"""Performance tooling: memory estimator, communication model, scaling projection, benchmark runner.

    from megatron_jinpan.perf.memory import estimate_memory
    from megatron_jinpan.perf.comm_model import expected_comm_bytes, Link, allreduce_time
    from megatron_jinpan.perf.projection import project, CLUSTERS

CLI: `jinpan bench scaling | memory | project` (see perf/commands.py) and
`python benchmarks/scaling.py`. docs/scaling.md explains the models.
"""
