"""`jinpan eval judge`: candidate answers vs reference answers, judged by an LLM or our reward model.

    export JUDGE_API_KEY=...
    jinpan eval judge --answers runs/eval/gen/answers.jsonl --judge-url https://api.example.com/v1 \\
        --judge-model gpt-4o --mode score --output runs/eval/judge
    jinpan eval judge --answers answers.jsonl --reward-checkpoint runs/rm --output runs/eval/judge_rm

Input: JSONL with `question`, `reference` and the candidate `response` per line (`jinpan eval
generate` writes exactly that; field names: --question-field/--reference-field/--candidate-field;
or a second file --baseline B.jsonl whose candidate field is the reference, matched by line).

LLM judge (any OpenAI-compatible chat-completions endpoint; key from the env var --judge-key-env):
- `--mode score` (the recipe's): the judge rates both answers 1-10 and writes each score as [[N]]
  ("Answer 1: [[7]]", "Answer 2: [[4]]"); `--mode pairwise`: the judge answers [[A]], [[B]] or [[C]] (tie).
- Every question is asked in both orders (reference first, then candidate first) to cancel position
  bias; a pair whose two orders disagree is a tie. Scores are the mean over the two orders.
- Each call has a timeout and is retried with exponential back-off (connection errors, timeouts,
  429/5xx, non-JSON, no parsable verdict); a question that still fails is recorded as failed and the
  run goes on. Successful calls are cached (OUTPUT/judge_cache.jsonl, keyed by model and messages),
  so a rerun pays only for what is missing.
Local judge (--reward-checkpoint): our reward model scores (question, answer) for both answers through
`jinpan reward score` (OUTPUT/reward_scores.jsonl); the higher wins (|difference| <= --tie-margin: tie).

Output: judge.jsonl (per question: verdicts per order, scores, outcome), judge.json and judge.md:
wins/ties/losses/failed, win rate W/N and tie-adjusted win rate (W + T/2)/N over the N judged
questions, mean scores.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .engine import EvalError, jsonl_records
from .report import write_json, write_report

SYSTEM_PROMPT = "You are a careful, impartial judge of answers to questions."

SCORE_PROMPT = """[Question]
{question}

[Answer 1]
{answer_1}

[Answer 2]
{answer_2}

Rate how well each answer answers the question (correctness, helpfulness, completeness, clarity) on a
scale of 1 to 10. Do not let the order of the answers or their length influence you. Explain briefly,
then end with exactly two lines:
Answer 1: [[score]]
Answer 2: [[score]]
for example "Answer 1: [[7]]"."""

PAIRWISE_PROMPT = """[Question]
{question}

[Answer A]
{answer_1}

[Answer B]
{answer_2}

Which answer answers the question better (correctness, helpfulness, completeness, clarity)? Do not let
the order of the answers or their length influence you. Explain briefly, then end with your verdict:
"[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" for a tie."""


class JudgeCallError(Exception):
    """One judge call failed (after its retries, when raised by `JudgeClient.complete`)."""


# ---------------------------------------------------------------- parsing verdicts
def parse_scores(text: str) -> tuple[float, float]:
    """The two [[N]] scores (1-10) of a score-mode reply, in answer order."""
    found = [float(x) for x in re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]", text)]
    if len(found) < 2:
        raise JudgeCallError(f"reply has {len(found)} [[score]] markers, expected 2: {text[-200:]!r}")
    a, b = found[-2:]
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise JudgeCallError(f"scores {a}, {b} are outside 1-10")
    return a, b


def parse_pairwise(text: str) -> str:
    """'1', '2' or 'tie' from the last [[A]]/[[B]]/[[C]] marker of a pairwise reply."""
    found = re.findall(r"\[\[\s*([ABC])\s*\]\]", text)
    if not found:
        raise JudgeCallError(f"reply has no [[A]]/[[B]]/[[C]] verdict: {text[-200:]!r}")
    return {"A": "1", "B": "2", "C": "tie"}[found[-1]]


# ---------------------------------------------------------------- the HTTP client with retries and a cache
class JudgeCache:
    """Append-only JSONL of {key, reply}; safe to share between threads."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, str] = {}
        self.lock = threading.Lock()
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that call is simply made again

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.entries[key] = reply
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")


