"""Answer extraction, the format check, the reference F1/EM, SQuAD-style EM/F1, the training reward and an LLM judge.

What it does
- `normalize`, `f1`, `em`: the DeepResearcher metric exactly. Lowercase; every character of Python's
  `string.punctuation` (ASCII only) becomes a space; whitespace is collapsed and stripped; articles are KEPT; F1 is
  over the SETS of words (a repeated word counts once); 0 when either side normalises to nothing. Gold answers come
  as one string joined by `<|answer_split|>` (or as a list); the score is the best over them.
- `squad_em`, `squad_f1`: the SQuAD convention most other papers report (punctuation deleted, articles removed,
  bag-of-words F1), beside the reference metric so results can be compared across papers.
- `extract_answer`: the first `<answer>...</answer>` (case-insensitive, like the reference, which lowercases the text).
- `format_ok(responses)`: the reference rule on the policy's OWN turns: for each of `think`, `tool_call`, `answer`
  (and `search`, `browse`, the tool tags of our "tags" protocol) the opening and closing counts agree and every
  opening tag is followed by a closing one; and an `<answer>...</answer>` is present. Each turn is checked on its
  own, which implies the reference's check on the concatenation (and is slightly stricter: a tag may not be opened
  in one turn and closed in a later one, which our engine cannot produce anyway since a turn ends at a closing tag).
  Under protocol "dr" (the reference's), every turn must also close a `<think>` block: the reference appends
  `<think>` to the prompt of every turn, so a turn that never writes `</think>` leaves it unbalanced (-1). Our loop
  forces that `<think>` into the turn's text (`turn_prefix_every`); the rule holds even when it is not forced.
- `reward(responses, gold, protocol=None)`: -1 on a format error, otherwise the best word-set F1; returns a `Reward`
  record with the pieces (format_ok, f1, em, answer, reason) so training and eval log them.
- `Judge`: the model-based score (MBE). Any OpenAI-compatible `/chat/completions` endpoint; an exact match counts as
  correct without a call; temperature 0; verdicts cached on disk (JSONL); bounded retries with an HTTP timeout; a
  reply that cannot be parsed is "unjudged" and reported, never retried forever. The API key is read from an
  environment variable and never logged or cached.

What it deliberately does not do
- Observations (search results, page extracts) are NEVER format-checked. The reference checked the whole rendered
  trajectory, so a web page that happened to contain "<answer>" or "</think>" turned a good rollout into -1; we pass
  only the policy's own turn texts here.
- No torch and no I/O, except the optional judge (HTTP via `requests`, imported lazily, and its cache file).

How to run
- Library only: `from reward import reward, f1, Judge`.
- Tests (CPU, offline): `python -m pytest tests/test_reward.py tests/test_judge.py -x -q`.
- The judge against any OpenAI-compatible server: `Judge(JudgeConfig(base_url="http://host:8000/v1",
  model="gpt-4o-mini", api_key_env="OPENAI_API_KEY", cache_path="runs/judge.jsonl"))`; eval.py wires it up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

ANSWER_SPLIT = "<|answer_split|>"
# Tags whose balance the reference checked, plus our "tags" protocol's tool tags (<search>, <browse>).
CHECKED_TAGS = ("think", "tool_call", "answer", "search", "browse")

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_WS_RE = re.compile(r"\s+")


# ----------------------------------------------------------------------------------------------- reference metric

def normalize(text: str) -> str:
    """Reference normalisation: lowercase, ASCII punctuation -> space, collapse whitespace. Articles are kept."""
    text = text.lower().translate(_PUNCT_TABLE)
    return _WS_RE.sub(" ", text).strip()


def split_golds(gold: str | list[str] | tuple[str, ...]) -> list[str]:
    """Gold answers as a list: split a `<|answer_split|>`-joined string; a list's items are split too."""
    items = [gold] if isinstance(gold, str) else list(gold)
    return [g for item in items for g in str(item).split(ANSWER_SPLIT)]


def _f1_one(pred: str, gold: str) -> float:
    p, g = set(normalize(pred).split()), set(normalize(gold).split())
    if not p or not g:  # the reference skips an empty side (score 0), it never divides by zero
        return 0.0
    common = len(p & g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str, gold: str | list[str]) -> float:
    """Reference word-SET F1 of `pred`, best over the gold answers."""
    return max((_f1_one(pred, g) for g in split_golds(gold)), default=0.0)


def em(pred: str, gold: str | list[str]) -> float:
    """Reference exact match: normalised strings equal (articles kept), best over the gold answers.

    An empty prediction never matches (even an empty gold), as in the reference where an empty answer scores 0."""
    p = normalize(pred)
    return float(bool(p) and any(p == normalize(g) for g in split_golds(gold)))


