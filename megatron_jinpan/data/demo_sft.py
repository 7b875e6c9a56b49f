"""The demo instruction set: bilingual (Chinese/English) conversations whose answers can be checked.

    jinpan data demo --output data/demo          # builds this too, under data/demo/sft/

Writes (skipping what exists), all chat JSONL in the OpenAI `messages` format:
  sft/facts.json                 the generated fact table (companies: code and home city; city names)
  sft/stage1.jsonl               the large "open" set: every task type, general:finance = 4:1
  sft/stage2.jsonl               the smaller high-quality set (same mix, no noisy answers, more multi-turn)
  sft/valid.jsonl                held-out conversations of every task -> eval_loss on answer tokens
  sft/heldout.jsonl              held-out questions about new texts -> train.eval_generate (the headline figure)
  sft/heldout_facts.jsonl        taught facts asked in the phrasing training never pairs them with
  sft/heldout_rephrased.jsonl    every kind of question in phrasings training never uses at all
  sft/<name>.bin/.idx (+ .mask)  the sets preprocessed with the `plain` template and data/demo/tokenizer.model

Task types (zh and en forms of each; the answer is short and exact), by what answers them:
  from a text in the prompt (CONTEXT; about half of each domain in training)
    general  reading: the one number in a short story ("每周画画几小时？" -> "3小时"; one digit);
             multi-turn: then a follow-up about the same story (the city)
    finance  figure: revenue or net income stated in a results summary (one digit, "3亿元")
             direction: whether a metric rose or fell (增长/下降, increase/decrease)
             gross profit: revenue minus cost, in one-digit billions
  from a fact taught in training (LOOKUPS)
    general  translate: a city name between Chinese and English (from the fact table)
             arithmetic: one-digit addition ("3加4等于多少？" / "Compute 3 + 4." -> 7)
    finance  ticker: a company's stock code; home city: the city a company is based in (fact table)
General:finance is 4:1 in every set.

What "held out" means: no prompt of valid/heldout/heldout_facts/heldout_rephrased occurs in stage1/stage2.
  - heldout.jsonl: CONTEXT questions on new samples -- new names, cities, figures; answerable by reading
    the prompt, the skill SFT teaches (a tiny model learns it within the demo's few hundred steps);
  - heldout_facts.jsonl: every fact (a city pair, a company, a sum) is taught in training, but one of its
    three phrasings is reserved for it (a different one per fact, so every phrasing is still seen with
    other facts): the fact asked in the phrasing training never pairs it with -- answerable only from the
    learned fact, not the memorised string (the tiny demo model mostly fails this; docs/sft.md);
heldout_rephrased.jsonl asks in phrasings training never shows for any fact (a harder, generalisation
test). Stage 1 has ~5% noisy answers (a wrong number), the way open instruction sets do; stage 2 has none.
"""
from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

from .demo import (EN_ACTIVITIES, EN_FIN_A, EN_FIN_B, _en_person, _zh_person, ZH_ACTIVITIES, ZH_FIN_MID,
                   ZH_FIN_PREFIX, ZH_INDUSTRY)

CITY_PAIRS = [("北京", "Beijing"), ("上海", "Shanghai"), ("广州", "Guangzhou"), ("深圳", "Shenzhen"),
              ("杭州", "Hangzhou"), ("南京", "Nanjing"), ("成都", "Chengdu"), ("武汉", "Wuhan"), ("西安", "Xi'an"),
              ("重庆", "Chongqing"), ("天津", "Tianjin"), ("苏州", "Suzhou"), ("长沙", "Changsha"),
              ("青岛", "Qingdao"), ("厦门", "Xiamen"), ("伦敦", "London"), ("纽约", "New York"), ("悉尼", "Sydney"),
              ("东京", "Tokyo"), ("巴黎", "Paris")]
NUM_COMPANIES = 12
SETS = {"stage1": 6000, "stage2": 1500, "valid": 300, "heldout": 200, "heldout_facts": 200, "heldout_rephrased": 200}

