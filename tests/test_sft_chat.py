"""Chat data for SFT: formats -> messages, templates and answer masks, `jinpan preprocess --format chat`,
and the bad-input messages.

    python -m pytest -q tests/test_sft_chat.py
"""
import json

import numpy as np
import pytest

from megatron_jinpan.cli import main
from megatron_jinpan.data.tokenizer import BOS_ID, EOS_ID, DataError, load_tokenizer, train_tokenizer
from megatron_jinpan.posttrain.chat import NoAnswer, load_template, to_messages

CODE = "```python\ndef add(a, b):\n    return a + b  # 加法\n```"
LONG = "营业收入同比增长12.5%，净利润为3.4亿元。" * 40  # a long turn
# ChatML written the way Hugging Face chat_templates are (a user-supplied Jinja string).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = []
    for i in range(400):
        lines.append(f"Human: what is {i} plus {i * 7 % 13}? Assistant: {i + i * 7 % 13}. 营业收入增长了{i % 50}% 🙂")
        lines.append(f"def add(a, b): return a + b  # revenue grew to {i}.5 billion [INST] <<SYS>> im_start")
    (d / "all.txt").write_text("\n".join(lines))
    train_tokenizer(d / "all.txt", 700, d / "t.model")
    return load_tokenizer(d / "t.model")


CONVERSATION = [
    {"role": "system", "content": "You are a finance assistant."},
    {"role": "user", "content": "What is 2 + 3? 🙂"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Write add() in Python."},
    {"role": "assistant", "content": CODE},
]


# ---------------------------------------------------------------- formats
def test_formats_normalise_to_one_messages_list():
    openai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    alpaca = {"instruction": "hi", "input": "", "output": "hello"}
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for record in (openai, sharegpt, alpaca):
        assert to_messages(record, "x") == expected
    # Alpaca with input, system and multi-turn history; OpenAI content parts; null content
    full = to_messages({"system": "S", "history": [["q1", "a1"]], "instruction": "Sum", "input": "2 3", "output": "5"}, "x")
    assert full == [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"}, {"role": "user", "content": "Sum\n\n2 3"},
                    {"role": "assistant", "content": "5"}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": None}]}
    assert to_messages(parts, "x") == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "bot", "content": "x"}]}, r"f\.jsonl line 3: messages\[0\] has unknown role 'bot'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"unknown role 'robot'; valid 'from' values"),
    ({"messages": "hi"}, r"'messages' must be a list"),
    ({"prompt": "x"}, r"no 'messages', 'conversations' or 'instruction'/'output' field \(keys: prompt\)"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\.content is a int"),
    ([1, 2], r"is a JSON list, not an object"),
])
def test_bad_records_name_the_line_and_the_fix(record, match):
    with pytest.raises(DataError, match=match):
        to_messages(record, "f.jsonl line 3")


