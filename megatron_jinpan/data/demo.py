"""`jinpan data demo`: a small bilingual (Chinese/English) finance-flavoured corpus,
generated procedurally, tokenized and preprocessed, ready for the demo recipes.

    jinpan data demo --output data/demo

Writes (skipping whatever already exists):
  corpus/<domain>.jsonl, corpus/<domain>_valid.jsonl   domains: zh-general en-general zh-finance en-finance
  corpus/all.txt                                      tokenizer training text (one document per line): the
                                                      four domains + a sample of the instruction sets' text
  tokenizer.model (+ .vocab)                          bilingual BPE, vocab 8000
  <domain>_text_document.{bin,idx}                    training sets (EOD appended)
  <domain>_valid_text_document.{bin,idx}              held-out sets per domain
  prefs/train, prefs/valid                            preference pairs (data/demo_prefs.py)
  zh_chars.txt                                        Chinese characters by frequency (a --chars list)
  tokenizer_en.model                                  English-only BPE (vocab 3000), the "LLaMA" of the
                                                      vocabulary-extension demo
  tokenizer_ext.model                                 tokenizer_en + zh_chars.txt (`jinpan tokenizer extend`)
  ext/<domain>_text_document, ext/<domain>_valid_text_document   the same data under tokenizer_ext
  eval/                                               exam CSV/JSONL, sentiment and QA sets (eval/demo.py)

Text is built from templates x word lists with a seeded RNG: documents keep
one company/person/topic across their sentences (learnable structure) while
numbers, dates and word choices vary (so the loss falls but never reaches 0).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

DOMAINS = ("zh-general", "en-general", "zh-finance", "en-finance")

# ------------------------------------------------------------------ word lists
ZH_SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤")
ZH_GIVEN = list("伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华玉萍红娥玲芬燕彬鹏辉建国文斌宇浩凯健俊帆帅旭宁颖琳晨阳佳欣怡雪梅婷慧敏瑞祥志远海波")
ZH_CITIES = ["北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "武汉", "西安", "重庆", "天津", "苏州", "长沙", "郑州",
             "青岛", "厦门", "宁波", "合肥", "昆明", "大连", "沈阳", "济南", "福州", "哈尔滨", "贵阳", "南宁", "兰州", "太原"]
ZH_PLACES = ["公园", "图书馆", "博物馆", "火车站", "学校", "医院", "菜市场", "咖啡馆", "体育馆", "海边", "山顶", "老街", "书店", "剧院"]
ZH_FOODS = ["米饭", "面条", "饺子", "包子", "火锅", "烤鸭", "豆腐", "鱼香肉丝", "宫保鸡丁", "小笼包", "馄饨", "炒饭", "月饼", "粽子"]
ZH_ACTIVITIES = ["散步", "读书", "跑步", "游泳", "爬山", "下棋", "画画", "唱歌", "弹钢琴", "做饭", "写日记", "看电影", "打篮球", "踢足球"]
ZH_ADJ = ["美丽", "安静", "热闹", "干净", "古老", "现代", "舒适", "繁忙", "温暖", "凉爽", "宽敞", "漂亮", "有趣", "重要"]
ZH_WEATHER = ["晴朗", "多云", "小雨", "大雨", "阴天", "有雾", "下雪", "刮风", "闷热", "寒冷"]
ZH_TOPICS = ["人工智能", "新能源汽车", "环境保护", "乡村振兴", "在线教育", "健康生活", "城市交通", "传统文化", "航天科技", "数字经济",
             "老龄化社会", "垃圾分类", "体育锻炼", "科学研究", "文化旅游"]
ZH_TIMES = ["早上", "中午", "下午", "晚上", "周末", "昨天", "今天", "明天", "上个月", "去年", "春节期间", "国庆假期"]
ZH_FIN_PREFIX = ["华", "中", "国", "东方", "南方", "长江", "金", "宏", "恒", "泰", "信", "安", "盛", "兴", "鼎", "瑞", "海", "天", "新", "汇"]
ZH_FIN_MID = ["信", "达", "通", "科", "源", "丰", "融", "联", "创", "远", "和", "光", "成", "晟", "润"]
ZH_INDUSTRY = ["科技", "银行", "证券", "保险", "能源", "医药", "地产", "电子", "汽车", "食品", "化工", "物流", "传媒", "钢铁", "电力"]
ZH_METRICS = ["营业收入", "净利润", "归母净利润", "毛利率", "经营性现金流", "总资产", "每股收益", "净资产收益率", "研发投入", "资产负债率"]
ZH_MACRO = ["央行", "国家统计局", "财政部", "证监会", "银保监会", "外汇管理局"]
ZH_MACRO_EVT = ["下调存款准备金率", "调整贷款市场报价利率", "发布居民消费价格指数", "公布工业增加值数据", "发布社会融资规模数据",
                "开展中期借贷便利操作", "公布外汇储备规模", "发布制造业采购经理指数"]
ZH_MARKET = ["上证指数", "深证成指", "创业板指", "沪深300", "恒生指数", "科创50"]
ZH_SECTORS = ["半导体", "白酒", "光伏", "银行", "券商", "医药", "军工", "煤炭", "有色金属", "房地产", "消费电子", "新能源"]
ZH_RATING = ["买入", "增持", "中性", "减持"]
ZH_RISK = ["原材料价格波动", "汇率变动", "行业竞争加剧", "政策变化", "需求不及预期", "应收账款回收", "利率上行", "海外市场不确定性"]

EN_FIRST = ["James", "Mary", "John", "Linda", "Robert", "Susan", "Michael", "Karen", "David", "Emma", "Daniel", "Olivia", "Peter",
            "Sophia", "Thomas", "Grace", "Henry", "Alice", "George", "Nina", "Samuel", "Laura", "Oscar", "Ruth"]
EN_LAST = ["Smith", "Johnson", "Brown", "Taylor", "Miller", "Wilson", "Moore", "Clark", "Lewis", "Walker", "Young", "King",
           "Wright", "Hill", "Green", "Baker", "Adams", "Nelson", "Carter", "Turner", "Parker", "Evans", "Collins", "Ward"]
EN_CITIES = ["London", "New York", "Chicago", "Boston", "Sydney", "Toronto", "Singapore", "Dublin", "Seattle", "Denver",
             "Austin", "Melbourne", "Vancouver", "Edinburgh", "Cape Town", "Auckland"]
EN_PLACES = ["park", "library", "museum", "station", "school", "market", "cafe", "stadium", "beach", "harbour", "gallery", "bakery"]
EN_ACTIVITIES = ["walking", "reading", "running", "swimming", "hiking", "cooking", "painting", "singing", "cycling", "gardening",
                 "writing letters", "watching films", "playing chess", "fishing"]
EN_ADJ = ["quiet", "busy", "beautiful", "old", "modern", "clean", "crowded", "peaceful", "bright", "charming", "large", "small"]
EN_WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "warm", "cold", "humid", "mild"]
EN_TOPICS = ["climate change", "public transport", "online learning", "healthy eating", "space exploration", "urban gardens",
             "renewable energy", "local history", "artificial intelligence", "remote work", "ocean pollution", "sleep science"]
EN_TIMES = ["in the morning", "at noon", "in the afternoon", "in the evening", "on weekends", "last week", "yesterday",
            "every Sunday", "during the holidays", "last summer"]
EN_FIN_A = ["North", "Blue", "Silver", "Pacific", "Summit", "Granite", "Harbor", "Atlas", "Crescent", "Pioneer", "Sterling",
            "Redwood", "Orion", "Beacon", "Meridian", "Falcon"]
EN_FIN_B = ["Capital", "Holdings", "Energy", "Systems", "Bancorp", "Pharma", "Logistics", "Motors", "Foods", "Networks",
            "Materials", "Insurance", "Semiconductor", "Retail"]
EN_METRICS = ["revenue", "net income", "operating margin", "gross margin", "free cash flow", "earnings per share",
              "return on equity", "total assets", "capital expenditure", "net interest margin"]
EN_MACRO = ["the Federal Reserve", "the European Central Bank", "the Bank of England", "the Treasury", "the Labor Department",
            "the Commerce Department"]
EN_MACRO_EVT = ["raised its benchmark rate", "held interest rates steady", "cut its policy rate", "reported consumer prices",
                "published payroll figures", "released retail sales data", "announced bond purchases", "reported GDP growth"]
EN_MARKET = ["the S&P 500", "the Nasdaq Composite", "the Dow Jones", "the FTSE 100", "the Nikkei 225", "the DAX"]
EN_SECTORS = ["technology", "banks", "energy", "healthcare", "utilities", "real estate", "consumer staples", "industrials",
              "materials", "telecoms"]
EN_RATING = ["buy", "overweight", "hold", "underweight", "sell"]
EN_RISK = ["input cost inflation", "currency swings", "rising competition", "regulatory changes", "weaker demand",
           "credit losses", "higher funding costs", "supply chain delays"]


def _pct(r: random.Random) -> str:
    return f"{r.uniform(0.1, 45):.1f}%"


def _zh_person(r):
    return r.choice(ZH_SURNAMES) + "".join(r.choice(ZH_GIVEN) for _ in range(r.randint(1, 2)))


def _en_person(r):
    return f"{r.choice(EN_FIRST)} {r.choice(EN_LAST)}"


def _zh_company(r):
    return r.choice(ZH_FIN_PREFIX) + r.choice(ZH_FIN_MID) + r.choice(ZH_INDUSTRY) + r.choice(["股份有限公司", "集团", "有限公司"])


def _en_company(r):
    return f"{r.choice(EN_FIN_A)} {r.choice(EN_FIN_B)}" + r.choice([" Inc.", " Group", " plc", " Corp.", ""])


def zh_general_doc(r: random.Random) -> str:
    who, city, topic = _zh_person(r), r.choice(ZH_CITIES), r.choice(ZH_TOPICS)
    templates = [
        lambda: f"{r.choice(ZH_TIMES)}，{who}和朋友去{city}的{r.choice(ZH_PLACES)}{r.choice(ZH_ACTIVITIES)}。",
        lambda: f"{city}{r.choice(ZH_TIMES)}的天气{r.choice(ZH_WEATHER)}，气温大约{r.randint(-10, 38)}度。",
        lambda: f"{who}觉得{city}是一个{r.choice(ZH_ADJ)}的城市，那里的{r.choice(ZH_FOODS)}非常好吃。",
        lambda: f"关于{topic}，{who}认为最{r.choice(ZH_ADJ)}的是让更多人参与进来。",
        lambda: f"最近{topic}成为{city}市民讨论的热点，约有{r.randint(2, 95)}%的受访者表示关注。",
        lambda: f"{who}每天{r.choice(ZH_TIMES)}花{r.randint(10, 120)}分钟{r.choice(ZH_ACTIVITIES)}，坚持了{r.randint(2, 30)}年。",
        lambda: f"{city}新开了一家{r.choice(ZH_ADJ)}的{r.choice(ZH_PLACES)}，吸引了很多游客。",
        lambda: f"专家指出，{topic}的发展需要政府、企业和社会共同努力。",
        lambda: f"{who}说：“我最喜欢吃{r.choice(ZH_FOODS)}，尤其是在{r.choice(ZH_WEATHER)}的日子里。”",
        lambda: f"据统计，{r.randint(2010, 2024)}年{city}共接待游客{r.randint(1, 300)}万人次。",
    ]
    return "".join(r.choice(templates)() for _ in range(r.randint(3, 10)))


def en_general_doc(r: random.Random) -> str:
    who, city, topic = _en_person(r), r.choice(EN_CITIES), r.choice(EN_TOPICS)
    templates = [
        lambda: f"{who} went {r.choice(EN_ACTIVITIES)} near the {r.choice(EN_PLACES)} in {city} {r.choice(EN_TIMES)}.",
        lambda: f"The weather in {city} was {r.choice(EN_WEATHER)} {r.choice(EN_TIMES)}, with temperatures near {r.randint(-10, 38)} degrees.",
        lambda: f"{who.split()[0]} thinks {city} is a {r.choice(EN_ADJ)} city with a {r.choice(EN_ADJ)} {r.choice(EN_PLACES)}.",
        lambda: f"A new survey on {topic} found that {r.randint(2, 95)} percent of people in {city} want more action.",
        lambda: f"Experts say {topic} will shape daily life over the next {r.randint(2, 30)} years.",
        lambda: f"Every day {who.split()[0]} spends {r.randint(10, 120)} minutes {r.choice(EN_ACTIVITIES)}.",
        lambda: f"\"I love the {r.choice(EN_ADJ)} {r.choice(EN_PLACES)} here,\" said {who}.",
        lambda: f"In {r.randint(1990, 2024)}, {city} welcomed about {r.randint(1, 90)} million visitors.",
        lambda: f"Local groups in {city} are holding talks on {topic} {r.choice(EN_TIMES)}.",
    ]
    return " ".join(r.choice(templates)() for _ in range(r.randint(3, 10)))


def zh_finance_doc(r: random.Random) -> str:
    co, analyst, year = _zh_company(r), _zh_person(r), r.randint(2015, 2024)
    q = r.choice(["一季度", "上半年", "前三季度", "全年"])
    templates = [
        lambda: f"{co}发布{year}年{q}报告，{r.choice(ZH_METRICS)}为{r.uniform(0.5, 900):.2f}亿元，同比{r.choice(['增长', '下降'])}{_pct(r)}。",
        lambda: f"报告期内，{co}{r.choice(ZH_METRICS)}{r.choice(['同比增长', '同比下降', '环比增长', '环比下降'])}{_pct(r)}。",
        lambda: f"{r.choice(ZH_MACRO)}{r.choice(ZH_MACRO_EVT)}，市场人士认为此举有利于稳定{r.choice(ZH_SECTORS)}板块预期。",
        lambda: f"截至收盘，{r.choice(ZH_MARKET)}{r.choice(['上涨', '下跌'])}{r.uniform(0.01, 4):.2f}%，{r.choice(ZH_SECTORS)}板块表现{r.choice(['活跃', '低迷', '分化'])}。",
        lambda: f"分析师{analyst}给予{co}“{r.choice(ZH_RATING)}”评级，目标价{r.uniform(3, 300):.2f}元。",
        lambda: f"{co}提示，公司面临{r.choice(ZH_RISK)}等风险，投资者需注意。",
        lambda: f"{co}计划投资{r.randint(1, 200)}亿元用于{r.choice(ZH_SECTORS)}相关业务，预计{year + r.randint(1, 3)}年投产。",
        lambda: f"{year}年{co}的{r.choice(ZH_METRICS)}达到{r.uniform(1, 60):.1f}%，高于行业平均水平。",
        lambda: f"十年期国债收益率{r.choice(['升至', '降至'])}{r.uniform(1.5, 4.5):.2f}%，债券市场{r.choice(['情绪回暖', '波动加大', '保持平稳'])}。",
    ]
    return "".join(r.choice(templates)() for _ in range(r.randint(3, 10)))


def en_finance_doc(r: random.Random) -> str:
    co, analyst, year = _en_company(r), _en_person(r), r.randint(2015, 2024)
    q = r.choice(["first-quarter", "second-quarter", "third-quarter", "fourth-quarter", "full-year"])
    templates = [
        lambda: f"{co} reported {q} {r.choice(EN_METRICS)} of ${r.uniform(0.5, 900):.2f} billion for {year}, {r.choice(['up', 'down'])} {_pct(r)} from a year earlier.",
        lambda: f"{co}'s {r.choice(EN_METRICS)} {r.choice(['rose', 'fell', 'was flat at', 'improved to'])} {_pct(r)} in the period.",
        lambda: f"{r.choice(EN_MACRO).capitalize()} {r.choice(EN_MACRO_EVT)}, and investors rotated into {r.choice(EN_SECTORS)} stocks.",
        lambda: f"{r.choice(EN_MARKET).capitalize()} {r.choice(['gained', 'lost'])} {r.uniform(0.01, 4):.2f}% by the close, led by {r.choice(EN_SECTORS)}.",
        lambda: f"Analyst {analyst} rates {co} {r.choice(EN_RATING)} with a price target of ${r.uniform(3, 600):.2f}.",
        lambda: f"{co} warned that {r.choice(EN_RISK)} could weigh on results.",
        lambda: f"{co} plans to spend ${r.randint(1, 90)} billion on {r.choice(EN_SECTORS)} projects through {year + r.randint(1, 4)}.",
        lambda: f"The 10-year Treasury yield {r.choice(['rose to', 'fell to', 'held at'])} {r.uniform(0.5, 5.5):.2f}% as traders weighed the data.",
        lambda: f"Shares of {co} {r.choice(['jumped', 'slipped', 'edged up', 'tumbled'])} {r.uniform(0.1, 15):.1f}% after the announcement.",
    ]
    return " ".join(r.choice(templates)() for _ in range(r.randint(3, 10)))


GENERATORS = {"zh-general": zh_general_doc, "en-general": en_general_doc,
              "zh-finance": zh_finance_doc, "en-finance": en_finance_doc}


def generate_domain(domain: str, num_docs: int, seed: int) -> list[str]:
    r = random.Random(f"{domain}:{seed}")
    return [GENERATORS[domain](r) for _ in range(num_docs)]


def _write_jsonl(path: Path, docs: list[str], domain: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d, "domain": domain}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _done(prefix: Path) -> bool:
    return Path(str(prefix) + ".bin").is_file() and Path(str(prefix) + ".idx").is_file()


def build_demo(output: str, *, docs_per_domain: int = 4000, valid_docs: int = 300, seed: int = 1234,
               vocab_size: int = 8000, workers: int = 2, extension: bool = True, sft: bool = True,
               evals: bool = True, prefs: bool = True, log=print) -> dict:
    """Create the demo data under `output` (idempotent); returns the paths."""
    from .preprocess import preprocess
    from .tokenizer import extend_tokenizer, is_cjk, train_tokenizer

    out = Path(output)
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        train_p, valid_p = corpus / f"{domain}.jsonl", corpus / f"{domain}_valid.jsonl"
        if not (train_p.is_file() and valid_p.is_file()):
            docs = generate_domain(domain, docs_per_domain + valid_docs, seed)
            _write_jsonl(train_p, docs[:docs_per_domain], domain)
            _write_jsonl(valid_p, docs[docs_per_domain:], domain)
            log(f"wrote {train_p} ({docs_per_domain} docs) and {valid_p} ({valid_docs} docs)")

    def texts(domains, suffix=""):
        for domain in domains:
            with open(corpus / f"{domain}{suffix}.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)["text"]

    all_txt = corpus / "all.txt"
    if not all_txt.is_file():
        lines = list(texts(DOMAINS))
        if sft:  # a tokenizer is trained on all the text it will cut, instructions included (data/demo_sft.py)
            from .demo_sft import tokenizer_sample

            lines += tokenizer_sample(seed)
        tmp = all_txt.with_name("all.txt.tmp")
        tmp.write_text("".join(t + "\n" for t in lines), encoding="utf-8")
        tmp.replace(all_txt)
    tok = out / "tokenizer.model"
    if not tok.is_file():
        log(f"training {tok} (vocab {vocab_size})")
        train_tokenizer(all_txt, vocab_size, tok)
    chars = out / "zh_chars.txt"
    if not chars.is_file():
        counts = Counter(c for t in texts(["zh-general", "zh-finance"]) for c in t if is_cjk(c))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        chars.write_text("".join(f"{c}\n" for c, _ in ranked), encoding="utf-8")
        log(f"wrote {chars} ({len(ranked)} Chinese characters)")

    jobs = [(tok, out, "")]
    paths = {"tokenizer": str(tok), "chars": str(chars)}
    if extension:
        en_txt = corpus / "en.txt"
        if not en_txt.is_file():
            en_txt.write_text("".join(t + "\n" for t in texts(["en-general", "en-finance"])), encoding="utf-8")
        tok_en, tok_ext = out / "tokenizer_en.model", out / "tokenizer_ext.model"
        if not tok_en.is_file():
            log(f"training {tok_en} (English only, vocab 3000)")
            train_tokenizer(en_txt, 3000, tok_en, character_coverage=1.0)
        if not tok_ext.is_file():
            from .tokenizer import read_chars_file

            info = extend_tokenizer(tok_en, read_chars_file(chars), tok_ext)
            log(f"wrote {tok_ext}: {info['base_vocab']} -> {info['new_vocab']} pieces")
        (out / "ext").mkdir(exist_ok=True)
        jobs.append((tok_ext, out / "ext", ""))
        paths.update(tokenizer_en=str(tok_en), tokenizer_ext=str(tok_ext))
    for tok_path, where, _ in jobs:
        for domain in DOMAINS:
            for suffix, name in (("", f"{domain}_text_document"), ("_valid", f"{domain}_valid_text_document")):
                prefix = where / name
                if not _done(prefix):
                    preprocess(str(corpus / f"{domain}{suffix}.jsonl"), str(tok_path), str(prefix),
                               workers=workers, append_eod=True, progress=False)
                    log(f"wrote {prefix}.bin/.idx")
    paths["train"] = {d: str(out / f"{d}_text_document") for d in DOMAINS}
    paths["valid"] = {d: str(out / f"{d}_valid_text_document") for d in DOMAINS}
    if sft:  # the instruction sets of the SFT recipe (data/demo_sft.py)
        from .demo_sft import build_sft_demo

        paths["sft"] = build_sft_demo(out, tok, seed, workers=workers, log=log)
    if evals:  # exam / classification / QA sets of `jinpan eval` (eval/demo.py)
        from ..eval.demo import build_eval_demo

        paths["eval"] = build_eval_demo(out / "eval", seed, log=log)
    if prefs:  # the preference pairs of the reward model / DPO recipes (data/demo_prefs.py)
        from .demo_prefs import build_prefs_demo

        paths["prefs"] = build_prefs_demo(out, tok, seed, workers=workers, log=log)
    return paths