# Which prompts a generator may produce. Generators take `held`: False (training), HELDOUT (valid/heldout)
# or True (heldout_rephrased); demo_prefs.py passes the two booleans.
HELDOUT = "heldout"


def fact_table(seed: int) -> dict:
    """Companies (Chinese and English name, stock code, home city) and the city dictionary."""
    r = random.Random(f"facts:{seed}")
    names, companies = set(), []
    while len(companies) < NUM_COMPANIES:
        zh = r.choice(ZH_FIN_PREFIX) + r.choice(ZH_FIN_MID) + r.choice(ZH_INDUSTRY)
        en = f"{r.choice(EN_FIN_A)} {r.choice(EN_FIN_B)}"
        if zh in names or en in names:
            continue
        names.update((zh, en))
        companies.append({"zh": zh, "en": en, "code": f"{r.choice(['600', '601', '000', '002', '300'])}{r.randint(100, 999)}"})
    home = random.Random(f"facts:home:{seed}")  # a separate stream: names and codes stay as before
    for co in companies:
        co["city_zh"], co["city_en"] = home.choice(CITY_PAIRS)
    return {"companies": companies, "cities": [list(p) for p in CITY_PAIRS]}


def _phrase(r, held, fact: str, train: list[str], rephrased: list[str]) -> str:
    """A fact lookup's question form. Of the three `train` forms one, chosen by the fact, is reserved for the
    held-out sets: training asks the fact in the other two, valid/heldout in that one."""
    if held is True:
        return r.choice(rephrased)
    reserved = zlib.crc32(fact.encode("utf-8")) % len(train)
    if held == HELDOUT:
        return train[reserved]
    return r.choice([p for i, p in enumerate(train) if i != reserved])


# ---------------------------------------------------------------- task generators -> (turns, domain)
def _reading(r, zh: bool, held):
    n = r.randint(1, 9)
    city_zh, city_en = r.choice(CITY_PAIRS)
    if zh:
        who, act = _zh_person(r), r.choice(ZH_ACTIVITIES)
        story = f"{who}住在{city_zh}，每周{act}{n}小时。"
        q = r.choice([f"{who}每周花多长时间{act}？", f"问：{who}一周{act}多久？"] if held is True else
                     [f"{who}每周{act}几小时？", f"请问{who}每周{act}多少小时？"])
        return [story + q, f"{n}小时"], (f"{who}住在哪个城市？", city_zh)
    who, act = _en_person(r), r.choice(EN_ACTIVITIES)
    story = f"{who} lives in {city_en} and spends {n} hours {act} every week. "
    q = r.choice([f"How long does {who} spend {act} each week?", f"Question: how many hours of {act} a week?"]
                 if held is True else [f"How many hours a week does {who} spend {act}?",
                                       f"How many hours does {who} spend {act} every week?"])
    return [story + q, f"{n} hours"], (f"Which city does {who} live in?", city_en)


def _translate(r, zh: bool, held):
    zh_name, en_name = r.choice(CITY_PAIRS)
    if zh:
        q = _phrase(r, held, f"translate:{zh_name}:zh",
                    [f"把“{zh_name}”翻译成英文。", f"“{zh_name}”用英文怎么说？", f"“{zh_name}”的英文名是什么？"],
                    [f"请给出“{zh_name}”的英文。"])
        return [q, en_name], None
    q = _phrase(r, held, f"translate:{en_name}:en",
                [f"Translate \"{en_name}\" into Chinese.", f"How do you write {en_name} in Chinese?",
                 f"What is the Chinese name of {en_name}?"], [f"{en_name} in Chinese, please."])
    return [q, zh_name], None


def _arithmetic(r, zh: bool, held):
    a, b = r.randint(0, 9), r.randint(0, 9)
    if zh:
        q = _phrase(r, held, f"sum:{a}:{b}:zh", [f"{a}加{b}等于多少？", f"{a}和{b}的和是多少？", f"计算：{a}+{b}="],
                    [f"{a}与{b}相加得几？"])
    else:
        q = _phrase(r, held, f"sum:{a}:{b}:en", [f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}."],
                    [f"Sum of {a} and {b}?"])
    return [q, str(a + b)], None


