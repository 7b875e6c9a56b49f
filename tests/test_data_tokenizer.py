"""Tokenizer training, vocabulary extension and the tokenizer/vocab check."""
import warnings

import pytest

from megatron_jinpan.cli import main
from megatron_jinpan.config import ConfigError, load_config
from megatron_jinpan.data import check_tokenizer, load_tokenizer
from megatron_jinpan.data.demo import generate_domain
from megatron_jinpan.data.tokenizer import extend_tokenizer, frequent_cjk_chars, tokens_per_char, train_tokenizer

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    en = generate_domain("en-finance", 400, 1) + generate_domain("en-general", 400, 1)
    zh = generate_domain("zh-finance", 300, 1) + generate_domain("zh-general", 300, 1)
    (d / "en.txt").write_text("\n".join(en) + "\n", encoding="utf-8")
    (d / "zh.txt").write_text("\n".join(zh[:500]) + "\n", encoding="utf-8")
    (d / "zh_heldout.txt").write_text("\n".join(zh[500:]) + "\n", encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(d / "en.txt"), "--vocab-size", "800",
                 "--output", str(d / "en.model")]) == 0
    return d


def test_train_llama_ids_byte_fallback_split_digits(corpora):
    tok = load_tokenizer(corpora / "en.model")
    sp = tok._sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(0) == "<unk>" and sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>"
    assert 300 < tok.vocab_size <= 800
    pieces = sp.encode("12345 龘", out_type=str)
    assert {"1", "2", "3", "4", "5"} <= set(pieces)  # digits split
    assert any(p.startswith("<0x") for p in pieces)  # unseen character -> bytes, never <unk>
    assert 0 not in tok.encode("12345 龘")
    assert tok.decode(tok.encode("Revenue rose 12.5% 龘")) == "Revenue rose 12.5% 龘"


def test_train_errors(tmp_path, capsys):
    assert main(["tokenizer", "train", "--input", str(tmp_path / "none.txt"), "--vocab-size", "500",
                 "--output", str(tmp_path / "t.model")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_extend_keeps_ids_and_lowers_tokens_per_char(corpora, capsys):
    base = load_tokenizer(corpora / "en.model")
    out = corpora / "ext.model"
    assert main(["tokenizer", "extend", "--base", str(corpora / "en.model"), "--corpus", str(corpora / "zh.txt"),
                 "--num-chars", "400", "--output", str(out), "--heldout", str(corpora / "zh_heldout.txt")]) == 0
    printed = capsys.readouterr().out
    assert "tokens per character" in printed
    ext = load_tokenizer(out)
    assert base.vocab_size < ext.vocab_size <= base.vocab_size + 400
    for i in range(base.vocab_size):  # every old id keeps its piece, score and type
        assert base._sp.id_to_piece(i) == ext._sp.id_to_piece(i)
        assert base._sp.get_score(i) == ext._sp.get_score(i)
    assert (ext._sp.unk_id(), ext._sp.bos_id(), ext._sp.eos_id()) == (0, 1, 2)
    held = (corpora / "zh_heldout.txt").read_text(encoding="utf-8").splitlines()
    before, after = tokens_per_char(base, held), tokens_per_char(ext, held)
    assert after < 0.7 * before
    # English text is tokenized exactly as before
    text = "Shares of Atlas Capital rose 3.2% after the announcement."
    assert ext.encode(text) == base.encode(text)


def test_extend_with_chars_file_skips_present(corpora, tmp_path):
    chars = tmp_path / "chars.txt"
    chars.write_text("# comment\n金\n融\n金\na\n", encoding="utf-8")  # 'a' exists already, 金 twice
    info = extend_tokenizer(corpora / "en.model", __import__("megatron_jinpan.data.tokenizer", fromlist=["x"])
                            .read_chars_file(chars), tmp_path / "t2.model")
    assert info["added"] == 2 and info["new_vocab"] == info["base_vocab"] + 2
    tok = load_tokenizer(tmp_path / "t2.model")
    assert tok._sp.piece_to_id("金") == info["base_vocab"] and tok._sp.piece_to_id("融") == info["base_vocab"] + 1
    assert frequent_cjk_chars(corpora / "zh.txt", 5) and len(frequent_cjk_chars(corpora / "zh.txt", 5)) == 5


def test_extend_needs_one_source(corpora, tmp_path, capsys):
    assert main(["tokenizer", "extend", "--base", str(corpora / "en.model"), "--output", str(tmp_path / "x.model")]) == 2
    assert "--chars" in capsys.readouterr().err


def test_check_tokenizer(corpora):
    path = str(corpora / "en.model")
    vocab = load_tokenizer(path).vocab_size
    cfg = load_config(None, [f"data.tokenizer={path}", f"model.vocab_size={vocab}"])
    assert check_tokenizer(cfg).vocab_size == vocab
    cfg = load_config(None, [f"data.tokenizer={path}", f"model.vocab_size={vocab - 1}"])
    with pytest.raises(ConfigError, match=f"model.vocab_size={vocab}"):
        check_tokenizer(cfg)
    cfg = load_config(None, [f"data.tokenizer={corpora / 'missing.model'}"])
    with pytest.raises(ConfigError, match="does not exist"):
        check_tokenizer(cfg)
    with pytest.raises(ConfigError, match="data.tokenizer is not set"):
        check_tokenizer(load_config(None, []))
    assert check_tokenizer(load_config(None, ["data.mock=true"])) is None