@dataclass
class JudgeClient:
    url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 2.0
    temperature: float = 0.0
    max_tokens: int = 512
    cache: JudgeCache = field(default_factory=lambda: JudgeCache(None))
    calls: int = 0  # HTTP requests actually sent (tests and cost accounting)

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def key(self, messages: list[dict]) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with self.cache.lock:
            self.calls += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            retry = exc.code == 429 or exc.code >= 500
            raise JudgeCallError(f"HTTP {exc.code} from {self.endpoint}" + ("" if retry else " (not retried)")) \
                from (None if retry else exc)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise JudgeCallError(f"no answer from {self.endpoint} within {self.timeout}s: {reason}") from None
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JudgeCallError(f"non-JSON reply from {self.endpoint}: {raw[:120]!r}") from None
        except (KeyError, IndexError, TypeError):
            raise JudgeCallError(f"reply from {self.endpoint} has no choices[0].message.content: "
                                 f"{str(reply)[:160]}") from None
        if not isinstance(content, str):
            raise JudgeCallError(f"reply content is not text: {content!r}")
        return content

    def complete(self, messages: list[dict], parse) -> tuple[str, object]:
        """(reply text, parse(reply)) from the cache or the endpoint, retried with back-off."""
        key = self.key(messages)
        cached = self.cache.get(key)
        if cached is not None:
            return cached, parse(cached)
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                text = self._post(messages)
                parsed = parse(text)
            except JudgeCallError as exc:
                error = exc
                if exc.__cause__ is not None:  # a client error (4xx): retrying cannot help
                    break
                continue
            self.cache.put(key, text)
            return text, parsed
        raise JudgeCallError(f"{error} (after {attempt + 1} attempt(s))")


# ---------------------------------------------------------------- judging pairs
def _outcome(first: str, second: str) -> str:
    """Candidate's outcome from the two orders' verdicts (each 'win'|'loss'|'tie'); disagreement = tie."""
    return first if first == second else "tie"


def judge_pair(client: JudgeClient, question: str, reference: str, candidate: str, mode: str) -> dict:
    """Both orders: reference first (order 1), candidate first (order 2). Candidate-perspective outcome."""
    template = SCORE_PROMPT if mode == "score" else PAIRWISE_PROMPT
    parse = parse_scores if mode == "score" else parse_pairwise
    rec: dict = {"status": "ok"}
    verdicts = []
    cand_scores, ref_scores = [], []
    for order, (a1, a2) in enumerate(((reference, candidate), (candidate, reference)), start=1):
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": template.format(question=question, answer_1=a1, answer_2=a2)}]
        try:
            text, parsed = client.complete(messages, parse)
        except JudgeCallError as exc:
            return {"status": "failed", "error": f"order {order}: {exc}"}
        rec[f"reply_{order}"] = text
        cand_first = order == 2
        if mode == "score":
            s1, s2 = parsed
            cand, ref = (s1, s2) if cand_first else (s2, s1)
            cand_scores.append(cand)
            ref_scores.append(ref)
            verdicts.append("win" if cand > ref else "loss" if cand < ref else "tie")
        else:
            winner = parsed  # '1' | '2' | 'tie' by position
            if winner == "tie":
                verdicts.append("tie")
            else:
                cand_won = (winner == "1") == cand_first
                verdicts.append("win" if cand_won else "loss")
    rec["verdicts"] = verdicts
    rec["outcome"] = _outcome(*verdicts)
    if mode == "score":
        rec["candidate_score"] = sum(cand_scores) / 2
        rec["reference_score"] = sum(ref_scores) / 2
        rec["scores_by_order"] = {"candidate": cand_scores, "reference": ref_scores}
    return rec