# ----------------------------------------------------------------------------------------------- SQuAD metric

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT_SET = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, punctuation deleted (not spaced), articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT_SET)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def _squad_f1_one(pred: str, gold: str) -> float:
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    if not p or not g:  # SQuAD v2 convention: both empty is a match, one empty is not
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())  # bag of words: repeats count
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_f1(pred: str, gold: str | list[str]) -> float:
    """SQuAD bag-of-words F1 (articles removed), best over the gold answers."""
    return max((_squad_f1_one(pred, g) for g in split_golds(gold)), default=0.0)


def squad_em(pred: str, gold: str | list[str]) -> float:
    """SQuAD exact match (articles removed), best over the gold answers."""
    p = squad_normalize(pred)
    return float(any(p == squad_normalize(g) for g in split_golds(gold)))


# ----------------------------------------------------------------------------------------------- format and reward

def extract_answer(text: str) -> str | None:
    """The stripped content of the first `<answer>...</answer>`, or None when there is none."""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


def _tags_balanced(text: str) -> str | None:
    """The reference's check_tags_balance on one text; returns the name of the first bad tag, or None if fine.

    For each tag: as many openings as closings, and walking left to right, each opening has a closing after it
    (the walk resumes after that closing, so nesting of a tag inside itself is not rejected, as in the reference)."""
    low = text.lower()  # the reference lowercases the whole response first, so <Answer> counts as <answer>
    for tag in CHECKED_TAGS:
        start, end = f"<{tag}>", f"</{tag}>"
        if low.count(start) != low.count(end):
            return tag
        pos = -1
        while True:
            s = low.find(start, pos + 1)
            if s == -1:
                break
            e = low.find(end, s)
            if e == -1:
                return tag
            pos = e
    return None


def format_ok(responses: list[str] | str, protocol: str | None = None) -> tuple[bool, str]:
    """Reference format rule on the policy's own turn texts (never observations): (ok, reason).

    protocol "dr": every turn must also close a <think> block (see the module docstring).
    reason is "ok", "unbalanced <tag> in turn i", "no </think> in turn i" or "no answer"."""
    turns = [responses] if isinstance(responses, str) else list(responses)
    for i, text in enumerate(turns):
        bad = _tags_balanced(text)
        if bad is not None:
            return False, f"unbalanced <{bad}> in turn {i}"
        if protocol == "dr" and "</think>" not in text.lower():
            return False, f"no </think> in turn {i}"
    if not any(extract_answer(t) is not None for t in turns):
        return False, "no answer"
    return True, "ok"


@dataclass
class Reward:
    score: float          # the training reward: -1.0 on a format error, else f1
    format_ok: bool
    f1: float             # reference word-set F1 (0 on a format error, as in the reference's evaluation)
    em: float             # reference exact match (0 on a format error)
    answer: str | None    # the first <answer> of the policy's turns, stripped, original case
    reason: str           # "ok" or why the format check failed


def reward(responses: list[str] | str, gold: str | list[str], protocol: str | None = None) -> Reward:
    """The training reward of one trajectory from the policy's own turn texts (observations excluded)."""
    turns = [responses] if isinstance(responses, str) else list(responses)
    answer = next((a for a in map(extract_answer, turns) if a is not None), None)
    ok, reason = format_ok(turns, protocol)
    if not ok:
        return Reward(score=-1.0, format_ok=False, f1=0.0, em=0.0, answer=answer, reason=reason)
    score = f1(answer, gold)
    return Reward(score=score, format_ok=True, f1=score, em=em(answer, gold), answer=answer, reason=reason)


# ----------------------------------------------------------------------------------------------- LLM judge (MBE)

JUDGE_PROMPT = """You are grading an answer to a question. You get the question, a list of reference answers \
(each one of them is a fully correct answer) and a predicted answer.

Decide whether the predicted answer correctly answers the question. It does not have to be worded like any \
reference answer, but it must mean the same thing as at least one of them in the context of the question. \
An answer that is vaguer, only partly right, or hedges between several options is incorrect.

question: {question}
reference answers: {golds}
predicted answer: {prediction}

Explain your reasoning briefly first, then give your verdict. Reply with a single JSON object and nothing else:
{{"rationale": "<your reasoning, as text>", "judgement": "<correct or incorrect>"}}"""

_JSON_OBJ_RE = re.compile(r"\{.*\}", re.DOTALL)
_JUDGEMENT_RE = re.compile(r'"judge?ment"\s*:\s*"\s*(correct|incorrect)\s*"', re.IGNORECASE)


@dataclass
class JudgeConfig:
    base_url: str = ""                  # OpenAI-compatible root, e.g. https://api.openai.com/v1 ("" = no judge)
    model: str = "gpt-4o-mini"          # the reference judged with gpt-4o-mini (at temperature 0.7; we use 0)
    api_key_env: str = "OPENAI_API_KEY" # name of the environment variable holding the key (may be unset locally)
    cache_path: str | None = None       # JSONL of verdicts; None = in memory only
    timeout_s: float = 60.0             # per HTTP request
    max_retries: int = 3                # transport errors (timeout, connection, 429, 5xx): attempts = 1 + this
    backoff_s: float = 1.0              # sleep backoff_s * 2**attempt between attempts
    max_tokens: int = 512
    n_threads: int = 8                  # judge_many's concurrency


