"""Our checkpoint directory format: files, manifest, metadata, path resolution, tensor I/O.

A checkpoint is one directory (`run_dir/checkpoints/step_NNNNNNN/`, or the
output of `jinpan convert`):

    .metadata, __R_0.distcp    torch.distributed.checkpoint files; tensors under
                               GLOBAL names of the single-device model, unpadded:
                               model.<name>, optim.<name>.exp_avg, optim.<name>.exp_avg_sq
    meta.json                  format version, kind (train | weights), model config,
                               layout it was saved under, train state, optimizer scalars
    model_config.json          the LlamaConfig (what load_model builds)
    config.yaml                the resolved run config (training checkpoints)
    rng/rank_NNNNN.pt          RNG states per global rank (training checkpoints)
    tokenizer/                 tokenizer files (converted checkpoints, when known)
    manifest.json              written LAST: size and sha256 of every other file

A directory without manifest.json, with a missing/short file or a checksum
mismatch is refused (CheckpointError), never partially loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

FORMAT = "megatron-jinpan-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
STEP_PREFIX = "step_"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
# Fields that change tensor shapes: a mismatch in any of these refuses the load.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "tie_embeddings")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; the message names the path and the fix."""

    user_facing = True


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def is_checkpoint_dir(path: Path) -> bool:
    return (Path(path) / META).is_file() or (Path(path) / MANIFEST).is_file() or (Path(path) / ".metadata").is_file()


def is_hf_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and not (path / META).is_file()


def list_step_dirs(ckpt_root: Path) -> list[Path]:
    """Completed step directories (temp dirs are dot-prefixed and not listed), oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def read_latest(ckpt_root: Path) -> Path | None:
    latest = Path(ckpt_root) / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not name:
        raise CheckpointError(f"{latest} is empty; point checkpoint.resume at a step directory instead")
    return Path(ckpt_root) / name


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory from: a step dir, a checkpoints dir (its `latest`), or a run dir (checkpoints/latest)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / META).is_file() or (p / MANIFEST).is_file():
        return p
    for root in (p, p / "checkpoints"):
        target = read_latest(root)
        if target is not None:
            if not target.is_dir():
                raise CheckpointError(f"{root / LATEST} names {target.name}, which does not exist")
            return target
    if (p / ".metadata").is_file():
        return p  # DCP files without our manifest: verify_checkpoint explains
    raise CheckpointError(f"{p} is not a megatron-jinpan checkpoint (no {META}/{MANIFEST}, no latest pointer)")


# ------------------------------------------------------------------ files
def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                break
            h.update(data)
    return h.hexdigest()


def checkpoint_files(path: Path) -> list[str]:
    """Relative paths of every file of the checkpoint except the manifest, sorted."""
    path = Path(path)
    out = []
    for root, _, files in os.walk(path):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(path: Path, hashes: dict[str, str] | None = None) -> None:
    """Write manifest.json (sizes + sha256); `hashes` may hold precomputed digests."""
    path = Path(path)
    hashes = dict(hashes or {})
    files = {}
    for rel in checkpoint_files(path):
        files[rel] = {"size": (path / rel).stat().st_size, "sha256": hashes.get(rel) or sha256_file(path / rel)}
    write_json_atomic(path / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})


def read_manifest(path: Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {MANIFEST} is missing "
                              "(the save did not finish); use an earlier checkpoint")
    try:
        manifest = json.loads(mf.read_text())
        manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({exc})") from None
    return manifest


def verify_files(path: Path, rels: list[str] | None = None, checksums: bool = True) -> list[str]:
    """Problems found (empty = fine): missing files, wrong sizes, and (optionally) checksum mismatches.

    `rels` restricts the checksum work to those files (ranks split it); sizes are always checked for all.
    """
    path = Path(path)
    manifest = read_manifest(path)
    problems = []
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = f.stat().st_size
        if size != info["size"]:
            problems.append(f"{rel} has {size} bytes, expected {info['size']} (truncated?)")
            continue
        if checksums and (rels is None or rel in rels) and sha256_file(f) != info["sha256"]:
            problems.append(f"{rel} fails its sha256 check")
    for required in (META, ".metadata"):
        if required not in manifest["files"]:
            problems.append(f"{required} is not part of the checkpoint")
    return problems


def verify_checkpoint(path: Path, checksums: bool = True) -> None:
    problems = verify_files(path, checksums=checksums)
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems))


# ------------------------------------------------------------------ metadata
def read_meta(path: Path) -> dict:
    path = Path(path)
    f = path / META
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META}; it is incomplete or not ours")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a {FORMAT} file")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta['version']}; this code reads <= {VERSION}")
    return meta


def model_config_from_meta(meta: dict):
    from ..models import LlamaConfig

    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    return LlamaConfig(**{k: v for k, v in meta["model"].items() if k in fields})


def shape_mismatches(saved, wanted) -> list[str]:
    """Human-readable differences between two LlamaConfigs in fields that change tensor shapes."""
    out = []
    for key in SHAPE_FIELDS:
        a, b = getattr(saved, key), getattr(wanted, key)
        if a != b:
            out.append(f"model.{key}: checkpoint {a} vs config {b}")
    return out


def tensor_metadata(path: Path) -> dict[str, tuple[tuple, torch.dtype]]:
    """{key: (shape, dtype)} of every tensor in the DCP files."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path}: cannot read DCP .metadata ({exc})") from None
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _dist_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def read_tensors(path: Path, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill `wanted` (key -> preallocated full-size tensor) from the DCP files, in this process only."""
    import torch.distributed.checkpoint as dcp

    if wanted:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
            dcp.load(wanted, checkpoint_id=str(path), no_dist=True)
    return wanted


def write_tensors_lazy(path: Path, specs: dict[str, tuple[tuple, torch.dtype]], fetch) -> None:
    """Write a DCP checkpoint in this process, fetching each tensor only when it is written (streaming)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    class _LazyPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            tensor = fetch(write_item.index.fqn)
            shape, dtype = specs[write_item.index.fqn]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"{write_item.index.fqn}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                      f"expected {tuple(shape)} {dtype}")
            return tensor.contiguous()

    state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}
    # One file per tensor: DCP keeps every tensor of a file alive until the file is done.
    writer = FileSystemWriter(str(path), single_file_per_rank=False, thread_count=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        dcp.save(state, storage_writer=writer, planner=_LazyPlanner(), no_dist=True)


def base_meta(model_cfg, kind: str, **extra) -> dict:
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "model": dataclasses.asdict(model_cfg)}
    meta.update(extra)
    return meta


