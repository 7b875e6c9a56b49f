"""Our engine as an lm-evaluation-harness model, registered as "jinpan".

    import lm_eval, megatron_jinpan.eval              # importing megatron_jinpan.eval registers "jinpan"
    lm_eval.simple_evaluate(model="jinpan", model_args="checkpoint=runs/demo,tp=2,pp=2,batch_size=16",
                            tasks=["demo_exam"], task_manager=lm_eval.tasks.TaskManager(include_path=DIR))

Run it on every rank (torchrun, or `jinpan eval mcq --nproc N`): every rank gets
every request, so the tensor/pipeline collectives line up; data-parallel
replicas split the batches between them (eval/engine.py) and share the
answers, so lm-eval sees one process (rank 0 of world 1) everywhere and
global rank 0 writes the files.

model_args: checkpoint (ours, any layout, or an HF dir), tp, pp, batch_size,
tokenizer (default: the checkpoint's), dtype (fp32|bf16), device,
add_bos_token (default true: LLaMA models are trained with BOS, as lm-eval's
`hf` model encodes them), max_length (default: the model's max_seq_len),
micro_batch (rows per pipeline micro-batch; default batch/pp).

Tokenisation follows lm-eval's `TemplateLM` (context and continuation are
encoded together and split), so with the same tokenizer the per-option
log-likelihoods equal the `hf` model's on the converted checkpoint.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval fills its model registry only while it is empty: fill it first)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval import utils as lm_utils

from .engine import EvalModel


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("jinpan")
class JinpanLM(TemplateLM):
    DEFAULT_BATCH = 16
    DEFAULT_MAX_GEN_TOKS = 256

    def __init__(self, checkpoint=None, tp=1, pp=1, batch_size=None, max_batch_size=None, tokenizer=None,
                 dtype="fp32", device="auto", add_bos_token=True, max_length=None, micro_batch=0,
                 model: EvalModel | None = None, **unused):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("model_args needs checkpoint=PATH (one of our checkpoints/run dirs or an HF dir)")
            model = EvalModel.open(checkpoint, int(tp), int(pp), device=str(device or "auto"), dtype=str(dtype),
                                   tokenizer=tokenizer)
        self.model = model
        self.model.micro_batch = int(micro_batch or 0)
        self.tokenizer = model.tokenizer
        if batch_size in (None, "", "auto") or str(batch_size).startswith("auto"):
            batch_size = self.DEFAULT_BATCH
        self.batch_size = int(batch_size)
        self.add_bos_token = _bool(add_bos_token)
        self._max_length = int(max_length) if max_length else model.max_length
        self._device = model.mesh.device

    # ------------------------------------------------------------ what lm-eval asks about the model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.tokenizer_path).replace("/", "__")

    def get_model_info(self) -> dict:
        m = self.model
        return {"model_checkpoint": m.checkpoint, "tokenizer": m.tokenizer_path,
                "layout": {"tp": m.mesh.tp, "pp": m.mesh.pp, "dp": m.mesh.dp}, "dtype": m.dtype,
                "model_num_parameters": m.cfg.model.num_params()}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        ids = self.tokenizer.encode(string)
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_bos and self.tokenizer.bos_id >= 0:
            ids = [self.tokenizer.bos_id] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        scored = self.model.score([(ctx, cont) for _, ctx, cont in requests], batch_size=override_bs or self.batch_size)
        for (request_str, _, _), answer in zip(requests, scored):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over a whole document, in windows of max_length tokens (BOS as the first context)."""
        windows, owners = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(k)
        scored = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, scored):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature/top_p/top_k) continuations cut at the first `until`."""
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(repr(sorted((gen_kwargs or {}).items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self.DEFAULT_MAX_GEN_TOKS))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            sample = _bool(kwargs.pop("do_sample", False)) and temperature > 0
            keep = max(1, self.max_length - max_gen)
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
            ids = self.model.generate_ids(prompts, max_new_tokens=max_gen, greedy=not sample,
                                          temperature=temperature or 1.0, top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                          top_k=int(kwargs.pop("top_k", 0) or 0), batch_size=self.batch_size)
            for i, response in zip(indices, ids):
                text = self.tok_decode(response)
                for stop in until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