def summarize(records: list[dict]) -> dict:
    judged = [r for r in records if r.get("status") == "ok"]
    n = len(judged)
    w = sum(r["outcome"] == "win" for r in judged)
    t = sum(r["outcome"] == "tie" for r in judged)
    lo = sum(r["outcome"] == "loss" for r in judged)
    out = {"n": n, "wins": w, "ties": t, "losses": lo, "failed": len(records) - n,
           "win_rate": w / n if n else None, "tie_adjusted_win_rate": (w + t / 2) / n if n else None,
           "disagreements": sum(len(set(r.get("verdicts", []))) > 1 for r in judged)}
    scored = [r for r in judged if "candidate_score" in r]
    if scored:
        out["candidate_mean_score"] = sum(r["candidate_score"] for r in scored) / len(scored)
        out["reference_mean_score"] = sum(r["reference_score"] for r in scored) / len(scored)
    return out


# ---------------------------------------------------------------- inputs
def load_pairs(answers, question_field="question", reference_field="reference", candidate_field="response",
               baseline=None) -> list[dict]:
    """[{id, question, reference, candidate}] from the answers JSONL (and a baseline JSONL, by line)."""
    def read(path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        out = list(jsonl_records(path))
        if not out:
            raise EvalError(f"{path}: no records")
        return path, out

    path, recs = read(answers)
    base = read(baseline) if baseline else None
    if base is not None and len(base[1]) != len(recs):
        raise EvalError(f"--baseline {base[0]} has {len(base[1])} records but --answers {path} has {len(recs)}; "
                        "they are matched line by line")
    pairs = []
    for k, (line, rec) in enumerate(recs):
        ref_rec = base[1][k][1] if base is not None else rec
        ref_key = candidate_field if base is not None else reference_field
        for key, where, src in ((question_field, path, rec), (candidate_field, path, rec),
                                (ref_key, base[0] if base else path, ref_rec)):
            if key not in src:
                raise EvalError(f"{where}:{line}: missing field {key!r} (set --question-field/--reference-field/"
                                "--candidate-field)")
        pairs.append({"id": rec.get("id", k), "question": str(rec[question_field]),
                      "reference": str(ref_rec[ref_key]), "candidate": str(rec[candidate_field])})
    return pairs


def run_llm_judge(pairs: list[dict], client: JudgeClient, mode: str = "score", workers: int = 4) -> list[dict]:
    def one(p):
        return {"id": p["id"], **judge_pair(client, p["question"], p["reference"], p["candidate"], mode)}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, pairs))


def run_reward_judge(pairs: list[dict], checkpoint, work_dir, tie_margin: float = 0.0,
                     extra_args: list[str] | None = None) -> list[dict]:
    """Local judge: `jinpan reward score` on {prompt, chosen=candidate, rejected=reference} pairs."""
    from ..cli import main as jinpan

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    src, scored = work / "reward_pairs.jsonl", work / "reward_scores.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p["question"], "chosen": p["candidate"], "rejected": p["reference"]},
                                ensure_ascii=False) + "\n")
    scored.unlink(missing_ok=True)  # `reward score` never overwrites; this file is ours to redo
    code = jinpan(["reward", "score", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(scored),
                   *(extra_args or [])])
    if code or not scored.is_file():
        raise EvalError(f"`jinpan reward score --checkpoint {checkpoint}` failed (exit {code}); see its message above")
    rows = [json.loads(line) for line in scored.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for p, row in zip(pairs, rows):
        cand, ref = float(row["reward_chosen"]), float(row["reward_rejected"])
        outcome = "tie" if abs(cand - ref) <= tie_margin else ("win" if cand > ref else "loss")
        out.append({"id": p["id"], "status": "ok", "candidate_score": cand, "reference_score": ref,
                    "verdicts": [outcome], "outcome": outcome})
    return out


def write_judge_outputs(out_dir, records: list[dict], pairs: list[dict], meta: dict) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "judge.jsonl", "w", encoding="utf-8") as fh:
        for p, r in zip(pairs, records):
            fh.write(json.dumps({**p, **r}, ensure_ascii=False) + "\n")
    summary = summarize(records)
    row = {"candidate": meta.get("candidate_name", "candidate"), "reference": meta.get("reference_name", "reference"),
           **summary}
    cols = ["candidate", "reference", "n", "wins", "ties", "losses", "failed", "win_rate", "tie_adjusted_win_rate"]
    if "candidate_mean_score" in summary:
        cols += ["candidate_mean_score", "reference_mean_score"]
    write_report(out, "judge", {**meta, **summary}, [row], cols, title="Pairwise judging",
                 notes=[f"judge: {meta.get('judge')}, mode: {meta.get('mode')}; both orders asked, a pair whose "
                        "orders disagree is a tie; tie-adjusted win rate = (W + T/2) / N over judged pairs"])
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        write_json(out / "judge_failed.json", failed)
    return summary


