"""Chat data: one conversation format, chat templates, and answer-only loss masks.

    from megatron_jinpan.posttrain.chat import to_messages, load_template
    messages = to_messages(json.loads(line), where="sft.jsonl line 7")
    template = load_template("plain")            # or "llama2", a Jinja file, or a Jinja string
    ids, loss_mask = template.encode(messages, tokenizer)
    prompt_ids = template.encode_prompt(messages[:-1], tokenizer)   # for generation / scoring

Formats (one conversation per JSONL line), all normalised to
`[{"role": "system"|"user"|"assistant", "content": str}, ...]`:
- OpenAI / Hugging Face: {"messages": [{"role": ..., "content": ...}]}
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}
- Alpaca: {"instruction", "input", "output"} (+ optional "system" and "history": [[q, a], ...])

Templates are Jinja, written the way Hugging Face `chat_template`s are
(`messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception`). Which rendered text is the assistant's is found by
rendering prefixes: the text that turn i adds after
`render(messages[:i], add_generation_prompt=True)` is its answer, up to and
including its last EOS. BOS/EOS are never tokenized from text: the template
emits them through `bos_token`/`eos_token`, which render as sentinels that
become the tokenizer's ids, so "</s>" typed in a message stays text.

Each rendered span is tokenized on its own (the first without, the rest with
no sentencepiece dummy prefix), so `encode_prompt(messages[:i])` is always an
exact prefix of `encode(messages)`: a model generates from the very ids it
was trained on.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from ..data.tokenizer import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}

# Private-use code points: never produced by a tokenizer's decode or a normal text corpus.
BOS_MARK, EOS_MARK = "\ue000bos\ue000", "\ue000eos\ue000"
_MARKS = re.compile("(" + re.escape(BOS_MARK) + "|" + re.escape(EOS_MARK) + ")")


class NoAnswer(DataError):
    """A conversation with nothing to train on (no assistant turn, or only empty ones); callers
    skip and count these rather than fail."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # "no_assistant" | "empty"


# ---------------------------------------------------------------- formats -> messages
def _content(value, where: str, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(f"{where}: {field} has a non-text content part {str(part)[:80]!r}; "
                                "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
        return "".join(parts)
    raise DataError(f"{where}: {field} is a {type(value).__name__}, not a string")


def _from_messages(turns, where: str, key: str, role_key: str, text_key: str, roles: dict | None) -> list[dict]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: {key!r} must be a list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict) or role_key not in turn:
            raise DataError(f"{where}: {field} must be an object with {role_key!r} and {text_key!r}, got "
                            f"{str(turn)[:80]!r}")
        raw = turn[role_key]
        role = roles.get(str(raw).lower()) if roles is not None else raw
        if role not in ROLES:
            valid = ", ".join(sorted(roles)) if roles is not None else ", ".join(ROLES)
            raise DataError(f"{where}: {field} has unknown role {raw!r}; valid {role_key!r} values: {valid}")
        out.append({"role": role, "content": _content(turn.get(text_key), where, f"{field}.{text_key}")})
    return out


def _from_alpaca(record: dict, where: str) -> list[dict]:
    out = []
    system = _content(record.get("system"), where, "system")
    if system:
        out.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list) or any(not isinstance(h, (list, tuple)) or len(h) != 2 for h in history):
        raise DataError(f"{where}: 'history' must be a list of [question, answer] pairs")
    for i, (q, a) in enumerate(history):
        out.append({"role": "user", "content": _content(q, where, f"history[{i}][0]")})
        out.append({"role": "assistant", "content": _content(a, where, f"history[{i}][1]")})
    instruction = _content(record.get("instruction"), where, "instruction")
    extra = _content(record.get("input"), where, "input")
    prompt = f"{instruction}\n\n{extra}" if instruction and extra else (instruction or extra)
    out.append({"role": "user", "content": prompt})
    if "output" in record:
        out.append({"role": "assistant", "content": _content(record.get("output"), where, "output")})
    return out