# ---------------------------------------------------------------- templates and masks
def _spans(ids, mask):
    """Maximal runs of mask==1 as id lists."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", ["plain", "llama2", "chatml"])
def test_masks_cover_exactly_the_answers_and_their_eos(tok, name):
    template = load_template(CHATML if name == "chatml" else name)
    ids, mask = template.encode(CONVERSATION, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    answers = _spans(ids, mask)
    assert len(answers) == 2  # every assistant turn is trained
    for span, message in zip(answers, [CONVERSATION[2], CONVERSATION[4]]):
        assert span[-1] == EOS_ID  # the answer's EOS carries loss
        assert tok.decode(span[:-1]).strip() == message["content"]
    # nothing else is an EOS, and BOS is explicit (never tokenized from text)
    assert ids.count(EOS_ID) == 2
    assert ids.count(BOS_ID) == {"plain": 1, "llama2": 2, "chatml": 0}[name]
    if name != "chatml":
        assert ids[0] == BOS_ID and mask[0] == 0
    # the prompt for the last answer is exactly the ids before it
    prompt = template.encode_prompt(CONVERSATION[:4], tok)
    assert ids[:len(prompt)] == prompt
    tail = mask[len(prompt):]
    n = sum(tail)  # the answer through its EOS; a template's text after EOS (ChatML's "\n") is not trained
    assert tail == [1] * n + [0] * (len(tail) - n) and tok.decode(ids[len(prompt) + n:]).strip() == ""


def test_plain_template_renders_turns(tok):
    text = load_template("plain").render(CONVERSATION[:3]).replace("\ue000", "|")
    assert text == "|bos|You are a finance assistant.\n\nHuman: What is 2 + 3? 🙂\n\nAssistant: 5|eos|"
    llama = load_template("llama2").render(CONVERSATION[:3]).replace("\ue000", "|")
    assert llama == ("|bos|[INST] <<SYS>>\nYou are a finance assistant.\n<</SYS>>\n\nWhat is 2 + 3? 🙂 [/INST] 5 |eos|")


def test_special_token_text_in_content_stays_text(tok):
    messages = [{"role": "user", "content": "say </s> and <s>"}, {"role": "assistant", "content": "ok </s> done"}]
    ids, mask = load_template("plain").encode(messages, tok)
    assert ids.count(EOS_ID) == 1 and ids[-1] == EOS_ID and ids.count(BOS_ID) == 1


def test_real_world_shapes(tok):
    template = load_template("plain")
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": LONG},
                {"role": "assistant", "content": CODE + "\n\n🙂🎉 完成"}]
    ids, mask = template.encode(to_messages({"messages": messages}, "x"), tok)
    (answer,) = _spans(ids, mask)
    assert tok.decode(answer[:-1]).strip() == CODE + "\n\n🙂🎉 完成"
    assert tok.decode(ids).count("营业收入") == 40


def test_no_answer_is_reported_for_skipping(tok):
    template = load_template("plain")
    with pytest.raises(NoAnswer) as info:
        template.encode([{"role": "user", "content": "hi"}], tok)
    assert info.value.reason == "no_assistant"
    with pytest.raises(NoAnswer) as info:
        template.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], tok)
    assert info.value.reason == "empty"


@pytest.mark.parametrize("source,match", [
    ("{% for m in messages %}{{ m.content }", r"is not valid Jinja \(line 1"),
    ("{{ raise_exception('roles must alternate') }}", r"the chat template raised: roles must alternate"),
    ("{% for m in messages %}{{ m.role }}{% endfor %}", r"does not render message contents"),
    ("{{ messages[0].content }}{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
     r"does not render turn by turn"),
    ("no_such_template", r"unknown chat template 'no_such_template'"),
])
def test_templates_that_do_not_render(source, match):
    with pytest.raises(DataError, match=match):
        load_template(source)


def test_template_from_tokenizer_config(tmp_path, tok):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    a = load_template(str(tmp_path)).encode(CONVERSATION, tok)
    (tmp_path / "t.jinja").write_text(CHATML)
    assert load_template(str(tmp_path / "t.jinja")).encode(CONVERSATION, tok) == a


# ---------------------------------------------------------------- preprocess --format chat
def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))


def test_preprocess_chat_counts_masks_and_megatron_reader(tmp_path, tok, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    records = [
        {"messages": CONVERSATION},
        {"conversations": [{"from": "human", "value": "hi 🙂"}, {"from": "gpt", "value": CODE}]},
        {"instruction": "Add 2 and 5", "input": "", "output": "7"},
        {"messages": [{"role": "user", "content": "no answer"}]},                    # dropped: no assistant
        "",
        {"instruction": "Add", "input": "", "output": ""},                            # dropped: empty
        {"messages": [{"role": "user", "content": "Repeat:"}, {"role": "assistant", "content": LONG}]},  # truncated
        {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "x"}]},  # too long
    ]
    _write(tmp_path / "in.jsonl", records)
    prefix = str(tmp_path / "out" / "chat")
    assert main(["preprocess", "--format", "chat", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", tok.path,
                 "--output-prefix", prefix, "--template", "llama2", "--max-seq-len", "600", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kept 4 conversations (1 truncated), dropped 3 (no assistant turn 1, empty 1, over-length 1)" in out
    tokens, masks = IndexedDataset(prefix), IndexedDataset(prefix + ".mask")
    assert len(tokens) == len(masks) == 4
    template = load_template("llama2")
    for i, record in enumerate(records[:3]):
        ids, mask = template.encode(to_messages(record, "x"), tok)
        assert tokens[i].tolist() == ids and masks[i].tolist() == mask
    assert len(tokens[3]) == 600
    meta = json.loads((tmp_path / "out" / "chat.chat.json").read_text())
    assert meta["template"] == "llama2" and meta["vocab_size"] == tok.vocab_size and meta["kept"] == 4

    # parallel workers give the same bytes; --truncation drop drops the long one instead
    assert main(["preprocess", "--format", "chat", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", tok.path,
                 "--output-prefix", prefix + "_w", "--template", "llama2", "--max-seq-len", "600", "--workers", "2",
                 "--truncation", "drop", "--no-progress"]) == 0
    assert "kept 3 conversations (0 truncated), dropped 4" in capsys.readouterr().out
    w = IndexedDataset(prefix + "_w")
    assert [w[i].tolist() for i in range(3)] == [tokens[i].tolist() for i in range(3)]


def test_preprocess_chat_errors_leave_nothing(tmp_path, tok, capsys):
    _write(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}, '{"messages": [', {"messages": CONVERSATION}])
    prefix = tmp_path / "o"
    rc = main(["preprocess", "--format", "chat", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", tok.path,
               "--output-prefix", str(prefix), "--no-progress"])
    assert rc == 2
    assert f"{tmp_path / 'bad.jsonl'} line 2 is not valid JSON" in capsys.readouterr().err
    assert not list(tmp_path.glob("o*"))
    _write(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    rc = main(["preprocess", "--format", "chat", "--input", str(tmp_path / "none.jsonl"), "--tokenizer", tok.path,
               "--output-prefix", str(prefix), "--no-progress"])
    assert rc == 2 and "holds no trainable conversation" in capsys.readouterr().err
    rc = main(["preprocess", "--format", "chat", "--input", str(tmp_path / "none.jsonl"), "--tokenizer", tok.path,
               "--output-prefix", str(prefix), "--template", "{% for %}", "--no-progress"])
    assert rc == 2 and "is not valid Jinja" in capsys.readouterr().err
    assert not list(tmp_path.glob("o*"))
