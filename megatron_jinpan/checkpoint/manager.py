"""Training checkpoints: save, resume and reshard with torch.distributed.checkpoint (DCP).

    manager = CheckpointManager(cfg, mesh)
    state = manager.resume(chunks, optimizer)       # TrainState, or None for a fresh start
    manager.install_signal_handler()                # SIGTERM/SIGUSR1 -> save and stop at the end of the step
    ...each step: manager.maybe_save(state, chunks, optimizer); if manager.stop_requested(): break
    manager.save_final(state, chunks, optimizer)

Tensors are stored under GLOBAL names of the single-device model, unpadded
(`model.<name>`, `optim.<name>.exp_avg|exp_avg_sq`), so a checkpoint written
under one (tp, pp, dp, zero) loads under any other:

- save: for each tensor the TP shards are all-gathered (comm.all_gather_into_tensor
  over mesh.tp_group), the vocab padding trimmed, and exactly one rank of the
  pipeline stage keeps it (owners spread round-robin over the stage's dp x tp
  ranks, so writing is shared); `dcp.save` then writes every rank's part;
- load: every rank asks DCP for the full tensors of its own parameters (in
  batches of ~`LOAD_BATCH_BYTES`), and keeps its slice with `ParamSpec.local_slice`
  (pad + split) -- memory is about one batch of full tensors.

Optimizer states come from `optimizer.state_dict()` (shaped like the local
parameter, ZeRO shards already gathered) and are resharded the same way.
With `train.trainable: lora` a checkpoint holds only the adapters (and their
optimizer state) plus `adapters_only`, `base` (the `checkpoint.load` they were
trained on; null = the seeded random init of `train.seed`) and `lora` in
meta.json; loading one first loads that base (or `checkpoint.load` if set),
then the adapters, on any layout.

The step, consumed samples and tokens are in meta.json (the data position and
LR are pure functions of the step); RNG states are saved per global rank and
restored only under the same layout (else reseeded from (seed, step)).

Directory: `run_dir/checkpoints/step_NNNNNNN/` written as `.tmp_step_NNNNNNN`,
checksummed (manifest.json, last), renamed, and only then is `checkpoints/latest`
replaced atomically; `checkpoint.keep` prunes older ones after that. A save
that fails leaves the previous checkpoints and `latest` untouched.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import torch

from .. import device as devices
from ..parallel import comm
from ..parallel.specs import param_specs, unwrap
from ..training.state import TrainState
from . import format as fmt
from .format import CheckpointError

STATE_KEYS = ("exp_avg", "exp_avg_sq")
VALUE_HEAD_KEY = fmt.MODEL_PREFIX + "score.weight"
LOAD_BATCH_BYTES = 1 << 30
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def _log(mesh, msg: str) -> None:
    if mesh.rank == 0:
        print(f"[checkpoint] {msg}", flush=True)


def _agree(mesh, problems: list[str], prefix: str) -> None:
    """Raise the same CheckpointError on every rank if any rank found a problem (no rank left hanging)."""
    everyone = comm.all_gather_object(list(problems))
    merged = []
    for part in everyone:
        for p in part:
            if p not in merged:
                merged.append(p)
    if merged:
        shown = merged[:20] + ([f"... and {len(merged) - 20} more"] if len(merged) > 20 else [])
        raise CheckpointError(prefix + "; ".join(shown))


def _gather_tp(tensor: torch.Tensor, spec, mesh) -> torch.Tensor:
    moved = tensor.detach().movedim(spec.tp_dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] * mesh.tp, *moved.shape[1:]))
    comm.all_gather_into_tensor(out, moved, mesh.tp_group)
    return out.movedim(0, spec.tp_dim)


def _stored_name(global_name: str, tied: bool) -> str:
    """The checkpoint key of a parameter (a tied LM head is the embedding)."""
    return "embed_tokens.weight" if tied and global_name == "lm_head.weight" else global_name


class CheckpointManager:
    def __init__(self, cfg, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.root = Path(cfg.run_dir) / "checkpoints"
        self.last_saved_step: int | None = None
        self._signal_received = False
        self._stop = False            # agreed by every rank
        self._stopping = False
        self._prev_handlers: dict = {}
        # LoRA: checkpoints hold the trainable adapters only, and name the base they sit on.
        self.adapters_only = cfg.train.trainable == "lora"
        self.base = None  # set by load_weights (the checkpoint.load actually loaded)

    # ------------------------------------------------------------------ resume / load
    def resume(self, chunks, optimizer):
        """TrainState of the checkpoint to continue from (checkpoint.resume), or None for a fresh start."""
        mode = str(self.cfg.checkpoint.resume or "auto")
        path = None
        if mode == "auto":
            path = self._auto_path()
        elif mode != "never":
            path = fmt.resolve_checkpoint(mode)
        if path is None:
            self._check_fresh_run()
            if self.cfg.checkpoint.load:
                self.load_weights(self.cfg.checkpoint.load, chunks, optimizer)
            return None
        state = self.load(path, chunks, optimizer)
        self.last_saved_step = state.step
        return state

    def _auto_path(self) -> Path | None:
        latest = fmt.read_latest(self.root)
        if latest is not None:
            if not latest.is_dir():
                raise CheckpointError(f"{self.root / fmt.LATEST} names {latest.name}, which does not exist; "
                                      "set checkpoint.resume=PATH to a step directory")
            return latest
        steps = fmt.list_step_dirs(self.root)
        if steps:  # renamed into place but `latest` not written: the newest complete one
            _log(self.mesh, f"no {fmt.LATEST} pointer; resuming from the newest step directory {steps[-1].name}")
            return steps[-1]
        return None

    def _check_fresh_run(self) -> None:
        """A fresh run may not write over checkpoints of a different model in the same run_dir."""
        steps = fmt.list_step_dirs(self.root)
        if not steps:
            return
        problems = []
        try:
            saved = fmt.model_config_from_meta(fmt.read_meta(steps[-1]))
            problems = fmt.shape_mismatches(saved, self.cfg.model)
        except CheckpointError as exc:
            problems = [str(exc)]
        if problems:
            raise CheckpointError(
                f"{self.root} already holds checkpoints of a different model ({'; '.join(problems)}); "
                "a fresh run will not overwrite them: choose another run_dir or remove them")
        _log(self.mesh, f"checkpoint.resume={self.cfg.checkpoint.resume}: starting fresh; existing checkpoints in "
                        f"{self.root} are replaced only as new saves of the same step complete")

    def _verify(self, path: Path) -> None:
        """Sizes on every rank, sha256 split across ranks; every rank raises if any problem was found."""
        try:
            files = sorted(fmt.read_manifest(path)["files"])
            mine = files[self.mesh.rank::self.mesh.world_size]
            problems = fmt.verify_files(path, rels=mine)
        except CheckpointError as exc:
            problems = [str(exc)]
        _agree(self.mesh, problems, f"checkpoint {path} is corrupt or incomplete: ")

    def _check_model(self, path: Path, meta: dict) -> None:
        saved = fmt.model_config_from_meta(meta)
        problems = fmt.shape_mismatches(saved, self.cfg.model)
        if problems:
            raise CheckpointError(f"checkpoint {path} does not fit the configured model: " + "; ".join(problems)
                                  + ". Set the model.* keys to the checkpoint's shape or load another checkpoint")
        for key in ("rope_theta", "norm_eps"):
            if getattr(saved, key) != getattr(self.cfg.model, key):
                _log(self.mesh, f"note: model.{key} is {getattr(self.cfg.model, key)}, "
                                f"the checkpoint was saved with {getattr(saved, key)}")

    def load(self, path, chunks, optimizer, with_optimizer: bool = True):
        """Load a training checkpoint (model, optimizer, RNG) saved under any layout; returns its TrainState."""
        path = Path(path)
        self._verify(path)
        meta = fmt.read_meta(path)
        if meta.get("kind") != "train" and with_optimizer:
            raise CheckpointError(f"{path} holds weights only (kind={meta.get('kind')}); to start training from it "
                                  f"set checkpoint.load={path} (fresh optimizer) instead of checkpoint.resume")
        self._check_model(path, meta)
        adapters = bool(meta.get("adapters_only"))
        if adapters:
            if not self.adapters_only:
                raise CheckpointError(f"{path} holds LoRA adapters only; train on it with train.trainable=lora, or "
                                      "fold them into the base first (jinpan convert lora-merge)")
            self._load_lora_base(path, meta, chunks, resuming=with_optimizer)
        self._load_tensors(path, chunks, optimizer if with_optimizer else None, meta, adapters=adapters)
        if not with_optimizer:
            return None
        ts = meta["train_state"]
        state = TrainState(step=int(ts["step"]), consumed_samples=int(ts["consumed_samples"]),
                           tokens=int(ts["tokens"]))
        self._restore_rng(path, meta, state.step)
        _log(self.mesh, f"resumed from {path} at step {state.step} "
                        f"(saved under tp={meta['layout']['tp']} pp={meta['layout']['pp']} dp={meta['layout']['dp']})")
        return state

    def _load_lora_base(self, path: Path, meta: dict, chunks, resuming: bool) -> None:
        """The base weights under an adapters-only checkpoint: the recorded base, or on resume checkpoint.load
        if set (a base that moved)."""
        recorded = meta.get("base")
        base = (self.cfg.checkpoint.load if resuming else None) or recorded
        if base and not Path(base).exists():
            raise CheckpointError(f"{path} holds LoRA adapters trained on the base {base}, which does not exist; "
                                  "set checkpoint.load=BASE to those weights (e.g. moved, or their HF conversion)")
        if base != recorded and recorded:
            from .load import resolve_source

            if Path(recorded).resolve() != resolve_source(base)[1].resolve():
                _log(self.mesh, f"note: {path} was trained on {recorded}; loading its adapters on "
                                f"checkpoint.load={base}")
        if base:
            self.load_weights(base, chunks, None)
            return
        seed = (meta.get("lora_base_seed") if "lora_base_seed" in meta else self.cfg.train.seed)
        if int(seed) != int(self.cfg.train.seed):
            raise CheckpointError(f"{path} holds adapters trained on the seeded random base of train.seed={seed}; "
                                  f"set train.seed={seed} (or checkpoint.load=BASE) to rebuild that base")
        self.base = None

    def load_weights(self, source, chunks, optimizer) -> None:
        """checkpoint.load: initial weights from one of our checkpoints or an HF dir; the optimizer starts fresh."""
        from .load import resolve_source

        kind, path = resolve_source(source)
        if kind == "hf":
            self._load_hf(path, chunks)
            self.base = str(path.resolve())
        else:
            self.base = str(path.resolve())
            self.load(path, chunks, None, with_optimizer=False)  # an adapters-only source sets its own base
        if optimizer is not None:  # ZeRO-1 master shards must see the new weights
            if hasattr(optimizer, "reload_model_params"):
                optimizer.reload_model_params()
            else:
                optimizer.load_state_dict(optimizer.state_dict())
        _log(self.mesh, f"initial weights from {path}")

    def _targets(self, chunks, adapters: bool | None = None):
        """(stored model key, local param, spec) for every parameter of this rank.

        adapters=True: only what an adapters-only (LoRA) checkpoint stores; False: all but the adapters
        (loading a base); None: everything."""
        from ..parallel.lora import in_adapter_checkpoint

        out = []
        for chunk in chunks:
            module = unwrap(chunk)
            tied = bool(module.cfg.tie_embeddings)
            for name, spec in param_specs(module).items():
                if adapters is not None and in_adapter_checkpoint(spec.name) != adapters:
                    continue
                out.append((fmt.MODEL_PREFIX + _stored_name(spec.name, tied), module.get_parameter(name), spec))
        return out

    @torch.no_grad()
    def _load_tensors(self, path: Path, chunks, optimizer, meta: dict, adapters: bool = False) -> None:
        import torch.distributed.checkpoint as dcp

        tensors = fmt.tensor_metadata(path)
        tied = bool(self.cfg.model.tie_embeddings)
        # An adapters-only checkpoint fills the adapters; a full one everything else (adapters keep their init).
        model_targets = self._targets(chunks, adapters=True if adapters else (False if self.adapters_only else None))
        specs_by_global = {spec.name: (param, spec) for _, param, spec in model_targets}
        optim_targets = []  # (stored key, global name, state key, local param, spec)
        template = None
        if optimizer is not None:
            template = optimizer.state_dict()
            for gname in template["state"]:
                param, spec = specs_by_global[gname]
                for k in STATE_KEYS:
                    optim_targets.append((f"{fmt.OPTIM_PREFIX}{_stored_name(gname, tied)}.{k}", gname, k, param, spec))
        if optimizer is None and VALUE_HEAD_KEY not in tensors:
            # Initial weights of a reward model / critic from a language model: the LM head is not
            # read and the value head keeps its seeded, layout-independent initial value.
            if any(key == VALUE_HEAD_KEY for key, _, _ in model_targets):
                _log(self.mesh, f"{path} has no value head: score.weight starts from its seeded init")
            model_targets = [t for t in model_targets if t[0] != VALUE_HEAD_KEY]
        needed = {key: spec for key, _, spec in model_targets}
        needed.update({key: spec for key, _, _, _, spec in optim_targets})
        problems = []
        for key, spec in needed.items():
            if key not in tensors:
                problems.append(f"{key} is missing" + (" (was it saved with a different train.trainable?)"
                                                       if key.startswith(fmt.OPTIM_PREFIX) else ""))
            elif tuple(tensors[key][0]) != tuple(spec.full_shape):
                problems.append(f"{key} has shape {tuple(tensors[key][0])}, the model needs {tuple(spec.full_shape)}")
        _agree(self.mesh, problems, f"checkpoint {path} does not fit this model: ")

        # Batches of full tensors; every rank makes the same number of (collective) dcp.load calls.
        keys = list(needed)
        batches, current, used = [], [], 0
        for key in keys:
            shape, dtype = tensors[key]
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if current and used + nbytes > LOAD_BATCH_BYTES:
                batches.append(current)
                current, used = [], 0
            current.append(key)
            used += nbytes
        if current:
            batches.append(current)
        count = torch.tensor([len(batches)], dtype=torch.int64, device=self.mesh.device)
        comm.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        optim_local: dict = {}
        for i in range(int(count.item())):
            batch = batches[i] if i < len(batches) else []
            wanted = {k: torch.empty(tensors[k][0], dtype=tensors[k][1]) for k in batch}
            dcp.load(wanted, checkpoint_id=str(path))
            for key, param, spec in model_targets:
                if key in wanted:
                    param.copy_(spec.local_slice(wanted[key].to(param.dtype), self.mesh.tp_rank, self.mesh.tp))
            for key, gname, k, param, spec in optim_targets:
                if key in wanted:
                    local = spec.local_slice(wanted[key].float(), self.mesh.tp_rank, self.mesh.tp)
                    optim_local.setdefault(gname, {})[k] = local.to(param.device).clone()
            del wanted
        if optimizer is not None:
            saved = meta.get("optimizer") or {}
            optimizer.load_state_dict({"step": int(saved.get("step", meta["train_state"]["step"])),
                                       "param_groups": template["param_groups"], "state": optim_local})

    @torch.no_grad()
    def _load_hf(self, path: Path, chunks) -> None:
        from .hf import HFReader
        from .hf import hf_name as hf_name_of

        problems = []
        try:
            reader = HFReader(path)
            problems = fmt.shape_mismatches(reader.config, self.cfg.model)
        except (CheckpointError, FileNotFoundError, KeyError) as exc:
            problems, reader = [str(exc)], None
        _agree(self.mesh, problems, f"checkpoint.load={path} does not fit the configured model: ")
        try:
            keys = reader.our_keys()
            for key, param, spec in self._targets(chunks, adapters=False if self.adapters_only else None):
                name = key[len(fmt.MODEL_PREFIX):]
                if name == "score.weight" and name not in keys:
                    _log(self.mesh, f"{path} has no value head: score.weight starts from its seeded init")
                    continue
                if name not in keys:
                    raise CheckpointError(f"checkpoint.load={path} has no tensor for {name} "
                                          f"({hf_name_of(name)}); is it the right model?")
                full = reader.get(keys[name])
                param.copy_(spec.local_slice(full.to(param.dtype), self.mesh.tp_rank, self.mesh.tp))
        finally:
            reader.close()

    def _restore_rng(self, path: Path, meta: dict, step: int) -> None:
        layout = meta.get("layout", {})
        same = all(layout.get(k) == v for k, v in self._layout().items())
        f = path / "rng" / f"rank_{self.mesh.rank:05d}.pt"
        if same and f.is_file():
            devices.set_rng_state(torch.load(str(f), weights_only=True), self.mesh.device)
        else:  # a different layout: reseed deterministically from (seed, step, dp and pp rank) -- the same on
            # every TP rank, as at the start of a run, so dropout masks (LoRA) stay equal across a TP group
            rank = self.mesh.pp_rank * self.mesh.dp + self.mesh.dp_rank
            devices.manual_seed_all(int(self.cfg.train.seed) * 1_000_003 + step * 8191 + rank)

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"tp": self.mesh.tp, "pp": self.mesh.pp, "dp": self.mesh.dp, "world_size": self.mesh.world_size,
                "virtual_stages": int(p.virtual_stages), "zero": int(p.zero)}

    # ------------------------------------------------------------------ signals
    def install_signal_handler(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm preemption): finish the step, save, stop. A second signal exits at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            self._prev_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._signal_received:  # second signal: give up on the graceful path
            signal.signal(signum, self._prev_handlers.get(signum) or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signal_received = True
        print(f"[checkpoint] rank {self.mesh.rank}: received signal {signum}; saving and stopping after this step",
              flush=True)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._prev_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._prev_handlers = {}

    def _agree_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._signal_received else 0.0], device=self.mesh.device)
        comm.all_reduce(flag)
        return bool(flag.item() > 0)

    def stop_requested(self) -> bool:
        return self._stop

    # ------------------------------------------------------------------ save
    def maybe_save(self, state, chunks, optimizer) -> None:
        interval = int(self.cfg.checkpoint.interval or 0)
        self._stop = self._agree_stop()
        if self._stop:
            self._stopping = True
            return  # save_final saves once, after the loop stops
        if interval > 0 and state.step % interval == 0 and state.step != self.last_saved_step:
            self.save(state, chunks, optimizer)

    def save_final(self, state, chunks, optimizer) -> None:
        try:
            if (self.cfg.checkpoint.save_on_exit or self._stopping) and state.step > 0 \
                    and state.step != self.last_saved_step:
                self.save(state, chunks, optimizer)
        finally:
            self.restore_signal_handlers()

    def _state_dict(self, chunks, optimizer) -> dict:
        """This rank's share of the global, unpadded tensors (a collective over tp and dp)."""
        mesh = self.mesh
        tied = bool(self.cfg.model.tie_embeddings)
        entries = []  # (key, local tensor, spec)
        by_global = {}
        for key, param, spec in self._targets(chunks, adapters=True if self.adapters_only else None):
            by_global[spec.name] = (param, spec)
            if tied and spec.name == "lm_head.weight":
                continue  # stored once, as the embedding
            entries.append((key, param.detach(), spec))
        if optimizer is not None:
            osd = optimizer.state_dict()
            names = set(osd["state"])
            for part in comm.all_gather_object(sorted(names), mesh.tp_group):
                names.update(part)  # identical entry lists on every TP rank (new_embeddings may differ)
            for gname in sorted(names):
                if tied and gname == "lm_head.weight":
                    continue
                param, spec = by_global[gname]
                for k in STATE_KEYS:
                    t = osd["state"][gname][k] if gname in osd["state"] else torch.zeros_like(param, dtype=torch.float32)
                    entries.append((f"{fmt.OPTIM_PREFIX}{gname}.{k}", t, spec))
        stage_ranks = mesh.dp * mesh.tp
        sd = {}
        for i, (key, tensor, spec) in enumerate(entries):
            owner_dp, owner_tp = divmod(i % stage_ranks, mesh.tp)
            if spec.tp_dim is not None and mesh.tp > 1:
                if mesh.dp_rank != owner_dp:
                    continue
                full = _gather_tp(tensor, spec, mesh)
                if mesh.tp_rank != owner_tp:
                    continue
            else:
                if (mesh.dp_rank, mesh.tp_rank) != (owner_dp, owner_tp):
                    continue
                full = tensor
            if spec.pad_dim is not None:
                full = full.narrow(spec.pad_dim, 0, spec.full_shape[spec.pad_dim])
            sd[key] = full.detach().to("cpu", copy=True).contiguous()
        return sd

    def save(self, state, chunks, optimizer) -> Path:
        """Write step_NNNNNNN (a collective on every rank); `latest` moves only after it is complete."""
        import torch.distributed.checkpoint as dcp

        mesh = self.mesh
        name = fmt.step_dir_name(state.step)
        final = self.root / name
        tmp = self.root / f".tmp_{name}"
        if mesh.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by an earlier failed save
            (tmp / "rng").mkdir(parents=True)
        mesh.barrier()
        sd = self._state_dict(chunks, optimizer)
        dcp.save(sd, checkpoint_id=str(tmp))
        del sd
        torch.save(devices.rng_state(mesh.device), str(tmp / "rng" / f"rank_{mesh.rank:05d}.pt"))
        if mesh.rank == 0:
            opt_meta = None
            if optimizer is not None:
                opt_meta = {"step": int(getattr(optimizer, "step_count", state.step)),
                            "zero": int(self.cfg.parallel.zero)}
            meta = fmt.base_meta(self.cfg.model, "train", train_state=state.to_dict(), layout=self._layout(),
                                 optimizer=opt_meta, trainable=self.cfg.train.trainable,
                                 tokenizer_path=self.cfg.data.tokenizer)
            if self.adapters_only:
                import dataclasses

                meta.update(adapters_only=True, base=self.base, lora=dataclasses.asdict(self.cfg.lora),
                            lora_base_seed=int(self.cfg.train.seed))
            fmt.write_json_atomic(tmp / fmt.META, meta)
            fmt.write_json_atomic(tmp / "model_config.json", meta["model"])
            self.cfg.save(tmp / "config.yaml")
        mesh.barrier()
        files = fmt.checkpoint_files(tmp)
        mine = {rel: fmt.sha256_file(tmp / rel) for rel in files[mesh.rank::mesh.world_size]}
        hashes = {}
        for part in comm.all_gather_object(mine):
            hashes.update(part)
        if mesh.rank == 0:
            fmt.write_manifest(tmp, hashes)
            self._install(tmp, final)
            fmt.write_text_atomic(self.root / fmt.LATEST, name + "\n")
            self._prune(keep_name=name)
        mesh.barrier()
        self.last_saved_step = state.step
        _log(mesh, f"saved {final}")
        return final

    def _install(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():  # same step saved by an earlier run: replace it only now that the new one is complete
            old = final.parent / f".old_{final.name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep_name: str) -> None:
        keep = self.cfg.checkpoint.keep
        if not keep or keep <= 0:
            return
        steps = fmt.list_step_dirs(self.root)
        survivors = {p.name for p in steps[-keep:]} | {keep_name}
        for p in steps:
            if p.name not in survivors:
                shutil.rmtree(p, ignore_errors=True)