def _figure(r, zh: bool, held, facts):
    co = r.choice(facts["companies"])
    rev = r.randint(2, 9)
    prof = r.randint(1, rev - 1)
    if zh:
        text = f"{co['zh']}{r.randint(2018, 2024)}年营业收入为{rev}亿元，净利润为{prof}亿元。"
        if r.random() < 0.5:
            return [text + ("营业收入多少？" if held is True else "问：营业收入是多少？"), f"{rev}亿元"], None
        return [text + ("净利润多少？" if held is True else "问：净利润是多少？"), f"{prof}亿元"], None
    text = f"{co['en']} reported revenue of ${rev} billion and net income of ${prof} billion for {r.randint(2018, 2024)}. "
    if r.random() < 0.5:
        return [text + ("Revenue?" if held is True else "What was the revenue?"), f"${rev} billion"], None
    return [text + ("Net income?" if held is True else "What was the net income?"), f"${prof} billion"], None


def _direction(r, zh: bool, held, facts):
    co, up, p = r.choice(facts["companies"]), r.random() < 0.5, round(r.uniform(0.5, 40), 1)
    if zh:
        text = f"{co['zh']}净利润同比{'增长' if up else '下降'}{p}%。"
        return [text + ("利润上升了还是下降了？" if held is True else "净利润是增长还是下降？"), "增长" if up else "下降"], None
    text = f"{co['en']}'s net income {'rose' if up else 'fell'} {p}% from a year earlier. "
    return [text + ("Increase or decrease?" if held is True else "Did net income increase or decrease?"),
            "increase" if up else "decrease"], None


def _ticker(r, zh: bool, held, facts):
    co = r.choice(facts["companies"])
    if zh:
        q = _phrase(r, held, f"ticker:{co['zh']}", [f"{co['zh']}的股票代码是什么？", f"请问{co['zh']}的代码是多少？",
                                                     f"{co['zh']}在交易所的代码？"], [f"{co['zh']}的股票代码？"])
    else:
        q = _phrase(r, held, f"ticker:{co['en']}", [f"What is the stock code of {co['en']}?",
                                                     f"Which code does {co['en']} trade under?",
                                                     f"{co['en']} is listed under which code?"], [f"Ticker of {co['en']}?"])
    return [q, co["code"]], None


def _home_city(r, zh: bool, held, facts):
    co = r.choice(facts["companies"])
    if zh:
        q = _phrase(r, held, f"home:{co['zh']}", [f"{co['zh']}的总部在哪个城市？", f"{co['zh']}总部位于哪里？",
                                                   f"请问{co['zh']}设在哪座城市？"], [f"{co['zh']}是哪个城市的公司？"])
        return [q, co["city_zh"]], None
    q = _phrase(r, held, f"home:{co['en']}", [f"Which city is {co['en']} based in?", f"Where is {co['en']} headquartered?",
                                               f"{co['en']} has its head office in which city?"],
                [f"Home city of {co['en']}?"])
    return [q, co["city_en"]], None


def _gross(r, zh: bool, held, facts):
    co = r.choice(facts["companies"])
    cost = r.randint(1, 8)
    rev = r.randint(cost + 1, 9)
    if zh:
        q = f"{co['zh']}营业收入{rev}亿元，营业成本{cost}亿元，毛利{'为多少' if held is True else '是多少'}？"
        return [q, f"{rev - cost}亿元"], None
    q = f"{co['en']} had revenue of ${rev} billion and costs of ${cost} billion. " + (
        "Gross profit?" if held is True else "What was the gross profit?")
    return [q, f"${rev - cost} billion"], None