@dataclass
class Verdict:
    verdict: str          # "correct" | "incorrect" | "unjudged"
    rationale: str
    source: str           # "exact_match" | "no_answer" | "judge" | "cache" | "error"
    error: str | None = None

    @property
    def correct(self) -> float | None:
        """1.0 / 0.0, or None when unjudged (reported apart, not silently counted as wrong)."""
        return {"correct": 1.0, "incorrect": 0.0}.get(self.verdict)


def parse_judgement(text: str) -> tuple[str, str] | None:
    """(judgement, rationale) from a judge reply, or None when it cannot be read."""
    m = _JSON_OBJ_RE.search(text or "")
    if m:
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            j = str(obj.get("judgement", obj.get("judgment", ""))).strip().lower()
            if j in ("correct", "incorrect"):
                return j, str(obj.get("rationale", ""))
    m = _JUDGEMENT_RE.search(text or "")  # almost-JSON (e.g. an unescaped quote in the rationale)
    return (m.group(1).lower(), "") if m else None


class Judge:
    """Thread-safe LLM judge with an on-disk verdict cache. `judge(question, golds, prediction) -> Verdict`."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.base_url:
            raise ValueError("JudgeConfig.base_url is empty: give the OpenAI-compatible endpoint, e.g. "
                             "--judge_base_url=https://api.openai.com/v1")
        self.cfg = cfg
        self._lock = threading.Lock()
        self._cache: dict[str, dict] = {}
        self.stats = Counter()
        if cfg.cache_path and os.path.exists(cfg.cache_path):
            with open(cfg.cache_path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a torn last line after a crash: skip it
                        continue
                    self._cache[rec["key"]] = rec

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.cfg.model}\n{prompt}".encode()).hexdigest()

    def _call(self, prompt: str) -> str:
        """One chat completion; raises on transport or HTTP errors (the caller retries those)."""
        import requests  # lazy: reward.py stays importable without it

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.cfg.model, "temperature": 0.0, "max_tokens": self.cfg.max_tokens,
                "messages": [{"role": "user", "content": prompt}]}
        r = requests.post(self.cfg.base_url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                          timeout=self.cfg.timeout_s)
        if r.status_code != 200:
            # the body may echo the request but never the key; keep it short
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return r.json()["choices"][0]["message"]["content"] or ""

    def judge(self, question: str, golds: str | list[str], prediction: str | None) -> Verdict:
        gold_list = split_golds(golds)
        if prediction is None or not normalize(prediction):
            self.stats["no_answer"] += 1
            return Verdict("incorrect", "no answer", "no_answer")
        if em(prediction, gold_list):  # the reference counts an exact match as correct without asking
            self.stats["exact_match"] += 1
            return Verdict("correct", "exact match", "exact_match")
        prompt = JUDGE_PROMPT.format(question=question, golds=json.dumps(gold_list, ensure_ascii=False),
                                     prediction=prediction)
        key = self._key(prompt)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            self.stats["cache"] += 1
            return Verdict(hit["verdict"], hit["rationale"], "cache")
        error = None
        for attempt in range(self.cfg.max_retries + 1):
            try:
                text = self._call(prompt)
            except (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
                # requests' exceptions are OSErrors (timeouts, refused connections); bad JSON bodies ValueErrors
                error = f"{type(e).__name__}: {str(e)[:200]}"
                self.stats["http_error"] += 1
                if attempt < self.cfg.max_retries:
                    time.sleep(self.cfg.backoff_s * 2 ** attempt)
                continue
            parsed = parse_judgement(text)
            if parsed is None:
                # temperature 0: asking again would return the same text; report it instead of looping
                self.stats["unparseable"] += 1
                return Verdict("unjudged", text[:500], "error", "unparseable judge reply")
            verdict, rationale = parsed
            rec = {"key": key, "verdict": verdict, "rationale": rationale, "model": self.cfg.model,
                   "question": question, "prediction": prediction}
            with self._lock:
                self._cache[key] = rec
                if self.cfg.cache_path:
                    os.makedirs(os.path.dirname(os.path.abspath(self.cfg.cache_path)), exist_ok=True)
                    with open(self.cfg.cache_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.stats["judged"] += 1
            return Verdict(verdict, rationale, "judge")
        self.stats["unjudged"] += 1
        return Verdict("unjudged", "", "error", error)

    def judge_many(self, items: list[tuple[str, str | list[str], str | None]]) -> list[Verdict]:
        """Judge (question, golds, prediction) triples concurrently; results in input order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.n_threads)) as pool:
            return list(pool.map(lambda it: self.judge(*it), items))


def verdict_dict(v: Verdict) -> dict:
    return asdict(v)
