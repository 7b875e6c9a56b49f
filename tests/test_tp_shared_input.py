"""One TP input collective per block: q/k/v and gate/up are projected from ONE gathered input.

    python -m pytest -q tests/test_tp_shared_input.py

On 2 gloo processes, one decoder layer of a tp=2 model (with and without SP, tp_comm_overlap on and
off, with and without LoRA adapters on some of the projections) is run forward and backward under
comm accounting; per layer and micro-batch it must issue exactly Megatron's collectives:

    no SP   forward 2 all-reduces (o, down)                backward 2 all-reduces (attention and MLP inputs)
    SP      forward 2 all-gathers + 2 reduce-scatters      backward 2 reduce-scatters + 2 all-gathers
                                                           (+ 2 re-gathers of the block inputs with overlap)

each of [b, s, h] (comm.py's byte convention), and the layer's output and input gradient must equal
the single-device layer's.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from harness import spawn_on_tp_mesh


def expected_layer_comm(sp: bool, overlap: bool, bsh_bytes: int) -> tuple[dict, dict]:
    """(forward, backward) {op: (calls, bytes)} of one decoder layer and micro-batch on the TP group."""
    if not sp:
        return {"all_reduce": (2, 2 * bsh_bytes)}, {"all_reduce": (2, 2 * bsh_bytes)}
    gathers = 4 if overlap else 2  # with overlap each block's input is re-gathered for its weight grads
    return ({"all_gather": (2, 2 * bsh_bytes), "reduce_scatter": (2, 2 * bsh_bytes)},
            {"all_gather": (gathers, gathers * bsh_bytes), "reduce_scatter": (2, 2 * bsh_bytes)})


def _tp_table(stats) -> dict:
    return {op: (v["calls"], v["bytes"]) for (op, group), v in stats.table().items() if group == "tp"}


def _check(mesh):
    from megatron_jinpan.config import LoRAConfig
    from megatron_jinpan.models import Llama, get_model_config, ops
    from megatron_jinpan.models.llama import init_weights
    from megatron_jinpan.parallel import comm, mappings
    from megatron_jinpan.parallel.lora import apply_lora
    from megatron_jinpan.parallel.parallelize import materialize
    from megatron_jinpan.parallel.tensor import apply_tensor_parallel

    tp, r, g = mesh.tp, mesh.tp_rank, mesh.tp_group
    cfg = get_model_config("debug", num_heads=4, num_kv_heads=2)
    b, s, h = 2, 8, cfg.hidden_size
    torch.manual_seed(0)  # same data on every rank
    x = torch.randn(b, s, h)
    gy = torch.randn(b, s, h)
    pos = torch.arange(s).expand(b, -1)
    cos, sin = ops.rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
    lora = LoRAConfig(rank=4, targets=["q", "v", "gate"])  # adapted and plain projections share inputs

    for use_lora in (False, True):
        ref_model = init_weights(Llama(cfg), seed=3)
        if use_lora:
            apply_lora(ref_model, lora, seed=3)
            with torch.no_grad():  # B starts at zero; make the adapters count
                for name, p in ref_model.named_parameters():
                    if name.endswith("lora_B.weight"):
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        ref_layer = ref_model.layers["0"]
        xr = x.clone().requires_grad_()
        yr = ref_layer(xr, cos, sin)
        (yr * gy).sum().backward()
        for sp in (False, True):
            results = {}
            for overlap in (False, True):
                with torch.device("meta"):
                    chunk = Llama(cfg)
                apply_tensor_parallel(chunk, mesh, SimpleNamespace(sp=sp, tp_comm_overlap=overlap))
                materialize(chunk, 3, mesh)
                if use_lora:
                    apply_lora(chunk, lora, 3, mesh)
                    with torch.no_grad():
                        for name, p in chunk.named_parameters():
                            if name.endswith("lora_B.weight"):
                                full = ref_model.get_parameter(name)
                                p.copy_(full.chunk(tp, 0)[r])  # column adapters: B split on out
                layer = chunk.layers["0"]
                xin = (x.chunk(tp, 1)[r] if sp else x).clone().requires_grad_()
                with comm.accounting() as fwd:
                    y = layer(xin, cos, sin)
                with comm.accounting() as bwd:
                    (y * (gy.chunk(tp, 1)[r] if sp else gy)).sum().backward()
                what = f"lora={use_lora} sp={sp} overlap={overlap}"
                exp_f, exp_b = expected_layer_comm(sp, overlap, b * s * h * 4)
                assert _tp_table(fwd) == exp_f, (what, _tp_table(fwd))
                assert _tp_table(bwd) == exp_b, (what, _tp_table(bwd))
                close = lambda a, e, m: torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=m)  # noqa: E731
                close(y, yr.detach().chunk(tp, 1)[r] if sp else yr.detach(), f"output {what}")
                close(xin.grad, xr.grad.chunk(tp, 1)[r] if sp else xr.grad, f"input grad {what}")
                for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
                    got = mappings.gather_dim(layer.get_submodule(proj).weight.grad, g, 0)
                    close(got, ref_layer.get_submodule(proj).weight.grad, f"{proj} grad {what}")
                if use_lora:
                    for proj in ("self_attn.q_proj", "mlp.gate_proj"):
                        got = layer.get_submodule(proj).lora_B.weight.grad
                        full = ref_layer.get_submodule(proj).lora_B.weight.grad
                        close(got, full.chunk(tp, 0)[r], f"{proj} lora_B grad {what}")
                results[overlap] = (y.detach(), xin.grad)
            for a, e in zip(results[False], results[True]):
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_one_input_collective_per_block_two_processes():
    spawn_on_tp_mesh(_check)


def test_single_device_project_calls_each_linear_in_order():
    """models/llama.py's `project` on plain linears is just the calls (the RNG order of LoRA dropout
    masks, drawn per projection, stays the single-device order)."""
    from megatron_jinpan.models.llama import project

    calls = []
    linears = [torch.nn.Linear(4, 3, bias=False) for _ in range(3)]
    for i, lin in enumerate(linears):
        lin.register_forward_hook(lambda *_, i=i: calls.append(i))
    x = torch.randn(2, 5, 4)
    outs = project(x, *linears)
    assert calls == [0, 1, 2]
    for lin, out in zip(linears, outs):
        torch.testing.assert_close(out, lin(x))
