"""`train.compile: blocks` -- torch.compile each transformer block, as torchtitan does.

    jinpan pretrain --config configs/pretrain/demo.yaml train.compile=blocks

Applied by `build_model` after tensor/sequence parallelism, pipeline splitting,
kernels, recompute and LoRA, so what gets compiled is exactly the block that
trains. Each `DecoderLayer` is compiled in place (`nn.Module.compile`): the
module, its parameter names and its DP gradient hooks are unchanged, only
its call goes through dynamo + inductor.

What happens at the edges of the compiled code:
- our Triton kernels are torch.library custom ops (`jinpan::*`, kernels/), so
  they are single opaque nodes in the graph, never a graph break;
- the tensor-parallel collectives (parallel/tensor.py, mappings.py) are
  autograd Functions around gloo/NCCL calls that dynamo does not trace: the
  block is cut there and the compute between collectives is compiled
  (dynamo's graph breaks; what runs is identical to eager);
- recompute (`train.recompute`) wraps the compiled block (full) or sits
  inside it (selective, traced as dynamo's checkpoint operator).

One compiled code object serves every layer (the blocks share `forward`), so
the recompile limit is raised to the number of layers on this rank.
"""
from __future__ import annotations

import shutil

import torch
import torch.nn as nn

from ..models.llama import DecoderLayer
from .specs import unwrap


def compile_problems(cfg, device_type: str) -> list[str]:
    """What stops `train.compile=blocks` on this run (empty when it can run), each naming the fix."""
    if cfg.train.compile == "none":
        return []
    problems = []
    if device_type == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None \
            and shutil.which("g++") is None:
        problems.append("train.compile=blocks on CPU needs a C/C++ compiler for inductor (none on PATH); "
                        "install gcc or set train.compile=none")
    return problems


def compile_blocks(chunk: nn.Module) -> int:
    """Compile every transformer block of one model chunk in place; returns how many."""
    blocks = [m for m in unwrap(chunk).modules() if isinstance(m, DecoderLayer)]
    for block in blocks:
        block.compile()
    # Blocks share DecoderLayer.forward; dynamo may specialise per block instance.
    limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks) + 8)
    torch._dynamo.config.recompile_limit = limit
    return len(blocks)