def to_messages(record: dict, where: str) -> list[dict]:
    """One JSONL record (any supported format) -> a list of {role, content}. `where` (e.g.
    "data.jsonl line 12") starts every error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; expected "
                        "{\"messages\": [...]}, {\"conversations\": [...]} or {\"instruction\", \"output\"}")
    if "messages" in record:
        return _from_messages(record["messages"], where, "messages", "role", "content", None)
    if "conversations" in record:
        return _from_messages(record["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
    if "instruction" in record or "output" in record:
        return _from_alpaca(record, where)
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(f"{where} has no 'messages', 'conversations' or 'instruction'/'output' field (keys: {keys}); "
                    "use the OpenAI, ShareGPT or Alpaca format")


def read_jsonl(path: str):
    """(where, record) for each non-blank line of a JSONL file; malformed JSON names file and line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a JSONL file, one conversation per line")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                "each line must be one JSON object") from None


# ---------------------------------------------------------------- built-in templates
# (Rendered with trim_blocks like Hugging Face's, so newlines are written as '\\n' expressions: a literal
# newline right after a {% tag %} would be dropped.)
# Human:/Assistant: turns separated by a blank line; the answer follows "Assistant:" after a space.
PLAIN = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content + '\\n\\n' }}"
    "{% elif m.role == 'user' %}"
    "{% if loop.index0 > 0 and messages[loop.index0 - 1].role == 'assistant' %}{{ '\\n\\n' }}{% endif %}"
    "Human: {{ m.content + '\\n\\n' }}Assistant:"
    "{% else %} {{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# The Llama-2 chat format: each exchange is BOS [INST] question [/INST] answer EOS; a system prompt
# goes inside the first [INST] between <<SYS>> markers.
LLAMA2 = (
    "{% if messages and messages[0].role == 'system' %}"
    "{% set system = messages[0].content %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m.role == 'user' %}"
    "{{ bos_token }}[INST] "
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ m.content | trim }} [/INST]"
    "{% elif m.role == 'assistant' %} {{ m.content | trim }} {{ eos_token }}"
    "{% else %}{{ raise_exception('llama2 template: a system message must come first') }}"
    "{% endif %}"
    "{% endfor %}"
)

BUILTIN = {"plain": PLAIN, "llama2": LLAMA2}


def _raise(message):
    raise DataError(f"the chat template raised: {message}")


@lru_cache(maxsize=32)
def _compile(source: str, name: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"chat template {name} is not valid Jinja (line {exc.lineno}: {exc.message}); "
                        "fix it or use a built-in: " + ", ".join(BUILTIN)) from None


