"""`jinpan eval judge` against a real local HTTP server speaking the chat-completions format."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_jinpan.eval.judge import (JudgeCache, JudgeClient, load_pairs, parse_pairwise, parse_scores,
                                        run_llm_judge, summarize, write_judge_outputs)
from megatron_jinpan.eval.engine import EvalError


class Judge:
    """What the fake endpoint does: behaviour name -> reply; records what it was asked."""

    def __init__(self):
        self.behaviour = "fair"
        self.requests = []
        self.fail_first = 0


def _answers(prompt: str) -> tuple[str, str]:
    m = re.search(r"\[Answer (?:1|A)\]\n(.*?)\n\n\[Answer (?:2|B)\]\n(.*?)\n\n", prompt, re.S)
    return m.group(1), m.group(2)


def _reply(judge: Judge, body: dict) -> tuple[int, bytes]:
    prompt = body["messages"][-1]["content"]
    judge.requests.append(body)
    if judge.fail_first > 0:
        judge.fail_first -= 1
        return 503, b"busy"
    b = judge.behaviour
    if b == "error":
        return 500, b"internal error"
    if b == "not_json":
        return 200, b"<html>surprise</html>"
    if b == "slow":
        time.sleep(1.0)
    first, second = _answers(prompt)
    pairwise = "[[A]]" in prompt
    if b == "first_always":  # pure position bias
        text = "[[A]]" if pairwise else "Answer 1: [[9]]\nAnswer 2: [[2]]"
    else:  # fair: an answer containing GOOD is better; equal otherwise
        s1, s2 = (8 if "GOOD" in first else 3), (8 if "GOOD" in second else 3)
        if pairwise:
            text = "[[A]]" if s1 > s2 else "[[B]]" if s2 > s1 else "[[C]]"
        else:
            text = f"Reasoning...\nAnswer 1: [[{s1}]]\nAnswer 2: [[{s2}]]"
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


@pytest.fixture
def server():
    judge = Judge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == "/v1/chat/completions"
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            judge.last_auth = self.headers.get("Authorization")
            code, payload = _reply(judge, body)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield judge, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


PAIRS = [{"id": 0, "question": "q0", "reference": "ref ok", "candidate": "cand GOOD"},
         {"id": 1, "question": "q1", "reference": "ref GOOD", "candidate": "cand ok"},
         {"id": 2, "question": "q2", "reference": "ref GOOD", "candidate": "cand GOOD"}]


def _client(url, tmp_path, **kw):
    kw = {"timeout": 5.0, "retries": 2, "backoff": 0.01, **kw}
    return JudgeClient(url, "judge-model", "sk-test", cache=JudgeCache(tmp_path / "cache.jsonl"), **kw)


@pytest.mark.parametrize("mode", ["score", "pairwise"])
def test_fair_judge_both_orders_and_cache(server, tmp_path, mode):
    judge, url = server
    client = _client(url, tmp_path)
    records = run_llm_judge(PAIRS, client, mode, workers=2)
    assert [r["outcome"] for r in records] == ["win", "loss", "tie"]
    assert all(r["verdicts"][0] == r["verdicts"][1] for r in records)
    assert len(judge.requests) == 6 and client.calls == 6 and judge.last_auth == "Bearer sk-test"
    # both orders asked: the candidate is answer 2 in one prompt and answer 1 in the other
    firsts = sorted(_answers(r["messages"][-1]["content"])[0] for r in judge.requests if "q0" in r["messages"][-1]["content"])
    assert firsts == ["cand GOOD", "ref ok"]
    s = summarize(records)
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (1, 1, 1, 3)
    assert s["win_rate"] == pytest.approx(1 / 3) and s["tie_adjusted_win_rate"] == pytest.approx(0.5)
    if mode == "score":
        assert s["candidate_mean_score"] == pytest.approx((8 + 3 + 8) / 3)
        assert s["reference_mean_score"] == pytest.approx((3 + 8 + 8) / 3)
    # A rerun (new client, same cache file) sends nothing.
    again = _client(url, tmp_path)
    assert [r["outcome"] for r in run_llm_judge(PAIRS, again, mode)] == ["win", "loss", "tie"]
    assert again.calls == 0 and len(judge.requests) == 6


def test_position_bias_cancels_to_ties(server, tmp_path):
    judge, url = server
    judge.behaviour = "first_always"
    for mode in ("score", "pairwise"):
        records = run_llm_judge(PAIRS, _client(url, tmp_path / mode), mode)
        assert [r["outcome"] for r in records] == ["tie"] * 3
        assert summarize(records)["disagreements"] == 3
        if mode == "score":  # mean over orders: 9 and 2 average out for both sides
            assert all(r["candidate_score"] == r["reference_score"] == 5.5 for r in records)


def test_retry_then_success(server, tmp_path):
    judge, url = server
    judge.fail_first = 2  # two 503s, then answers
    client = _client(url, tmp_path, retries=3)
    rec = run_llm_judge(PAIRS[:1], client, "score", workers=1)[0]
    assert rec["status"] == "ok" and rec["outcome"] == "win" and client.calls == 4


@pytest.mark.parametrize("behaviour,message", [("error", "HTTP 500"), ("not_json", "non-JSON"),
                                                ("slow", "within 0.3s")])
def test_failing_endpoint_is_recorded_not_fatal(server, tmp_path, behaviour, message):
    judge, url = server
    judge.behaviour = behaviour
    client = _client(url, tmp_path, timeout=0.3, retries=1)
    records = run_llm_judge(PAIRS[:2], client, "score", workers=2)
    assert all(r["status"] == "failed" and message in r["error"] and "2 attempt" in r["error"] for r in records)
    assert client.calls == 4  # each pair: first order tried twice, then given up
    summary = write_judge_outputs(tmp_path / "out", records, PAIRS[:2], {"judge": "x", "mode": "score"})
    assert summary["failed"] == 2 and summary["n"] == 0 and summary["win_rate"] is None
    assert (tmp_path / "out" / "judge.md").is_file() and (tmp_path / "out" / "judge_failed.json").is_file()
    assert not (tmp_path / "cache.jsonl").exists() or not (tmp_path / "cache.jsonl").read_text().strip()


def test_cli_end_to_end_and_bad_input(server, tmp_path, capsys):
    from megatron_jinpan.cli import main

    judge, url = server
    answers = tmp_path / "gen" / "answers.jsonl"
    answers.parent.mkdir()
    answers.write_text("\n".join(json.dumps({"question": p["question"], "reference": p["reference"],
                                             "response": p["candidate"]}) for p in PAIRS) + "\n")
    out = tmp_path / "judge"
    assert main(["eval", "judge", "--answers", str(answers), "--judge-url", url, "--mode", "pairwise",
                 "--output", str(out), "--backoff", "0.01"]) == 0
    data = json.loads((out / "judge.json").read_text())
    assert (data["wins"], data["ties"], data["losses"]) == (1, 1, 1)
    assert len((out / "judge.jsonl").read_text().splitlines()) == 3 and "| gen |" in (out / "judge.md").read_text()
    assert "pairwise" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "response": "r"}\n')
    with pytest.raises(EvalError, match="bad.jsonl:1: missing field 'reference'"):
        load_pairs(bad)


def test_parsers():
    assert parse_scores("blah [[3]] ... Answer 1: [[7]]\nAnswer 2: [[10]]") == (7.0, 10.0)
    assert parse_pairwise("A is better [[B]] no wait [[A]]") == "1"
    with pytest.raises(Exception, match="markers"):
        parse_scores("Answer 1: 7")
    with pytest.raises(Exception, match="outside"):
        parse_scores("[[0]] [[11]]")


def test_reward_model_judge(tmp_path):
    """Local judge: `jinpan reward score` on (question, candidate) vs (question, reference)."""
    import dataclasses

    import torch

    from eval_fixtures import tokenizer
    from megatron_jinpan.checkpoint.convert import write_weights_checkpoint
    from megatron_jinpan.checkpoint.format import model_shapes
    from megatron_jinpan.eval.judge import run_reward_judge
    from megatron_jinpan.models import Llama, get_model_config, init_weights

    tok = tokenizer(tmp_path)
    cfg = dataclasses.replace(get_model_config("debug"), vocab_size=320, head="value")
    state = dict(init_weights(Llama(cfg), seed=3).state_dict())
    state["score.weight"] = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    rm = write_weights_checkpoint(tmp_path / "rm", cfg, {k: (s, torch.float32) for k, s in model_shapes(cfg).items()},
                                  lambda k: state[k], tokenizer_src=tok, progress=False)
    pairs = [{"id": 0, "question": "利润 是", "reference": "银行 上涨", "candidate": "the market rose"},
             {"id": 1, "question": "bond", "reference": "same", "candidate": "same"}]
    records = run_reward_judge(pairs, rm, tmp_path / "j1")
    assert records[1]["outcome"] == "tie" and records[1]["candidate_score"] == records[1]["reference_score"]
    swapped = [{**p, "reference": p["candidate"], "candidate": p["reference"]} for p in pairs]
    again = run_reward_judge(swapped, rm, tmp_path / "j2")
    assert again[0]["candidate_score"] == pytest.approx(records[0]["reference_score"], abs=1e-5)
    assert {records[0]["outcome"], again[0]["outcome"]} == {"win", "loss"}
    assert summarize(records)["n"] == 2
