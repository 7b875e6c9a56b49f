"""AdamW over the data-parallel gradient buffers, with an optional ZeRO-1 distributed optimizer.

    optimizer = build_optimizer(chunks, cfg, mesh)
    optimizer.zero_grad()
    ...forward_backward...
    out = optimizer.step(lr)          # finalize grads, global-norm clip, update; {"grad_norm": ...}

How it works. The optimizer steps *segments*: flat, contiguous ranges of a
chunk's buffers (data.py), each wrapped in an `nn.Parameter` that aliases
the memory it updates and whose `.grad` aliases the reduced gradient:

- `parallel.zero=0`: a segment is a trainable parameter's whole range of
  `param_buffer` (the fp32 model weights are the master weights) with
  `main_grad` as its gradient;
- `parallel.zero=1`: a segment is the part of a parameter that falls in
  this dp rank's slice of its bucket; it aliases a separate fp32
  `master` shard (numel/dp per chunk) and the reduce-scattered
  `shard_grad`. Adam states exist only for these slices, so master + m + v
  cost 12 bytes per parameter / dp. After the update each bucket's slice is
  all-gathered into the weights (`all_gather_into_tensor`), asynchronously
  and waited for in a forward pre-hook with `parallel.overlap_param_gather`
  (synchronously on the last step and on checkpoint steps).

Both use the same fused `torch.optim.AdamW` (CPU and GPU) with
decoupled weight decay on >=2-D parameters only, so zero=1 reproduces zero=0
element for element. `train.trainable`: frozen parameters have no buffer and
no state; with `new_embeddings` the rows below `train.new_embeddings_from`
(global row index; under TP the local row r of rank t is t*local_rows + r)
are left out of the segments — no update, no weight decay, no state — and
their gradients are zeroed.

The global gradient norm counts every parameter once: TP-replicated params
(`ParamSpec.tp_dim is None`) on tp rank 0 only, the tied LM-head copy of the
last pipeline stage not at all, and under zero=1 each dp rank its own slices
(summed over dp as well as over tp x pp).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn

from . import comm
from .data import EMBEDDING_NAMES, DataParallel, finalize_model_grads
from .specs import param_specs, unwrap

STATE_KEYS = ("exp_avg", "exp_avg_sq")


class _Segment:
    __slots__ = ("chunk", "name", "global_name", "start", "end", "pos", "param", "decay", "in_norm")

    def __init__(self, chunk, name, global_name, start, end, pos, param, decay, in_norm):
        self.chunk, self.name, self.global_name = chunk, name, global_name
        self.start, self.end = start, end          # range in the chunk's buffers
        self.pos = pos                             # where it starts in the master/shard (zero=1) or buffer
        self.param, self.decay, self.in_norm = param, decay, in_norm


def _trainable_start(chunk: DataParallel, name: str, cfg, mesh) -> int:
    """First buffer element of `name` the optimizer may change (new_embeddings freezes old rows)."""
    start, end = chunk.param_range[name]
    spec = chunk.specs[name]
    if cfg.train.trainable != "new_embeddings" or cfg.train.new_embeddings_from <= 0:
        return start
    param = chunk.module.get_parameter(name)
    rows, row_elems = param.shape[0], param[0].numel()
    row_offset = mesh.tp_rank * rows if (spec.tp_dim == 0 and mesh.tp > 1) else 0
    first = min(rows, max(0, cfg.train.new_embeddings_from - row_offset))
    return start + first * row_elems


class Optimizer:
    """AdamW (zero=0) or the ZeRO-1 distributed AdamW (zero=1); see the module docstring."""

    def __init__(self, chunks, cfg, mesh):
        for chunk in chunks:
            if not isinstance(chunk, DataParallel):
                raise TypeError("build_optimizer needs the DataParallel chunks returned by build_model")
        self.chunks, self.cfg, self.mesh = chunks, cfg, mesh
        self.zero = int(cfg.parallel.zero)
        self.step_count = 0
        self.frozen_ranges: list[tuple[DataParallel, int, int]] = []  # grads zeroed each step
        self.masters: list[torch.Tensor | None] = []
        self.segments: list[_Segment] = []
        for chunk in chunks:
            self.masters.append(self._init_master(chunk))
            self._add_segments(chunk)
        o = cfg.optim
        decay = [s.param for s in self.segments if s.decay]
        no_decay = [s.param for s in self.segments if not s.decay]
        # fused: one pass per segment over param, grad, m and v (on CPU too: 9-11 ms a step for tiny's 18.7M
        # parameters vs 60-75 ms foreach, whose op-by-op passes over every segment miss the cache)
        kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        groups = [{"params": decay, "weight_decay": o.weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        # Both groups always exist (possibly empty on a rank), so param_groups look alike everywhere.
        self.inner = torch.optim.AdamW(groups, **kwargs)
        self._init_state()
        for chunk in chunks:
            chunk._optimizer = weakref.ref(self)

    # ---------------------------------------------------------------- setup
    def _init_master(self, chunk: DataParallel):
        if self.zero != 1:
            return None
        master = torch.zeros(chunk.numel // chunk.dp, dtype=torch.float32, device=chunk.grad_buffer.device)
        self._refresh_master(chunk, master)
        return master

    @torch.no_grad()
    def _refresh_master(self, chunk: DataParallel, master: torch.Tensor) -> None:
        for bucket in chunk.buckets:
            o0, o1 = chunk.owned_range(bucket)
            master.narrow(0, chunk.shard_offset(bucket), o1 - o0).copy_(chunk.param_buffer[o0:o1])

    def _add_segments(self, chunk: DataParallel) -> None:
        ci = self.chunks.index(chunk)
        module = chunk.module
        tied_copy_last = bool(module.cfg.tie_embeddings) and self.mesh.pp > 1 and module.embed_tokens is None
        for name, _ in chunk._named:
            spec = chunk.specs[name]
            p0, p1 = chunk.param_range[name]
            t0 = _trainable_start(chunk, name, self.cfg, self.mesh)
            if t0 > p0:
                self.frozen_ranges.append((chunk, p0, t0))
            lo, hi, base = t0, p1, None
            if self.zero == 1:
                bucket = chunk.buckets[chunk.param_bucket[name]]
                o0, o1 = chunk.owned_range(bucket)
                lo, hi = max(lo, o0), min(hi, o1)
                base = chunk.shard_offset(bucket) - o0
            if lo >= hi:
                continue
            if self.zero == 1:
                data = self.masters[ci].narrow(0, base + lo, hi - lo)
                grad = chunk.shard_grad.narrow(0, base + lo, hi - lo)
            else:
                data = chunk.param_buffer.narrow(0, lo, hi - lo)
                grad = chunk.grad_buffer.narrow(0, lo, hi - lo)
            alias = nn.Parameter(data, requires_grad=True)  # shares data's memory: updates land in place
            assert alias.data_ptr() == data.data_ptr()
            alias.grad = grad
            is_copy = tied_copy_last and (spec.name in EMBEDDING_NAMES or name in EMBEDDING_NAMES)
            replicated_elsewhere = spec.tp_dim is None and self.mesh.tp_rank != 0
            pos = base + lo if self.zero == 1 else lo
            self.segments.append(_Segment(chunk, name, spec.name, lo, hi, pos, alias,
                                          decay=len(spec.full_shape) >= 2,
                                          in_norm=not (is_copy or replicated_elsewhere)))

    def _init_state(self, step: int = 0) -> None:
        """Allocate Adam states up front (so memory is measurable before the first step)."""
        if self.inner is None:
            return
        for seg in self.segments:
            self.inner.state[seg.param] = {
                "step": torch.tensor(float(step), dtype=torch.float32),
                "exp_avg": torch.zeros_like(seg.param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(seg.param, memory_format=torch.preserve_format),
            }

    # ---------------------------------------------------------------- step
    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def _rebind(self, force_refresh: bool = False) -> None:
        """Re-attach weights rebound by outside code and pick up weights loaded in place.

        Under zero=1 with fp32 weights the master shard is re-read from the
        weights before every step: after the last all-gather they are equal
        bit for bit, so this is a no-op unless something (a checkpoint or HF
        load) wrote new weights, which then take effect. With lower-precision
        weights call `reload_model_params()` after loading.
        """
        for ci, chunk in enumerate(self.chunks):
            chunk.finish_param_sync()
            moved = chunk.rebind_params()
            if self.zero == 1 and (moved or force_refresh or chunk.param_buffer.dtype == torch.float32):
                self._refresh_master(chunk, self.masters[ci])

    def reload_model_params(self) -> None:
        """Take the current model weights as the master weights (after loading weights in place)."""
        self._rebind(force_refresh=True)

    def grad_norm(self) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        grads = [seg.param.grad for seg in self.segments if seg.in_norm]
        if grads:
            # One fp32 pass per segment (a float64 norm would first copy every gradient); the squares are
            # summed in float64, so how the layout cuts the segments barely moves the total.
            total += torch.stack(torch._foreach_norm(grads, 2)).double().square().sum()
        comm.all_reduce(total, self.mesh.model_group)
        if self.zero == 1:
            comm.all_reduce(total, self.mesh.dp_group)
        return math.sqrt(float(total))

    @torch.no_grad()
    def step(self, lr: float) -> dict:
        self._rebind()
        finalize_model_grads(self.chunks, self.mesh)
        for chunk, start, end in self.frozen_ranges:
            chunk.grad_buffer[start:end].zero_()
        norm = self.grad_norm()
        clip = self.cfg.optim.clip_grad
        if clip and clip > 0 and norm > clip and self.segments:
            torch._foreach_mul_([s.param.grad for s in self.segments], clip / (norm + 1e-6))
        if self.inner is not None:
            for group in self.inner.param_groups:
                group["lr"] = lr
            self.inner.step()
        self.step_count += 1
        if self.zero == 1:
            self._gather_params(async_op=self._overlap_gather_now())
        return {"grad_norm": norm}

    def _overlap_gather_now(self) -> bool:
        """Overlap the param all-gather with the next forward, except where params are read right away."""
        if not self.cfg.parallel.overlap_param_gather:
            return False
        if self.step_count >= self.cfg.train.steps:
            return False
        interval = self.cfg.checkpoint.interval
        return not (interval and self.step_count % interval == 0)

    def _gather_params(self, async_op: bool) -> None:
        for ci, chunk in enumerate(self.chunks):
            chunk.gather_params(self.masters[ci], async_op=async_op)

    def finish_param_sync(self) -> None:
        """Wait for pending ZeRO-1 parameter gathers (before reading weights outside a forward)."""
        for chunk in self.chunks:
            chunk.finish_param_sync()

    # ---------------------------------------------------------------- state
    def _full_state(self, chunk: DataParallel, key: str) -> torch.Tensor:
        """One Adam state of `chunk` as a full buffer-sized tensor (gathered over dp under zero=1)."""
        segs = [s for s in self.segments if s.chunk is chunk]
        if self.zero == 1:
            shard = torch.zeros(chunk.numel // chunk.dp, dtype=torch.float32, device=chunk.grad_buffer.device)
            for s in segs:
                shard[s.pos:s.pos + s.end - s.start].copy_(self.inner.state[s.param][key])
            full = torch.zeros(chunk.numel, dtype=torch.float32, device=shard.device)
            for bucket in chunk.buckets:
                comm.all_gather_into_tensor(full.narrow(0, bucket.offset, bucket.numel),
                                            shard.narrow(0, chunk.shard_offset(bucket), bucket.shard_numel),
                                            chunk.mesh.dp_group)
            return full
        full = torch.zeros(chunk.numel, dtype=torch.float32, device=chunk.grad_buffer.device)
        for s in segs:
            full[s.start:s.end].copy_(self.inner.state[s.param][key])
        return full

    def state_dict(self) -> dict:
        """Layout-independent optimizer state (a collective over dp under zero=1: call it on every rank).

            {"step": int,                                   # optimizer steps taken
             "param_groups": [{"name": "decay"|"no_decay", "lr", "betas", "eps", "weight_decay"}],
             "state": {global_name: {"exp_avg": T, "exp_avg_sq": T}}}

        `global_name` is the parameter's `ParamSpec.name`; each T has the shape
        of the LOCAL parameter on this rank (its TP shard, vocab padding
        included; full over dp — ZeRO shards are gathered back), so a
        checkpoint can slice/reshard optimizer states exactly like the
        parameter itself. Only trainable parameters appear; frozen rows of
        `new_embeddings` hold zeros. With a tied embedding split across
        pipeline stages the last stage reports its copy as "lm_head.weight"
        (equal to "embed_tokens.weight"); load_state_dict falls back to the
        "embed_tokens.weight" entry when "lm_head.weight" is missing.
        """
        self.finish_param_sync()
        state: dict = {}
        for chunk in self.chunks:
            fulls = {key: self._full_state(chunk, key) for key in STATE_KEYS}
            for name, param in chunk._named:
                p0, p1 = chunk.param_range[name]
                if _trainable_start(chunk, name, self.cfg, self.mesh) >= p1:
                    continue
                state[chunk.specs[name].name] = {key: fulls[key][p0:p1].view(param.shape).clone()
                                                 for key in STATE_KEYS}
        groups = []
        if self.inner is not None:
            for g in self.inner.param_groups:
                groups.append({"name": g.get("name"), "lr": g["lr"], "betas": tuple(g["betas"]), "eps": g["eps"],
                               "weight_decay": g["weight_decay"]})
        return {"step": self.step_count, "param_groups": groups, "state": state}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict(); load the model weights first (master shards are refreshed from them)."""
        self.step_count = int(state.get("step", 0))
        self._init_state(self.step_count)
        entries = state.get("state", {})
        for ci, chunk in enumerate(self.chunks):
            chunk.finish_param_sync()
            chunk.rebind_params()
            if self.zero == 1:
                self._refresh_master(chunk, self.masters[ci])
            for seg in (s for s in self.segments if s.chunk is chunk):
                entry = entries.get(seg.global_name)
                if entry is None and seg.global_name == "lm_head.weight":
                    entry = entries.get("embed_tokens.weight")
                if entry is None:
                    raise KeyError(f"optimizer state has no entry for {seg.global_name}")
                p0, _ = chunk.param_range[seg.name]
                for key in STATE_KEYS:
                    flat = entry[key].reshape(-1).to(self.inner.state[seg.param][key].device, torch.float32)
                    self.inner.state[seg.param][key].copy_(flat[seg.start - p0:seg.end - p0])