def model_keys(model_cfg) -> list[str]:
    """Global parameter names of the single-device model (tied models have no lm_head.weight;
    value-head models have score.weight instead)."""
    names = ["embed_tokens.weight"]
    for i in range(model_cfg.num_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight",
                  p + "post_attention_layernorm.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                  p + "mlp.down_proj.weight"]
    names.append("norm.weight")
    if getattr(model_cfg, "head", "lm") == "value":
        names.append("score.weight")  # value head (reward model / critic) instead of the LM head
    elif not model_cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def model_shapes(model_cfg) -> dict[str, tuple]:
    h, f, v = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.vocab_size
    kv = model_cfg.num_kv_heads * model_cfg.head_dim
    q = model_cfg.num_heads * model_cfg.head_dim
    shapes = {}
    for name in model_keys(model_cfg):
        if name in ("embed_tokens.weight", "lm_head.weight"):
            shapes[name] = (v, h)
        elif name == "score.weight":
            shapes[name] = (1, h)
        elif name.endswith("norm.weight"):
            shapes[name] = (h,)
        elif name.endswith("q_proj.weight"):
            shapes[name] = (q, h)
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            shapes[name] = (kv, h)
        elif name.endswith("o_proj.weight"):
            shapes[name] = (h, q)
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            shapes[name] = (f, h)
        elif name.endswith("down_proj.weight"):
            shapes[name] = (h, f)
    return shapes


def check_model_tensors(path: Path, model_cfg, tensors: dict | None = None) -> None:
    """Every model tensor is present with the right shape (else one error listing all problems)."""
    tensors = tensors if tensors is not None else tensor_metadata(path)
    problems = []
    for name, shape in model_shapes(model_cfg).items():
        key = MODEL_PREFIX + name
        if key not in tensors:
            problems.append(f"{key} is missing")
        elif tuple(tensors[key][0]) != tuple(shape):
            problems.append(f"{key} has shape {tuple(tensors[key][0])}, expected {tuple(shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its model config: " + "; ".join(problems))
