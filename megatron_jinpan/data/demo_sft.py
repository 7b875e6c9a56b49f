"""The demo instruction set: bilingual (Chinese/English) conversations whose answers can be checked.

    jinpan data demo --output data/demo          # builds this too, under data/demo/sft/

Writes (skipping what exists), all chat JSONL in the OpenAI `messages` format:
  sft/facts.json                 the generated fact table (companies, city names) the lookups come from
  sft/stage1.jsonl               the large "open" set: every task type, general:finance = 4:1
  sft/stage2.jsonl               the smaller high-quality set (same mix, no noisy answers, more multi-turn)
  sft/valid.jsonl                held-out conversations -> eval_loss on answer tokens
  sft/heldout.jsonl              held-out prompts with reference answers -> train.eval_generate
  sft/heldout_rephrased.jsonl    the same kind of prompts asked in phrasings never seen in training
  sft/<name>.bin/.idx (+ .mask)  the four sets preprocessed with the `plain` template and data/demo/tokenizer.model

Task types (zh and en forms of each; the answer is short and exact):
  general (80%)  reading: a number or place stated in a short story ("how many minutes does X ...?")
                 translate: a city name between Chinese and English (from the fact table)
                 arithmetic: one-digit addition ("3 加 4 等于多少？" -> 7)
                 multi-turn: a reading question, then a follow-up about the same story
  finance (20%)  figure: a figure stated in a results summary ("净利润是多少？" -> "3.2亿元")
                 direction: whether a metric rose or fell (增长/下降, increase/decrease)
                 ticker: a company's stock code (from the fact table)
                 gross profit: revenue minus cost, in one-digit billions
Held-out sets are new samples (new stories, names and figures) of the training distribution, never a
conversation that occurs in stage1/stage2 (so a fact asked exactly as in training is not held out).
heldout_rephrased.jsonl asks in phrasings training never shows (a harder, generalisation test). Stage 1 has ~5% noisy answers
(a wrong number), the way open instruction sets do; stage 2 has none.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .demo import (EN_ACTIVITIES, EN_CITIES, EN_FIN_A, EN_FIN_B, _en_person, _zh_person, ZH_ACTIVITIES,
                   ZH_FIN_MID, ZH_FIN_PREFIX, ZH_INDUSTRY)

CITY_PAIRS = [("北京", "Beijing"), ("上海", "Shanghai"), ("广州", "Guangzhou"), ("深圳", "Shenzhen"),
              ("杭州", "Hangzhou"), ("南京", "Nanjing"), ("成都", "Chengdu"), ("武汉", "Wuhan"), ("西安", "Xi'an"),
              ("重庆", "Chongqing"), ("天津", "Tianjin"), ("苏州", "Suzhou"), ("长沙", "Changsha"),
              ("青岛", "Qingdao"), ("厦门", "Xiamen"), ("伦敦", "London"), ("纽约", "New York"), ("悉尼", "Sydney"),
              ("东京", "Tokyo"), ("巴黎", "Paris")]
NUM_COMPANIES = 12
SETS = {"stage1": 6000, "stage2": 1500, "valid": 300, "heldout": 200, "heldout_rephrased": 200}


def fact_table(seed: int) -> dict:
    """Companies (Chinese and English name, stock code) and the city dictionary."""
    r = random.Random(f"facts:{seed}")
    names, companies = set(), []
    while len(companies) < NUM_COMPANIES:
        zh = r.choice(ZH_FIN_PREFIX) + r.choice(ZH_FIN_MID) + r.choice(ZH_INDUSTRY)
        en = f"{r.choice(EN_FIN_A)} {r.choice(EN_FIN_B)}"
        if zh in names or en in names:
            continue
        names.update((zh, en))
        companies.append({"zh": zh, "en": en, "code": f"{r.choice(['600', '601', '000', '002', '300'])}{r.randint(100, 999)}"})
    return {"companies": companies, "cities": [list(p) for p in CITY_PAIRS]}


# ---------------------------------------------------------------- task generators -> (turns, domain)
def _reading(r, zh: bool, held: bool):
    n = r.randint(10, 99)
    if zh:
        who, city, act = _zh_person(r), r.choice(CITY_PAIRS)[0], r.choice(ZH_ACTIVITIES)
        story = f"{who}住在{city}，每天{act}{n}分钟。"
        q = r.choice([f"{who}每天{act}多少分钟？", f"问：{who}每天花多长时间{act}？"] if held else
                     [f"{who}每天{act}几分钟？", f"请问{who}每天{act}多少分钟？"])
        follow = (f"{who}住在哪个城市？", city)
        return [story + q, f"{n}分钟"], follow
    who, city, act = _en_person(r), r.choice(EN_CITIES), r.choice(EN_ACTIVITIES)
    story = f"{who} lives in {city} and spends {n} minutes {act} every day. "
    q = r.choice([f"How long does {who} spend {act} each day?", f"Question: how many minutes of {act} a day?"] if held
                 else [f"How many minutes does {who} spend {act} every day?", f"How many minutes a day is {who} {act}?"])
    return [story + q, f"{n} minutes"], (f"Which city does {who} live in?", city)


def _translate(r, zh: bool, held: bool):
    zh_name, en_name = r.choice(CITY_PAIRS)
    if zh:
        q = r.choice([f"“{zh_name}”的英文名是什么？"] if held else [f"把“{zh_name}”翻译成英文。", f"“{zh_name}”用英文怎么说？"])
        return [q, en_name], None
    q = r.choice([f"What is the Chinese name of {en_name}?"] if held else
                 [f"Translate \"{en_name}\" into Chinese.", f"How do you write {en_name} in Chinese?"])
    return [q, zh_name], None


def _arithmetic(r, zh: bool, held: bool):
    a, b = r.randint(0, 9), r.randint(0, 9)
    if zh:
        q = r.choice([f"计算：{a}+{b}="] if held else [f"{a}加{b}等于多少？", f"{a}和{b}的和是多少？"])
    else:
        q = r.choice([f"Compute {a} + {b}."] if held else [f"What is {a} plus {b}?", f"Add {a} and {b}."])
    return [q, str(a + b)], None


def _figure(r, zh: bool, held: bool, facts):
    co = r.choice(facts["companies"])
    rev, prof = round(r.uniform(10, 99), 1), round(r.uniform(1, 9.9), 1)
    if zh:
        text = f"{co['zh']}{r.randint(2018, 2024)}年营业收入为{rev}亿元，净利润为{prof}亿元。"
        if r.random() < 0.5:
            return [text + ("营业收入是多少？" if held else "问：营业收入是多少？"), f"{rev}亿元"], None
        return [text + ("净利润是多少？" if held else "问：净利润是多少？"), f"{prof}亿元"], None
    text = f"{co['en']} reported revenue of ${rev} billion and net income of ${prof} billion for {r.randint(2018, 2024)}. "
    if r.random() < 0.5:
        return [text + ("Revenue?" if held else "What was the revenue?"), f"${rev} billion"], None
    return [text + ("Net income?" if held else "What was the net income?"), f"${prof} billion"], None


def _direction(r, zh: bool, held: bool, facts):
    co, up, p = r.choice(facts["companies"]), r.random() < 0.5, round(r.uniform(0.5, 40), 1)
    if zh:
        text = f"{co['zh']}净利润同比{'增长' if up else '下降'}{p}%。"
        return [text + ("净利润是增长还是下降？" if not held else "利润上升了还是下降了？"), "增长" if up else "下降"], None
    text = f"{co['en']}'s net income {'rose' if up else 'fell'} {p}% from a year earlier. "
    return [text + ("Did net income increase or decrease?" if not held else "Increase or decrease?"),
            "increase" if up else "decrease"], None


def _ticker(r, zh: bool, held: bool, facts):
    co = r.choice(facts["companies"])
    if zh:
        q = f"{co['zh']}的股票代码？" if held else r.choice([f"{co['zh']}的股票代码是什么？", f"请问{co['zh']}的代码是多少？"])
    else:
        q = f"Ticker of {co['en']}?" if held else r.choice([f"What is the stock code of {co['en']}?",
                                                            f"Which code does {co['en']} trade under?"])
    return [q, co["code"]], None


def _gross(r, zh: bool, held: bool, facts):
    co = r.choice(facts["companies"])
    cost = r.randint(1, 8)
    rev = r.randint(cost + 1, 9)
    if zh:
        q = f"{co['zh']}营业收入{rev}亿元，营业成本{cost}亿元，毛利{'为多少' if held else '是多少'}？"
        return [q, f"{rev - cost}亿元"], None
    q = f"{co['en']} had revenue of ${rev} billion and costs of ${cost} billion. " + (
        "Gross profit?" if held else "What was the gross profit?")
    return [q, f"${rev - cost} billion"], None


GENERAL = (_reading, _translate, _arithmetic)
FINANCE = (_figure, _direction, _ticker, _gross)


def conversation(r: random.Random, facts: dict, held: bool, noisy: float, multi_turn: float) -> dict:
    """One conversation: general 80% / finance 20%, zh 50% / en 50%."""
    zh = r.random() < 0.5
    if r.random() < 0.8:
        task = r.choice(GENERAL)
        (q, a), follow = task(r, zh, held)
        domain = "general"
    else:
        task = r.choice(FINANCE)
        (q, a), follow = task(r, zh, held, facts)
        domain = "finance"
    if noisy and r.random() < noisy and a.isdigit():  # a wrong sum, as open sets have
        a = str(int(a) + r.randint(1, 3))
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if follow is not None and r.random() < multi_turn:
        messages += [{"role": "user", "content": follow[0]}, {"role": "assistant", "content": follow[1]}]
    if r.random() < 0.1:
        system = "你是一个简洁的助手。" if zh else "You are a concise assistant."
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "domain": domain, "task": task.__name__.strip("_"), "lang": "zh" if zh else "en"}


def generate_sets(seed: int) -> dict[str, list[dict]]:
    facts = fact_table(seed)
    out, seen = {}, set()
    for name, n in SETS.items():
        r = random.Random(f"sft:{name}:{seed}")
        held = name == "heldout_rephrased"  # other held-out sets: new samples, training phrasings
        train = name in ("stage1", "stage2")
        rows = []
        while len(rows) < n:
            c = conversation(r, facts, held, noisy=0.05 if name == "stage1" else 0.0,
                             multi_turn=0.6 if name == "stage2" else 0.3)
            key = json.dumps(c["messages"], ensure_ascii=False)
            if train:
                seen.add(key)
            elif key in seen:  # held out means never trained on (a one-digit sum asked the same way, ...)
                continue
            rows.append(c)
        out[name] = rows
    return out


def build_sft_demo(out: Path, tokenizer: Path, seed: int, workers: int = 1, log=print) -> dict:
    """Write and preprocess the instruction sets under out/sft (idempotent); returns the prefixes."""
    from .chat_preprocess import preprocess_chat

    sft = out / "sft"
    sft.mkdir(parents=True, exist_ok=True)
    sets = None
    if not (sft / "facts.json").is_file():
        (sft / "facts.json").write_text(json.dumps(fact_table(seed), ensure_ascii=False, indent=1) + "\n")
    paths = {}
    for name in SETS:
        path = sft / f"{name}.jsonl"
        if not path.is_file():
            sets = sets or generate_sets(seed)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in sets[name]), encoding="utf-8")
            tmp.replace(path)
            log(f"wrote {path} ({len(sets[name])} conversations)")
        prefix = sft / name
        if not Path(str(prefix) + ".chat.json").is_file():
            info = preprocess_chat(str(path), str(tokenizer), str(prefix), template="plain", workers=workers,
                                   progress=False)
            log(f"wrote {prefix}.bin/.idx (+ .mask): {info['kept']} conversations, {info['answer_tokens']} answer tokens")
        paths[name] = str(prefix)
    paths["heldout_jsonl"] = str(sft / "heldout.jsonl")
    return paths
