"""Hugging Face LLaMA directories: config mapping, lazy tensor reading, sharded safetensors writing.

Our global names are HF's `LlamaForCausalLM` names without the `model.`
prefix (`lm_head.weight` keeps its name), so the mapping is a prefix.
Reading is per tensor (safetensors `safe_open`, or `torch.load(mmap=True,
weights_only=True)` for `.bin` shards), so peak memory stays about one
tensor / one shard.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .format import CheckpointError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


# Tensors outside HF's `model.` prefix: the LM head, and the value head of LlamaForSequenceClassification.
HEAD_NAMES = ("lm_head.weight", "score.weight")
SEQUENCE_CLASSIFICATION = "LlamaForSequenceClassification"


def hf_name(ours: str) -> str:
    return ours if ours in HEAD_NAMES else "model." + ours


def our_name(hf: str) -> str | None:
    """Our global name for an HF tensor name, or None for tensors we do not keep (rotary buffers)."""
    if hf.endswith("rotary_emb.inv_freq"):
        return None
    if hf in HEAD_NAMES:
        return hf
    if hf.startswith("model."):
        return hf[len("model."):]
    return hf


# ------------------------------------------------------------------ config
def config_from_hf(hf: dict):
    """LlamaConfig from an HF config.json dict (transformers 4.x or 5.x)."""
    from ..models import LlamaConfig

    if hf.get("model_type") not in (None, "llama"):
        raise CheckpointError(f"config.json has model_type={hf.get('model_type')!r}; only llama is supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"config.json uses rope_type={rope_type!r}; only the default rotary embedding is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"config.json sets {flag}=true; LLaMA without biases only")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    if hf.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(f"config.json head_dim={hf['head_dim']} != hidden_size/num_attention_heads")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    head = "lm"
    if SEQUENCE_CLASSIFICATION in (hf.get("architectures") or []):
        labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 1))
        if labels != 1:
            raise CheckpointError(f"config.json is a {SEQUENCE_CLASSIFICATION} with {labels} labels; a reward "
                                  "model has num_labels=1 (one scalar score)")
        head = "value"
    return LlamaConfig(head=head,
        name=str(hf.get("_name_or_path") or "hf") or "hf",
        vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg, dtype: torch.dtype = torch.float32, pad_token_id: int = 0) -> dict:
    """config.json for LlamaForCausalLM, or LlamaForSequenceClassification (num_labels=1) for a value head.

    A sequence classifier reads its score at the last token that is not `pad_token_id`, so
    `pad_token_id` must be set there (0 = <unk>: our data pads with 0 and ends each sequence with EOS)."""
    out = _config_to_hf(cfg, dtype)
    if getattr(cfg, "head", "lm") == "value":
        out.update(architectures=[SEQUENCE_CLASSIFICATION], num_labels=1, id2label={"0": "LABEL_0"},
                   label2id={"LABEL_0": 0}, pad_token_id=int(pad_token_id))
    return out


def _config_to_hf(cfg, dtype: torch.dtype) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta; 5.x reads rope_parameters.
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }


# ------------------------------------------------------------------ reading
class HFReader:
    """Lazy access to the tensors of an HF directory (safetensors or .bin, sharded or not)."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} has no config.json; is it a Hugging Face model directory?")
        self.hf_config = json.loads((self.path / "config.json").read_text())
        self.config = config_from_hf(self.hf_config)
        self.weight_map = self._weight_map()  # hf name -> file name
        self._open_file: str | None = None
        self._open = None

    def _weight_map(self) -> dict[str, str]:
        p = self.path
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / index).is_file():
                wm = json.loads((p / index).read_text())["weight_map"]
                missing = sorted({f for f in wm.values() if not (p / f).is_file()})
                if missing:
                    raise CheckpointError(f"{p / index} names missing shard(s): {', '.join(missing)}")
                return dict(wm)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (p / single).is_file():
                return {k: single for k in self._keys_of(single)}
        raise CheckpointError(f"{p} has no model.safetensors, pytorch_model.bin or a sharded index of them")

    def _keys_of(self, file: str) -> list[str]:
        if file.endswith(".safetensors"):
            return [k for k in safetensors_header(self.path / file)[0] if k != "__metadata__"]
        return list(self._load_bin(file).keys())

    def _load_bin(self, file: str) -> dict:
        try:
            return torch.load(str(self.path / file), map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read {self.path / file} ({exc})") from None

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def our_keys(self) -> dict[str, str]:
        """our name -> hf name, for every tensor we keep (a tied model's lm_head copy dropped)."""
        out = {}
        for hf in self.weight_map:
            ours = our_name(hf)
            if ours is None or (ours == "lm_head.weight" and self.config.tie_embeddings):
                continue
            out[ours] = hf
        return out

    def get(self, hf: str) -> torch.Tensor:
        file = self.weight_map[hf]
        if file.endswith(".safetensors"):
            return read_safetensor(self.path / file, hf)
        if file != self._open_file:
            self.close()
            self._open = self._load_bin(file)
            self._open_file = file
        return self._open[hf].clone()  # out of the mmap

    def shape_dtype(self, hf: str) -> tuple[tuple, torch.dtype]:
        file = self.weight_map[hf]
        if file.endswith(".safetensors"):
            info = safetensors_header(self.path / file)[0][hf]
            return tuple(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]]
        t = self.get(hf)
        return tuple(t.shape), t.dtype

    def close(self) -> None:
        self._open, self._open_file = None, None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


_HEADER_CACHE: dict = {}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a .safetensors file."""
    import struct

    key = str(path)
    if key not in _HEADER_CACHE:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
        _HEADER_CACHE.clear()  # one file at a time
        _HEADER_CACHE[key] = (header, 8 + n)
    return _HEADER_CACHE[key]


def read_safetensor(path: Path, name: str) -> torch.Tensor:
    """One tensor read with plain file reads (no mmap), so memory is that tensor only."""
    header, base = safetensors_header(path)
    info = header[name]
    begin, end = info["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    out = torch.empty(tuple(info["shape"]), dtype=dtype)
    buf = out.view(-1).view(torch.uint8) if out.numel() else torch.empty(0, dtype=torch.uint8)
    if buf.numel() != end - begin:
        raise CheckpointError(f"{path}: {name} has {end - begin} bytes for shape {info['shape']} {info['dtype']}")
    with open(path, "rb") as f:
        f.seek(base + begin)
        if buf.numel() and f.readinto(memoryview(buf.numpy())) != buf.numel():
            raise CheckpointError(f"{path} is truncated (reading {name})")
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of an HF dir (or one sentencepiece .model file) into dst; names copied."""
    src = Path(src)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    if src.is_file():
        shutil.copyfile(src, dst / "tokenizer.model")
        return ["tokenizer.model"]
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = str(text).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return [s for s in shards if s]
