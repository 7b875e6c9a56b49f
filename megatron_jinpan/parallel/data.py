"""Data parallelism: contiguous fp32 gradient buckets reduced from backward hooks.

    chunks = wrap_data_parallel(chunks, mesh, cfg)     # done by build_model
    with chunks[0].no_sync(): ...backward of non-final micro-batches...
    ...backward of the last micro-batch...           # buckets launch as they fill
    finalize_model_grads(chunks, mesh)                # wait + TP/SP + tied embeddings

Layout of one chunk's `DataParallel`:

- every trainable parameter gets a view `param.main_grad` into one fp32
  `grad_buffer`, and its data is moved into a `param_buffer` of the same
  layout (so ZeRO-1 can all-gather straight into the weights);
- parameters are laid out in *reverse order of registration* (≈ reverse
  order of use in forward), so gradients arrive in buffer order during
  backward; the buffer is cut into buckets of `parallel.bucket_mb` MiB, each
  padded to a multiple of `dp * 64` elements so it splits evenly across dp;
- a `register_post_accumulate_grad_hook` per parameter adds `param.grad`
  into `main_grad` (and frees `param.grad`). On the last micro-batch (outside
  `no_sync()`), when every parameter of a bucket has produced its gradient,
  the bucket's reduction is launched asynchronously through `comm` if
  `parallel.overlap_grad_reduce` — an all-reduce (zero=0) or a reduce-scatter
  into `shard_grad`, this rank's contiguous slice of every bucket (zero=1).
  Without overlap, `finish_grad_sync()` launches every bucket at the end.
  Reductions SUM over dp (the loss is already scaled by 1/global tokens);
- `parallel.grad_reduce_dtype=bf16` puts half the bytes on the wire: at
  launch the bucket is cast into a bf16 `comm_buffer` (zero=1: reduced into
  a bf16 `comm_shard`), and `wait()` casts the sum back into the fp32
  buffer. Micro-batch accumulation stays fp32; only the sum over dp is
  rounded (bf16 has fp32's exponent range, so no loss scaling is needed);
- the token embedding sits alone in the last bucket: its gradient is the last
  one backward produces, so the layer-0 weights that precede it go out in an
  earlier bucket instead of waiting for it, and what is left to send after
  backward is the embedding alone (`sits_alone`);
- with a tied embedding split across pipeline stages (pp > 1), the embedding
  / LM-head copy sits alone in its own bucket, so its ZeRO shard has the same
  shape on the first and the last stage and the two can be summed over
  `mesh.embedding_group` shard-wise;
- frozen parameters (`requires_grad=False`, see `train.trainable`) get no
  buffer space, no hook and no reduction.

ZeRO-1 parameter gathers (`gather_params`) live here too: after the
optimizer step each bucket's updated shard is all-gathered into
`param_buffer`, optionally asynchronously with a forward pre-hook on every
module that owns parameters of the bucket waiting for it
(`parallel.overlap_param_gather`).

Weights must be loaded in place (`param.copy_`, `module.load_state_dict`);
if some code rebinds `param.data`, `rebind_params()` (called by the
optimizer before each step) moves it back into the buffer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import comm
from .specs import param_specs, unwrap

EMBEDDING_NAMES = ("embed_tokens.weight", "lm_head.weight")
_PAD_ELEMS = 64


def apply_trainable(module: nn.Module, trainable: str) -> None:
    """Set requires_grad per `train.trainable` (all | embeddings | new_embeddings | lora)."""
    if trainable not in ("all", "embeddings", "new_embeddings", "lora"):
        raise ValueError(f"train.trainable={trainable!r}; choose all, embeddings, new_embeddings or lora")
    specs = param_specs(module)
    for name, param in module.named_parameters():
        if trainable == "lora":
            # The adapters, and a value head (reward model / critic), which starts untrained.
            gname = specs[name].name
            keep = gname.endswith((".lora_A.weight", ".lora_B.weight")) or gname == "score.weight"
        else:
            keep = trainable == "all" or specs[name].name in EMBEDDING_NAMES or name in EMBEDDING_NAMES
        param.requires_grad_(keep)


def sits_alone(name: str, tied_split: bool) -> bool:
    """Does parameter `name` (global name) get a bucket of its own?

    The token embedding always: its gradient is the last of backward, so sharing a bucket would hold
    back gradients that were ready earlier (perf/comm_model.py mirrors this). Under a tied embedding
    split across stages, the LM-head copy too, so both copies' ZeRO shards line up.
    """
    return name == "embed_tokens.weight" or (tied_split and name in EMBEDDING_NAMES)


@dataclass
class Bucket:
    index: int
    offset: int                    # start in the chunk's buffers
    numel: int                     # padded size (multiple of dp * 64)
    params: list = field(default_factory=list)
    grad: torch.Tensor | None = None        # view of grad_buffer
    comm: torch.Tensor | None = None        # grad_reduce_dtype=bf16: view of comm_buffer (what goes on the wire)
    comm_shard: torch.Tensor | None = None  # grad_reduce_dtype=bf16, zero=1: view of comm_shard
    data: torch.Tensor | None = None        # view of param_buffer
    shard_grad: torch.Tensor | None = None  # zero=1: this rank's reduced slice
    ready: set = field(default_factory=set)
    handle: object = None
    launched: bool = False
    gather_handle: object = None

    @property
    def shard_numel(self) -> int:
        return self.numel // self._dp

    _dp: int = 1


class _WorkThen:
    """Handle of a reduction whose result still has to be put in place (a bf16 sum cast back into the fp32
    buffer, the touched embedding rows written back): wait() finishes the collective, then `finish()`, once."""

    def __init__(self, work, finish):
        self.work, self.finish = work, finish
        self.done = False

    def wait(self):
        if not self.done:
            self.work.wait()
            self.finish()
            self.done = True
        return True


class DataParallel(nn.Module):
    def __init__(self, module: nn.Module, mesh, cfg):
        super().__init__()
        self.module = module
        self.mesh = mesh
        self.dp = mesh.dp
        self.dp_rank = mesh.dp_rank
        self.zero = int(cfg.parallel.zero)
        self.overlap_grad_reduce = bool(cfg.parallel.overlap_grad_reduce)
        self.overlap_param_gather = bool(cfg.parallel.overlap_param_gather) and self.zero == 1
        self.bucket_elems = max(1, int(float(cfg.parallel.bucket_mb) * 2**20 / 4))
        self.sparse_embedding_grad = bool(cfg.parallel.sparse_embedding_grad)
        # On one rank nothing is sent, so nothing is rounded.
        self.reduce_dtype = (torch.bfloat16 if cfg.parallel.grad_reduce_dtype == "bf16" and self.dp > 1
                             else torch.float32)
        self.embedding_rows_reduced: int | None = None
        self._sync = True
        self.events: list | None = None  # set to [] to record ("grad", name) / ("launch", bucket) for tests
        tied_split = bool(getattr(module.cfg, "tie_embeddings", False)) and mesh.pp > 1
        self._build_buffers(tied_split)
        self._register_hooks()

    # ---------------------------------------------------------------- layout
    def _build_buffers(self, tied_split: bool) -> None:
        specs = param_specs(self.module)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        named.reverse()  # ≈ the order in which backward produces gradients
        self.param_names = {p: n for n, p in named}
        self.specs = {n: specs[n] for n, _ in named}
        quantum = self.dp * _PAD_ELEMS

        groups: list[list] = []
        current: list = []
        size = 0
        for name, param in named:
            alone = sits_alone(specs[name].name, tied_split)
            if current and (alone or size >= self.bucket_elems):
                groups.append(current)
                current, size = [], 0
            current.append((name, param))
            size += param.numel()
            if alone:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)

        self.buckets: list[Bucket] = []
        self.param_range: dict[str, tuple[int, int]] = {}  # name -> [start, end) in the buffers
        self.param_bucket: dict[str, int] = {}
        offset = 0
        for group in groups:
            bucket = Bucket(index=len(self.buckets), offset=offset, numel=0)
            bucket._dp = self.dp
            pos = offset
            for name, param in group:
                self.param_range[name] = (pos, pos + param.numel())
                self.param_bucket[name] = bucket.index
                bucket.params.append(name)
                pos += param.numel()
            used = pos - offset
            bucket.numel = -(-used // quantum) * quantum
            offset += bucket.numel
            self.buckets.append(bucket)
        self.numel = offset

        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            raise TypeError(f"data-parallel chunk mixes parameter dtypes {dtypes}; keep trainable params in one dtype")
        dtype = dtypes.pop() if dtypes else torch.float32
        device = self.mesh.device
        self.grad_buffer = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.param_buffer = torch.zeros(self.numel, dtype=dtype, device=device)
        self.shard_grad = (torch.zeros(self.numel // self.dp, dtype=torch.float32, device=device)
                           if self.zero == 1 else None)
        narrow = self.reduce_dtype != torch.float32
        self.comm_buffer = torch.zeros(self.numel, dtype=self.reduce_dtype, device=device) if narrow else None
        self.comm_shard = (torch.zeros(self.numel // self.dp, dtype=self.reduce_dtype, device=device)
                           if narrow and self.zero == 1 else None)
        for bucket in self.buckets:
            bucket.grad = self.grad_buffer.narrow(0, bucket.offset, bucket.numel)
            bucket.data = self.param_buffer.narrow(0, bucket.offset, bucket.numel)
            if self.zero == 1:
                bucket.shard_grad = self.shard_grad.narrow(0, bucket.offset // self.dp, bucket.shard_numel)
            if narrow:
                bucket.comm = self.comm_buffer.narrow(0, bucket.offset, bucket.numel)
                if self.zero == 1:
                    bucket.comm_shard = self.comm_shard.narrow(0, bucket.offset // self.dp, bucket.shard_numel)
        self._named = named
        self.rebind_params(force=True)

    @torch.no_grad()
    def rebind_params(self, force: bool = False) -> bool:
        """Make every trainable param a view of param_buffer (copying its current value in). True if any moved."""
        moved = False
        for name, param in self._named:
            start, end = self.param_range[name]
            view = self.param_buffer.narrow(0, start, end - start).view(param.shape)
            if force or param.data.data_ptr() != view.data_ptr():
                view.copy_(param.data)
                param.data = view
                moved = True
            param.main_grad = self.grad_buffer.narrow(0, start, end - start).view(param.shape)
        return moved

    def owned_range(self, bucket: Bucket) -> tuple[int, int]:
        """[start, end) in the buffers of this dp rank's slice of `bucket` (zero=1)."""
        s = bucket.shard_numel
        start = bucket.offset + self.dp_rank * s
        return start, start + s

    def shard_offset(self, bucket: Bucket) -> int:
        """Where `bucket`'s slice starts in a shard-sized (numel / dp) tensor."""
        return bucket.offset // self.dp

    def owned_grad(self, name: str) -> tuple[torch.Tensor, int, int] | None:
        """zero=1: (shard_grad view, start, end) of the part of param `name` this rank owns, or None."""
        bucket = self.buckets[self.param_bucket[name]]
        p0, p1 = self.param_range[name]
        o0, o1 = self.owned_range(bucket)
        lo, hi = max(p0, o0), min(p1, o1)
        if lo >= hi:
            return None
        base = self.shard_offset(bucket) + (lo - o0)
        return self.shard_grad.narrow(0, base, hi - lo), lo, hi

    # ---------------------------------------------------------------- hooks
    def _register_hooks(self) -> None:
        self._hook_handles = []
        for name, param in self._named:
            bucket = self.buckets[self.param_bucket[name]]
            self._hook_handles.append(param.register_post_accumulate_grad_hook(self._make_hook(name, bucket)))
        if self.overlap_param_gather:
            for module in self.module.modules():
                ids = sorted({self.param_bucket[self.param_names[p]] for p in module.parameters(recurse=False)
                              if p in self.param_names})
                if ids:
                    self._hook_handles.append(module.register_forward_pre_hook(self._make_gather_wait(ids)))
        self.module.register_state_dict_pre_hook(lambda *args, **kwargs: self.finish_param_sync())

    def _make_hook(self, name: str, bucket: Bucket):
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if bucket.launched:
                raise RuntimeError(f"gradient of {name} arrived after its bucket {bucket.index} was reduced: a "
                                   "backward outside no_sync() must be the last one before finish_grad_sync()")
            param.main_grad.add_(param.grad)
            param.grad = None
            if self.events is not None:
                self.events.append(("grad", name))
            if self._sync:
                bucket.ready.add(name)
                if self.overlap_grad_reduce and len(bucket.ready) == len(bucket.params):
                    self._launch(bucket)
        return hook

    def _make_gather_wait(self, bucket_ids: list[int]):
        def pre_hook(module, args):
            for i in bucket_ids:
                bucket = self.buckets[i]
                if bucket.gather_handle is not None:
                    bucket.gather_handle.wait()
                    bucket.gather_handle = None
        return pre_hook

    def _launch(self, bucket: Bucket) -> None:
        if self.events is not None:
            self.events.append(("launch", bucket.index))
        group = self.mesh.dp_group
        if self.sparse_embedding_grad and self.dp > 1 and self._is_embedding_bucket(bucket):
            bucket.handle = self._launch_touched_rows(bucket)
            if bucket.handle is not None:
                bucket.launched = True
                return
        if bucket.comm is not None:  # grad_reduce_dtype=bf16
            bucket.comm.copy_(bucket.grad)
            if self.zero == 1:
                work = comm.reduce_scatter_tensor(bucket.comm_shard, bucket.comm, group, async_op=True)
                bucket.handle = _WorkThen(work, lambda: bucket.shard_grad.copy_(bucket.comm_shard))
            else:
                work = comm.all_reduce(bucket.comm, group, async_op=True)
                bucket.handle = _WorkThen(work, lambda: bucket.grad.copy_(bucket.comm))
        elif self.zero == 1:
            bucket.handle = comm.reduce_scatter_tensor(bucket.shard_grad, bucket.grad, group, async_op=True)
        else:
            bucket.handle = comm.all_reduce(bucket.grad, group, async_op=True)
        bucket.launched = True

    def _is_embedding_bucket(self, bucket: Bucket) -> bool:
        return len(bucket.params) == 1 and self.specs[bucket.params[0]].name == "embed_tokens.weight"

    def _launch_touched_rows(self, bucket: Bucket):
        """The token embedding's reduction, row-sparse: rows no DP rank's step touched are zero on every rank,
        so only the union of touched rows is all-reduced (one small blocking all-reduce of a row mask, then
        an async one of those rows). None (-> the dense path) when over half the rows are touched."""
        grad = self.module.get_parameter(bucket.params[0]).main_grad
        rows2d = grad.view(grad.shape[0], -1)
        touched = (rows2d != 0).any(dim=1).to(torch.float32)
        comm.all_reduce(touched, self.mesh.dp_group)
        rows = touched.nonzero().squeeze(1)
        self.embedding_rows_reduced = rows.numel()  # for tests and benchmarks
        if 2 * rows.numel() > rows2d.shape[0]:
            return None
        values = rows2d.index_select(0, rows).to(self.reduce_dtype)
        work = comm.all_reduce(values, self.mesh.dp_group, async_op=True)

        def write_back():
            rows2d.index_copy_(0, rows, values.to(rows2d.dtype))
            if self.zero == 1:  # what reduce_scatter would leave: this rank's slice of the summed bucket
                bucket.shard_grad.copy_(bucket.grad.narrow(0, self.dp_rank * bucket.shard_numel, bucket.shard_numel))
        return _WorkThen(work, write_back)

    # ---------------------------------------------------------------- public API
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (non-final micro-batches): no bucket is reduced."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def finish_grad_sync(self) -> None:
        """Launch the buckets not launched yet and wait for all reductions."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None

    def zero_grad_buffer(self) -> None:
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None
            bucket.ready.clear()
            bucket.launched = False
        self.grad_buffer.zero_()
        if self.shard_grad is not None:
            self.shard_grad.zero_()
        for _, param in self._named:
            param.grad = None

    @torch.no_grad()
    def gather_params(self, master_shard: torch.Tensor, async_op: bool = False) -> None:
        """zero=1: all-gather each bucket's updated slice (`master_shard`, numel/dp) into param_buffer."""
        for bucket in self.buckets:
            src = master_shard.narrow(0, self.shard_offset(bucket), bucket.shard_numel)
            if src.dtype != self.param_buffer.dtype:
                src = src.to(self.param_buffer.dtype)
            handle = comm.all_gather_into_tensor(bucket.data, src, self.mesh.dp_group, async_op=async_op)
            bucket.gather_handle = handle if async_op else None
            if not async_op and handle is not None:
                handle.wait()

    def finish_param_sync(self) -> None:
        """Wait for every pending ZeRO-1 parameter all-gather."""
        for bucket in self.buckets:
            if bucket.gather_handle is not None:
                bucket.gather_handle.wait()
                bucket.gather_handle = None