def add_judge_args(p) -> None:
    p.add_argument("--answers", required=True, help="JSONL: question, reference and candidate response per line")
    p.add_argument("--baseline", help="JSONL whose candidate field is the reference (matched by line)")
    p.add_argument("--question-field", default="question")
    p.add_argument("--reference-field", default="reference")
    p.add_argument("--candidate-field", default="response")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (…/v1) or its /chat/completions")
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--judge-key-env", default="JUDGE_API_KEY", help="environment variable holding the API key")
    p.add_argument("--mode", choices=["score", "pairwise"], default="score")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay (doubles each retry)")
    p.add_argument("--workers", type=int, default=4, help="calls in flight")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--cache", help="cache file (default OUTPUT/judge_cache.jsonl)")
    p.add_argument("--reward-checkpoint", help="local judge: our reward model instead of an endpoint")
    p.add_argument("--tie-margin", type=float, default=0.0, help="local judge: |score difference| counted as a tie")
    p.add_argument("--reward-template", default="plain", help="local judge: chat template the reward model uses")
    p.add_argument("--nproc", type=int, default=1, help="local judge: worker processes")
    p.add_argument("--tp", type=int, default=1, help="local judge: tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="local judge: pipeline-parallel size")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--output", default="runs/eval/judge")


def run_judge_command(args) -> dict:
    pairs = load_pairs(args.answers, args.question_field, args.reference_field, args.candidate_field, args.baseline)
    if args.limit:
        pairs = pairs[: args.limit]
    meta = {"answers": args.answers, "baseline": args.baseline, "mode": args.mode,
            "candidate_name": Path(args.answers).parent.name or "candidate",
            "reference_name": Path(args.baseline).parent.name if args.baseline else "reference"}
    if args.reward_checkpoint:
        meta.update(judge=f"reward model {args.reward_checkpoint}", mode="reward")
        extra = ["--template", args.reward_template, "--nproc", str(args.nproc), "--tp", str(args.tp),
                 "--pp", str(args.pp)]
        records = run_reward_judge(pairs, args.reward_checkpoint, args.output, args.tie_margin, extra)
    else:
        if not args.judge_url:
            raise EvalError("pass --judge-url (an OpenAI-compatible endpoint) or --reward-checkpoint (local judge)")
        cache = JudgeCache(Path(args.cache) if args.cache else Path(args.output) / "judge_cache.jsonl")
        client = JudgeClient(args.judge_url, args.judge_model, os.environ.get(args.judge_key_env), args.timeout,
                             args.retries, args.backoff, max_tokens=args.max_tokens, cache=cache)
        meta["judge"] = f"{args.judge_model} at {client.endpoint}"
        records = run_llm_judge(pairs, client, args.mode, args.workers)
        meta["http_calls"] = client.calls
    return write_judge_outputs(args.output, records, pairs, meta)
