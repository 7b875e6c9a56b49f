"""`jinpan data clean` / `jinpan data dedup` / `jinpan data demo`."""
import json
import random
import warnings

import pytest

from megatron_jinpan.cli import main
from megatron_jinpan.data.demo import generate_domain
from megatron_jinpan.data.quality import clean_jsonl, dedup_jsonl, normalize_text

warnings.filterwarnings("ignore")


def _write(path, texts, **extra):
    path.write_text("".join(json.dumps({"text": t, **extra}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_normalize():
    assert normalize_text("ＡＢＣ　１２３\u00a0 x\t\ty\r\n\n\n\nz\x07") == "ABC 123 x y\n\nz"


@pytest.mark.parametrize("workers", [1, 2])
def test_clean_filters_and_stats(tmp_path, workers, capsys):
    zh = generate_domain("zh-finance", 30, 5)
    en = generate_domain("en-general", 10, 5)
    texts = zh + en + ["短", "   ", "Привет мир, это русский текст без китайского и английского " * 3, "ＡＢＣ full-width text here"]
    _write(tmp_path / "in.jsonl", texts, source="x")
    rc = main(["data", "clean", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
               "--workers", str(workers), "--no-progress", "--stats", str(tmp_path / "stats.json")])
    assert rc == 0
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["documents_in"] == 44 and report["documents_out"] == 41
    assert report["dropped"] == {"too_short": 2, "too_long": 0, "language": 1}
    assert report["zh_documents"] == 30 and report["en_documents"] == 11
    assert 0.3 < report["zh_share_chars"] < 0.9
    out = _read(tmp_path / "out.jsonl")
    assert out[-1] == {"text": "ABC full-width text here", "source": "x"}  # NFKC, other fields kept
    assert "documents_out" in capsys.readouterr().out


def test_clean_bad_line(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "fine text here"}\n{oops\n', encoding="utf-8")
    assert main(["data", "clean", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--no-progress"]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def _mutate(text, rng, n_edits):
    chars = list(text)
    for _ in range(n_edits):
        i = rng.randrange(len(chars))
        chars[i] = rng.choice("的了是在有和abcxyz")
    return "".join(chars)


@pytest.mark.parametrize("workers", [1, 2])
def test_dedup_finds_planted_duplicates(tmp_path, workers):
    rng = random.Random(0)
    base = generate_domain("zh-finance", 60, 9) + generate_domain("en-finance", 60, 9)
    base = [t for t in base if len(t) > 200][:80]
    docs, planted_exact, planted_near = list(base), 0, 0
    for i in range(0, 20):
        docs.append(base[i].upper() if i % 2 and base[i].isascii() else "  " + base[i] + " ")  # exact after normalising
        planted_exact += 1
    for i in range(20, 40):
        docs.append(_mutate(base[i], rng, max(1, len(base[i]) // 150)))  # ~1% of characters changed
        planted_near += 1
    order = list(range(len(base), len(docs)))
    rng.shuffle(order)
    docs = base + [docs[i] for i in order]
    _write(tmp_path / "in.jsonl", docs)
    report = dedup_jsonl(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), workers=workers, progress=False)
    assert report["exact_duplicates"] == planted_exact
    assert report["near_duplicates"] == planted_near
    assert report["documents_out"] == len(base)
    assert [d["text"] for d in _read(tmp_path / "out.jsonl")] == base  # first occurrences kept, in order


def test_dedup_cli_exact_only(tmp_path, capsys):
    _write(tmp_path / "in.jsonl", ["same text here", "same text here", "other text"])
    assert main(["data", "dedup", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--exact-only", "--no-progress"]) == 0
    assert '"exact_duplicates": 1' in capsys.readouterr().out
    assert len(_read(tmp_path / "o.jsonl")) == 2
    assert main(["data", "dedup", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2


def test_demo_small_and_idempotent(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["data", "demo", "--output", str(out), "--docs-per-domain", "150"]
    assert main(args) == 0
    for d in ("zh-general", "en-general", "zh-finance", "en-finance"):
        for name in (f"{d}_text_document", f"{d}_valid_text_document", f"ext/{d}_text_document"):
            assert (out / f"{name}.bin").is_file() and (out / f"{name}.idx").is_file()
    for f in ("tokenizer.model", "tokenizer_en.model", "tokenizer_ext.model", "zh_chars.txt"):
        assert (out / f).is_file()
    stamp = (out / "tokenizer.model").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "wrote" not in capsys.readouterr().out  # everything skipped
    assert (out / "tokenizer.model").stat().st_mtime_ns == stamp
    # generation is seeded
    assert generate_domain("en-finance", 5, 1) == generate_domain("en-finance", 5, 1)
