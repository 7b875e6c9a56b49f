"""`jinpan preprocess`: round trip through megatron-core's indexed dataset, workers, bad input."""
import json
import warnings

import numpy as np
import pytest

from megatron_jinpan.cli import main
from megatron_jinpan.data import load_tokenizer
from megatron_jinpan.data.demo import generate_domain
from megatron_jinpan.data.tokenizer import train_tokenizer

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    docs = generate_domain("zh-finance", 300, 2) + generate_domain("en-finance", 300, 2)
    (d / "all.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    train_tokenizer(d / "all.txt", 1000, d / "t.model")
    with open(d / "in.jsonl", "w", encoding="utf-8") as fh:
        for i, t in enumerate(docs):
            fh.write(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n")
            if i == 10:
                fh.write("\n")  # blank lines are skipped
    return d, docs


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("workers", [1, 3])
def test_round_trip(setup, workers, capsys):
    d, docs = setup
    prefix = d / f"out_w{workers}"
    assert main(["preprocess", "--input", str(d / "in.jsonl"), "--tokenizer", str(d / "t.model"),
                 "--output-prefix", str(prefix), "--workers", str(workers), "--append-eod", "--no-progress"]) == 0
    assert "600 documents" in capsys.readouterr().out
    tok = load_tokenizer(d / "t.model")
    got = _read(prefix)
    assert len(got) == len(docs)
    for ids, text in zip(got, docs):
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == text
        assert ids[:-1] == tok.encode(text)


def test_workers_give_identical_files(setup):
    d, _ = setup
    for w in (1, 3):
        if not (d / f"out_w{w}.bin").exists():
            pytest.skip("round-trip test did not run")
    assert (d / "out_w1.bin").read_bytes() == (d / "out_w3.bin").read_bytes()
    assert (d / "out_w1.idx").read_bytes() == (d / "out_w3.idx").read_bytes()


def test_json_key_and_no_eod(setup, tmp_path):
    d, docs = setup
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in docs[:5]), encoding="utf-8")
    assert main(["preprocess", "--input", str(src), "--tokenizer", str(d / "t.model"), "--output-prefix",
                 str(tmp_path / "c"), "--json-key", "content", "--no-progress"]) == 0
    tok = load_tokenizer(d / "t.model")
    assert _read(tmp_path / "c") == [tok.encode(t) for t in docs[:5]]


BAD = {
    "missing_file": (None, "does not exist"),
    "not_json": ('{"text": "ok ok"}\n{"text": "fine"}\nthis is not json\n', "line 3 is not valid JSON"),
    "no_key": ('{"text": "ok"}\n{"body": "x"}\n', "line 2 has no 'text' field"),
    "empty": ('{"text": "ok"}\n{"text": "ok2"}\n{"text": "   "}\n', "line 3: 'text' is empty"),
    "not_string": ('{"text": 5}\n', "line 1: 'text' is a int"),
    "not_object": ('["text"]\n', "line 1 is a JSON list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_errors(setup, tmp_path, capsys, case, workers):
    d, _ = setup
    content, message = BAD[case]
    src = tmp_path / "bad.jsonl"
    if content is not None:
        src.write_text(content, encoding="utf-8")
    # an earlier good output must survive a failed run untouched
    (tmp_path / "out.bin").write_bytes(b"old")
    rc = main(["preprocess", "--input", str(src), "--tokenizer", str(d / "t.model"), "--output-prefix",
               str(tmp_path / "out"), "--workers", str(workers), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.count("\n") == 1  # one line
    assert (tmp_path / "out.bin").read_bytes() == b"old"
    assert not list(tmp_path.glob("*.tmp*"))


def test_missing_tokenizer(setup, tmp_path, capsys):
    d, _ = setup
    rc = main(["preprocess", "--input", str(d / "in.jsonl"), "--tokenizer", str(tmp_path / "nope.model"),
               "--output-prefix", str(tmp_path / "o")])
    assert rc == 2 and "--tokenizer" in capsys.readouterr().err