def wrap_data_parallel(chunks, mesh, cfg) -> list:
    """Apply `train.trainable` and wrap each chunk in a DataParallel with its gradient buffers."""
    out = []
    for chunk in chunks:
        apply_trainable(chunk, cfg.train.trainable)
        out.append(DataParallel(chunk, mesh, cfg))
    return out


def _reduced_grad_views(chunk, name: str, param) -> list[torch.Tensor]:
    """The parts of `param`'s gradient this rank holds fully reduced over dp."""
    if isinstance(chunk, DataParallel):
        if name not in chunk.param_range:
            return []
        if chunk.zero == 1:
            owned = chunk.owned_grad(name)
            return [owned[0]] if owned is not None else []
        return [param.main_grad]
    return [param.grad] if param.grad is not None else []


def finalize_model_grads(chunks, mesh) -> None:
    """All reductions a step needs before the optimizer.

    1. wait for the DP buckets (launching any left);
    2. sum gradients of sequence-parallel-replicated params (norm weights
       under SP, `ParamSpec.sequence_parallel`) and of LoRA's replicated
       factors (`ParamSpec.tp_partial_grad`) over TP, in one all-reduce — every TP rank of a
       dp rank has the same buffer layout, so under zero=1 the owned slices
       line up and are summed in place;
    3. tied embeddings split across pipeline stages: sum the first stage's
       `embed_tokens.weight` grad and the last stage's `lm_head.weight` grad
       over `mesh.embedding_group`, so both copies get the same update.
    """
    for chunk in chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync()

    if mesh.tp > 1:
        views = []
        for chunk in chunks:
            module = unwrap(chunk)
            for name, spec in param_specs(module).items():
                if spec.sequence_parallel or getattr(spec, "tp_partial_grad", False):
                    views += _reduced_grad_views(chunk, name, module.get_parameter(name))
        if views:
            flat = torch.cat([v.reshape(-1) for v in views])
            comm.all_reduce(flat, mesh.tp_group)
            pos = 0
            for v in views:
                v.copy_(flat[pos:pos + v.numel()].view_as(v))
                pos += v.numel()

    if mesh.pp > 1:
        for chunk in chunks:
            module = unwrap(chunk)
            if not getattr(module.cfg, "tie_embeddings", False):
                continue
            for name, spec in param_specs(module).items():
                if spec.name in EMBEDDING_NAMES or name in EMBEDDING_NAMES:
                    for view in _reduced_grad_views(chunk, name, module.get_parameter(name)):
                        comm.all_reduce(view, mesh.embedding_group)
