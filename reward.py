"""Answer extraction, the format check, the reference F1/EM, SQuAD-style EM/F1 and the training reward: pure
functions of strings (no torch, no I/O). Library only; tests: `python -m pytest tests/test_reward.py`.

- `normalize`, `f1`, `em`: the DeepResearcher metric exactly: lowercase, ASCII punctuation -> space, whitespace
  collapsed, articles KEPT; F1 over the SETS of words; the best over the gold answers (a list, or one string joined
  by `<|answer_split|>`). `squad_f1`, `squad_em`: the SQuAD convention (punctuation deleted, articles removed, bags
  of words), beside it so results compare across papers.
- `format_ok(turns)`: the reference's tag-balance rule on each of the policy's OWN turns (slightly stricter than on
  their concatenation: a tag may not span turns, which our engine cannot produce), and an `<answer>` somewhere.
  Protocol "dr": every turn must also close a `<think>` (the reference prompts each turn with `<think>`).
- `reward(turns, gold)`: -1 on a format error, else the best word-set F1, as a `Reward` record.
- `behaviour(...)`: what an agent did, countable per question kind (searched twice, the bridge entity in a later
  query, an answer that is a shown result's title); train.py's metrics and eval.py's summary both count with it.
Departure: observations are NEVER format-checked. The reference checked the whole rendered trajectory, so a web page
that contained "<answer>" or "</think>" turned a good rollout into -1. The LLM judge (MBE) is eval.py's.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

ANSWER_SPLIT = "<|answer_split|>"
# Tags whose balance the reference checked; our "tags" protocol's tool tags (<search>, <browse>) are checked only
# under that protocol (under "dr", as in the reference, they are text like any other).
CHECKED_TAGS = ("think", "tool_call", "answer")
TAGS_PROTOCOL_TAGS = ("search", "browse")

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_WS_RE = re.compile(r"\s+")


# ----------------------------------------------------------------------------------------------- reference metric

def normalize(text: str) -> str:
    """Reference normalisation: lowercase, ASCII punctuation -> space, collapse whitespace. Articles are kept."""
    return _WS_RE.sub(" ", text.lower().translate(_PUNCT_TABLE)).strip()


def split_golds(gold: str | list[str] | tuple[str, ...]) -> list[str]:
    """Gold answers as a list: split a `<|answer_split|>`-joined string; a list's items are split too."""
    items = [gold] if isinstance(gold, str) else list(gold)
    return [g for item in items for g in str(item).split(ANSWER_SPLIT)]


def _f1_one(pred: str, gold: str) -> float:
    p, g = set(normalize(pred).split()), set(normalize(gold).split())
    if not p or not g:  # the reference skips an empty side (score 0), it never divides by zero
        return 0.0
    return _overlap_f1(len(p & g), len(p), len(g))


def _overlap_f1(common: int, n_pred: int, n_gold: int) -> float:
    """F1 from the number of shared words and the two sizes (both metrics, sets or bags)."""
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_gold
    return 2 * precision * recall / (precision + recall)


def f1(pred: str, gold: str | list[str]) -> float:
    """Reference word-SET F1 of `pred`, best over the gold answers."""
    return max((_f1_one(pred, g) for g in split_golds(gold)), default=0.0)


def em(pred: str, gold: str | list[str]) -> float:
    """Reference exact match: normalised strings equal (articles kept), best over the gold answers. An empty
    prediction never matches (even an empty gold), as in the reference where an empty answer scores 0."""
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
    return _overlap_f1(sum((Counter(p) & Counter(g)).values()), len(p), len(g))  # bag of words: repeats count


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


def _tags_balanced(text: str, protocol: str | None = None) -> str | None:
    """The reference's check_tags_balance on one text: the name of the first bad tag, or None. For each tag: as
    many openings as closings, and walking left to right, each opening has a closing after it (the walk resumes after
    that closing, so nesting of a tag inside itself is not rejected, as in the reference)."""
    low = text.lower()  # the reference lowercases the whole response first, so <Answer> counts as <answer>
    tags = CHECKED_TAGS if protocol == "dr" else CHECKED_TAGS + TAGS_PROTOCOL_TAGS
    for tag in tags:
        start, end = f"<{tag}>", f"</{tag}>"
        if low.count(start) != low.count(end):
            return tag
        pos = low.find(start)
        while pos != -1:
            e = low.find(end, pos)
            if e == -1:
                return tag
            pos = low.find(start, e + 1)
    return None


def format_ok(responses: list[str] | str, protocol: str | None = None) -> tuple[bool, str]:
    """Reference format rule on the policy's own turn texts (never observations): (ok, reason), reason "ok",
    "unbalanced <tag> in turn i", "no </think> in turn i" (protocol "dr": see the module docstring) or "no answer"."""
    turns = [responses] if isinstance(responses, str) else list(responses)
    for i, text in enumerate(turns):
        if (bad := _tags_balanced(text, protocol)) is not None:
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


# ----------------------------------------------------------------------------------------------- behaviour

def behaviour(n_searches: int, queries: list[str], shown_titles: list[str], bridge: str | None,
              answer: str | None) -> dict:
    """What an agent did on one question: did it search twice (calls that ran), did a query after the first name
    the bridge entity (bridge questions only; None elsewhere), and is its answer the title of a search result it was
    shown (the first-title shortcut; False without an answer). Names compare after `normalize`."""
    later_names_bridge = None
    if bridge:
        bridge_name = normalize(bridge)
        later_names_bridge = any(bridge_name in normalize(query) for query in queries[1:])
    titles = {normalize(title) for title in shown_titles}
    answer_is_title = bool(answer) and normalize(answer) in titles
    return {"n_queries": len(queries), "searched_twice": n_searches >= 2, "bridge_in_later_query": later_names_bridge,
            "answer_is_title": answer_is_title}