GENERAL = (_reading, _translate, _arithmetic)
FINANCE = (_figure, _direction, _ticker, _home_city, _gross)
# Training weights: questions about a text in the prompt (reading comprehension, figures, direction, gross
# profit) are half of each domain; lookups of facts (and the one-digit sum table) the rest.
WEIGHTS = {_reading: 2, _translate: 1, _arithmetic: 1,
           _figure: 3, _direction: 2, _gross: 2, _ticker: 1.5, _home_city: 1.5}
# Two held-out sets with different questions: CONTEXT tasks answer from a text in the prompt (new texts:
# heldout.jsonl), LOOKUPS recall a fact taught in training (the reserved phrasing: heldout_facts.jsonl).
CONTEXT = (_reading, _figure, _direction, _gross)
LOOKUPS = (_translate, _arithmetic, _ticker, _home_city)


def _pick(r: random.Random, tasks, allowed):
    tasks = [t for t in tasks if t in allowed]
    return r.choices(tasks, weights=[WEIGHTS[t] for t in tasks])[0]


def conversation(r: random.Random, facts: dict, held, noisy: float, multi_turn: float,
                 tasks=GENERAL + FINANCE) -> dict:
    """One conversation from `tasks`: general 80% / finance 20%, zh 50% / en 50%."""
    zh = r.random() < 0.5
    if r.random() < 0.8 and set(GENERAL) & set(tasks):
        task = _pick(r, GENERAL, tasks)
        (q, a), follow = task(r, zh, held)
        domain = "general"
    else:
        task = _pick(r, FINANCE, tasks)
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


def fact_key(conversation: dict, facts: dict) -> tuple | None:
    """What a lookup asks about -- (task, lang, the city / the two addends / the company); None otherwise."""
    task, q = conversation["task"], conversation["messages"][-2]["content"]
    if task == "arithmetic":
        return task, conversation["lang"], tuple(re.findall(r"\d", q))
    if task == "translate":
        return task, conversation["lang"], conversation["messages"][-1]["content"]
    if task in ("ticker", "home_city"):
        return task, conversation["lang"], next(co["en"] for co in facts["companies"] if co["zh"] in q or co["en"] in q)
    return None


def prompts_of(conversation: dict) -> set[str]:
    """Every user turn with the conversation before it: the prompts a model is trained or scored on."""
    out, history = set(), []
    for m in conversation["messages"]:
        if m["role"] == "user":
            out.add(json.dumps(history + [m], ensure_ascii=False))
        history.append(m)
    return out


def generate_sets(seed: int) -> dict[str, list[dict]]:
    facts = fact_table(seed)
    out, seen, taught = {}, set(), set()
    for name, n in SETS.items():
        r = random.Random(f"sft:{name}:{seed}")
        train = name in ("stage1", "stage2")
        held = False if train else True if name == "heldout_rephrased" else HELDOUT
        tasks = {"heldout": CONTEXT, "heldout_facts": LOOKUPS}.get(name, GENERAL + FINANCE)
        rows = []
        while len(rows) < n:
            c = conversation(r, facts, held, noisy=0.05 if name == "stage1" else 0.0,
                             multi_turn=0.6 if name == "stage2" else 0.3, tasks=tasks)
            if train:
                seen.update(prompts_of(c))
                taught.add(fact_key(c, facts))
            elif prompts_of(c) & seen:  # held out means no prompt of it was trained on (a story drawn twice, ...)
                continue
            elif name == "heldout_facts" and fact_key(c, facts) not in taught:  # a sum training never drew
                continue
            rows.append(c)
        out[name] = rows
    return out


def tokenizer_sample(seed: int, n: int = 600) -> list[str]:
    """The text of `n` stage-2 conversations, one per line: the instruction-set share of the demo tokenizer's
    training text (data/demo.py), so its words ("hours", "小时", city names) get pieces of their own rather
    than single letters and UTF-8 bytes -- shorter answers and ~40% fewer tokens per conversation."""
    rows = generate_sets(seed)["stage2"][:n]
    return [" ".join(m["content"] for m in c["messages"]) for c in rows]


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