# ---------------------------------------------------------------- tokenizing spans
def _no_prefix_processor(tokenizer):
    """A sentencepiece processor like `tokenizer`'s without the dummy "▁" it puts before every text,
    so a span that continues a line tokenizes as it would inside the line."""
    proc = getattr(tokenizer, "_chat_no_prefix", None)
    if proc is None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(tokenizer._sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        proc = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        tokenizer._chat_no_prefix = proc
    return proc


def _encode_text(tokenizer, text: str, first: bool) -> list[int]:
    if not text:
        return []
    if getattr(tokenizer, "_sp", None) is not None and not first:
        return _no_prefix_processor(tokenizer).encode(text)
    return list(tokenizer.encode(text))


def _special_id(tokenizer, which: str) -> int:
    tid = tokenizer.bos_id if which == "bos" else tokenizer.eos_id
    if tid is None or tid < 0:
        raise DataError(f"tokenizer {getattr(tokenizer, 'path', '')} has no {which.upper()} token, which the chat "
                        f"template emits; use a tokenizer with one")
    return int(tid)


# ---------------------------------------------------------------- the template
class ChatTemplate:
    """A Jinja chat template that can say which rendered text is the assistant's."""

    def __init__(self, source: str, name: str = "<string>"):
        self.source, self.name = source, name
        self._template = _compile(source, name)
        self._check()

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"

    def render(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "") -> str:
        """The template's text with BOS/EOS as sentinels."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=BOS_MARK, eos_token=EOS_MARK)
        except DataError as exc:
            raise DataError(f"{where or 'conversation'}: {exc}") from None
        except jinja2.TemplateError as exc:
            raise DataError(f"{where or 'conversation'}: chat template {self.name} does not render "
                            f"({type(exc).__name__}: {exc})") from None

    def _check(self) -> None:
        probe = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        text = self.render(probe, where=f"chat template {self.name} on a probe conversation")
        if "2+2?" not in text or "4" not in text.split("2+2?", 1)[1]:
            raise DataError(f"chat template {self.name} does not render message contents "
                            "(it must print each message's content, as Hugging Face chat templates do)")
        self.segments(probe, where=f"chat template {self.name} on a probe conversation")

    def segments(self, messages: list[dict], add_generation_prompt: bool = False,
                 where: str = "") -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_answer) spans, in order."""
        full = self.render(messages, add_generation_prompt, where)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], True, where)
            after = self.render(messages[: i + 1], False, where)
            if not (after.startswith(before) and full.startswith(after) and len(before) >= cursor):
                raise DataError(f"{where or 'conversation'}: chat template {self.name} does not render turn by "
                                "turn (a conversation's text must start with the text of each of its prefixes "
                                "plus the generation prompt); answer masks cannot be found with it")
            answer = after[len(before):]
            end = answer.rfind(EOS_MARK)
            stop = len(before) + (end + len(EOS_MARK) if end >= 0 else len(answer))
            spans.append((cursor, len(before), stop))
            cursor = stop
        out = []
        for start, a, b in spans:
            out += [(full[start:a], False), (full[a:b], True)]
        out.append((full[cursor:], False))
        return [(t, answer) for t, answer in out if t]

    def _ids(self, segments, tokenizer) -> tuple[list[int], list[int]]:
        ids, mask = [], []
        for text, answer in segments:
            for piece in _MARKS.split(text):
                if piece == BOS_MARK:
                    new = [_special_id(tokenizer, "bos")]
                elif piece == EOS_MARK:
                    new = [_special_id(tokenizer, "eos")]
                else:
                    new = _encode_text(tokenizer, piece, first=not ids)
                ids += new
                mask += [int(answer)] * len(new)
        return ids, mask

    def encode(self, messages: list[dict], tokenizer, where: str = "") -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and a loss mask that is 1 on every assistant token
        (its EOS included) and 0 elsewhere. NoAnswer when there is nothing to train on."""
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            raise NoAnswer(f"{where or 'conversation'} has no assistant turn", "no_assistant")
        if not any(m["content"].strip() for m in answers):
            raise NoAnswer(f"{where or 'conversation'} has only empty assistant turns", "empty")
        ids, mask = self._ids(self.segments(messages, False, where), tokenizer)
        if not any(mask):
            raise DataError(f"{where or 'conversation'}: chat template {self.name} rendered no assistant text")
        return ids, mask

    def encode_prompt(self, messages: list[dict], tokenizer, where: str = "") -> list[int]:
        """Ids of the conversation plus the assistant header: the model continues with an answer.
        Equal to the first ids of `encode(messages + [answer])`."""
        return self._ids(self.segments(messages, True, where), tokenizer)[0]


def load_template(name_or_path: str) -> ChatTemplate:
    """A built-in ("plain", "llama2"), a Jinja file (or a tokenizer_config.json / Hugging Face model dir
    with a `chat_template`), or a Jinja string."""
    if not name_or_path:
        raise DataError("no chat template given; use sft.template=plain|llama2 or a Jinja file/string")
    name = str(name_or_path)
    if name in BUILTIN:
        return ChatTemplate(BUILTIN[name], name)
    if "{{" in name or "{%" in name:
        return ChatTemplate(name, "<string>")
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer_config.json"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                source = json.loads(text).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                source = None
            if isinstance(source, list):  # named templates: take "default"
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
            if not isinstance(source, str):
                raise DataError(f"chat template {path} has no 'chat_template' string")
            return ChatTemplate(source, str(path))
        return ChatTemplate(text, str(path))
    raise DataError(f"unknown chat template {name!r}: not a built-in ({', '.join(BUILTIN)}), an existing "
                    "file or directory, or a Jinja string")