def build_optimizer(chunks, cfg, mesh) -> Optimizer:
    return Optimizer(chunks, cfg, mesh)


def optimizer_state_bytes(chunks, cfg=None, mesh=None, breakdown: bool = False):
    """Measured bytes of optimizer state on this rank: fp32 master weights + exp_avg + exp_avg_sq.

    Under zero=0 the fp32 model weights themselves are the master weights, so
    the master term is the bytes of the trainable ranges the optimizer steps;
    under zero=1 it is the separate fp32 master shard. Uses the optimizer
    built for `chunks` (builds one if there is none). With breakdown=True
    returns {"master", "exp_avg", "exp_avg_sq", "total"}.
    """
    opt = None
    for chunk in chunks:
        ref = getattr(chunk, "_optimizer", None)
        opt = ref() if ref is not None else None
        if opt is not None:
            break
    if opt is None:
        opt = Optimizer(chunks, cfg, mesh)
    out = {"master": 0, "exp_avg": 0, "exp_avg_sq": 0}
    if opt.zero == 1:
        out["master"] = sum(m.numel() * m.element_size() for m in opt.masters if m is not None)
    else:
        out["master"] = sum(s.param.numel() * s.param.element_size() for s in opt.segments)
    if opt.inner is not None:
        for seg in opt.segments:
            st = opt.inner.state[seg.param]
            for key in STATE_KEYS:
                out[key] += st[key].numel() * st[key].element_size()
    out["total"] = out["master"] + out["exp_avg"] + out["exp_avg_sq"]
    return out if breakdown else out["total"]
