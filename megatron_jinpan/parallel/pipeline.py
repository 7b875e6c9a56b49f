"""Pipeline parallelism (placeholder: pp=1 only)."""
from __future__ import annotations


def split_into_stages(full, mesh, pcfg) -> list:
    if mesh.pp != 1 or pcfg.virtual_stages != 1:
        raise NotImplementedError("pipeline parallelism is not implemented yet")
    return [full]
