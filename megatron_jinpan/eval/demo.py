"""Small generated evaluation sets for the demo recipe, built by `jinpan data demo` (data/demo.py).

    from megatron_jinpan.eval.demo import build_eval_demo
    build_eval_demo("data/demo/eval")

Writes (deterministic for a seed; skipped when present):
  exam/{dev,val}/<subject>_{dev,val}.csv    C-Eval-style Chinese finance exam (question,A,B,C,D,answer,explanation)
  exam_en/{dev,val}/<subject>.jsonl         MMLU-style English exam (question, choices, answer index)
  sentiment.jsonl, sentiment_dev.jsonl      financial-news sentiment, labels positive/negative (积极/消极)
  qa.jsonl                                  questions with checkable answers (numbers and names) for
                                            `jinpan eval generate` and judging
The questions use the demo corpus's vocabulary (data/demo.py word lists), so continued pretraining on the
finance corpus has something to move: a metric is a 财务指标, an index is a 股票指数, "下降" is bad news.

    jinpan eval mcq --checkpoint C --exam data/demo/eval/exam --num_fewshot 2
    jinpan eval classify --checkpoint C --data data/demo/eval/sentiment.jsonl \\
        --labels "positive:积极,negative:消极" --prompt "{text}\\n情感："
    jinpan eval generate --checkpoint C --input data/demo/eval/qa.jsonl --template plain
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from ..data import demo as corpus

LETTERS = "ABCD"

# subject -> (question, right answers, distractors, explanation)
ZH_SUBJECTS = {
    "financial_metrics": ("下列哪一项是上市公司财务报告中的财务指标？", corpus.ZH_METRICS,
                          corpus.ZH_FOODS + corpus.ZH_PLACES + corpus.ZH_ACTIVITIES, "财务指标出现在定期报告中"),
    "stock_indices": ("下列哪一项是股票市场指数？", corpus.ZH_MARKET, corpus.ZH_CITIES + corpus.ZH_TOPICS,
                      "指数反映市场整体涨跌"),
    "regulators": ("下列哪一个是发布宏观经济数据或金融政策的机构？", corpus.ZH_MACRO,
                   corpus.ZH_PLACES + corpus.ZH_FOODS, "这些机构负责宏观与金融管理"),
    "analyst_ratings": ("下列哪一项是分析师给出的投资评级？", corpus.ZH_RATING, corpus.ZH_WEATHER + corpus.ZH_ADJ,
                        "评级表示分析师对股票的看法"),
    "industry_risks": ("上市公司在风险提示中最可能提到下列哪一项？", corpus.ZH_RISK,
                       corpus.ZH_ACTIVITIES + corpus.ZH_FOODS, "风险提示说明可能影响业绩的因素"),
}
EN_SUBJECTS = {
    "financial_metrics": ("Which of the following is a financial metric reported by companies?", corpus.EN_METRICS,
                          corpus.EN_ACTIVITIES + corpus.EN_PLACES),
    "stock_indices": ("Which of the following is a stock market index?", corpus.EN_MARKET,
                      corpus.EN_CITIES + corpus.EN_TOPICS),
    "central_banks": ("Which of the following sets monetary policy or publishes economic data?", corpus.EN_MACRO,
                      [f"the {p}" for p in corpus.EN_PLACES] + corpus.EN_TOPICS),
}


def _mcq(r: random.Random, right: list[str], wrong: list[str]) -> tuple[list[str], int]:
    options = [r.choice(right)] + r.sample([w for w in wrong if w not in right], 3)
    r.shuffle(options)
    answer = next(i for i, o in enumerate(options) if o in right)
    return options, answer


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_exam_zh(out: Path, r: random.Random, n_dev: int, n_val: int) -> None:
    for subject, (question, right, wrong, why) in ZH_SUBJECTS.items():
        for split, n in (("dev", n_dev), ("val", n_val)):
            path = out / split / f"{subject}_{split}.csv"
            if path.is_file():
                continue
            rows = [["id", "question", "A", "B", "C", "D", "answer", "explanation"]]
            for i in range(n):
                options, answer = _mcq(r, right, wrong)
                rows.append([i, question, *options, LETTERS[answer], f"{options[answer]}：{why}。"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(rows)
            tmp.replace(path)


def write_exam_en(out: Path, r: random.Random, n_dev: int, n_val: int) -> None:
    for subject, (question, right, wrong) in EN_SUBJECTS.items():
        for split, n in (("dev", n_dev), ("val", n_val)):
            path = out / split / f"{subject}.jsonl"
            if path.is_file():
                continue
            lines = []
            for _ in range(n):
                options, answer = _mcq(r, right, wrong)
                lines.append(json.dumps({"question": question, "choices": options, "answer": answer}))
            _write_atomic(path, "\n".join(lines) + "\n")


def sentiment_item(r: random.Random) -> dict:
    """A one-sentence finance news item whose direction decides the label."""
    good = r.random() < 0.5
    co = corpus._zh_company(r)
    kind = r.randrange(4)
    if kind == 0:
        text = f"{co}{r.choice(corpus.ZH_METRICS)}同比{'增长' if good else '下降'}{corpus._pct(r)}。"
    elif kind == 1:
        text = f"截至收盘，{r.choice(corpus.ZH_MARKET)}{'上涨' if good else '下跌'}{r.uniform(0.1, 4):.2f}%。"
    elif kind == 2:
        rating = r.choice(corpus.ZH_RATING[:2] if good else corpus.ZH_RATING[3:])
        text = f"分析师给予{co}“{rating}”评级。"
    else:
        text = (f"{co}计划投资{r.randint(1, 200)}亿元扩大{r.choice(corpus.ZH_SECTORS)}业务。" if good else
                f"{co}提示，公司面临{r.choice(corpus.ZH_RISK)}等风险。")
    return {"text": text, "label": "positive" if good else "negative"}


def qa_item(r: random.Random) -> dict:
    co, year = corpus._zh_company(r), r.randint(2015, 2024)
    metric, value = r.choice(corpus.ZH_METRICS[:2]), f"{r.uniform(0.5, 900):.2f}"
    kind = r.randrange(3)
    if kind == 0:
        return {"question": f"{co}发布{year}年报告，{metric}为{value}亿元。问：{co}的{metric}是多少亿元？",
                "answer": value}
    if kind == 1:
        analyst = corpus._zh_person(r)
        return {"question": f"分析师{analyst}给予{co}“{r.choice(corpus.ZH_RATING)}”评级。问：给出评级的分析师是谁？",
                "answer": analyst}
    en = corpus._en_company(r)
    return {"question": f"{en} reported revenue of ${value} billion for {year}. Q: What was the revenue, in billions "
                        "of dollars?", "answer": value}


def build_eval_demo(output, seed: int = 1234, n_dev: int = 5, n_val: int = 40, n_sentiment: int = 200,
                    n_qa: int = 60, log=print) -> dict:
    """Write the demo eval sets under `output` (skipping existing files); returns their paths."""
    out = Path(output)
    existed = out.is_dir() and any(out.rglob("*.*"))
    r = random.Random(f"eval-demo:{seed}")
    write_exam_zh(out / "exam", r, n_dev, n_val)
    write_exam_en(out / "exam_en", r, n_dev, n_val)
    for name, n in (("sentiment_dev.jsonl", 10), ("sentiment.jsonl", n_sentiment)):
        if not (out / name).is_file():
            _write_atomic(out / name, "".join(json.dumps(sentiment_item(r), ensure_ascii=False) + "\n"
                                              for _ in range(n)))
    if not (out / "qa.jsonl").is_file():
        _write_atomic(out / "qa.jsonl", "".join(json.dumps({"id": i, **qa_item(r)}, ensure_ascii=False) + "\n"
                                                for i in range(n_qa)))
    if not existed:
        log(f"eval sets in {out}: exam/ exam_en/ sentiment.jsonl qa.jsonl")
    return {"exam": str(out / "exam"), "exam_en": str(out / "exam_en"), "sentiment": str(out / "sentiment.jsonl"),
            "sentiment_dev": str(out / "sentiment_dev.jsonl"), "qa": str(out / "qa.jsonl")}
