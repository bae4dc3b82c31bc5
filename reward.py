"""Answer extraction, the format check, the reference F1/EM, SQuAD-style EM/F1 and the training reward.

What it does
- `normalize`, `f1`, `em`: the DeepResearcher metric exactly. Lowercase; every character of Python's
  `string.punctuation` (ASCII only) becomes a space; whitespace is collapsed and stripped; articles are KEPT; F1 is
  over the SETS of words (a repeated word counts once); 0 when either side normalises to nothing. Gold answers come
  as one string joined by `<|answer_split|>` (or as a list); the score is the best over them.
- `squad_em`, `squad_f1`: the SQuAD convention most other papers report (punctuation deleted, articles removed,
  bag-of-words F1), beside the reference metric so results can be compared across papers.
- `extract_answer`: the first `<answer>...</answer>` (case-insensitive, like the reference, which lowercases the text).
- `format_ok(responses)`: the reference rule on the policy's OWN turns: for each of `think`, `tool_call`, `answer`
  (and `search`, `browse`, our "tags" protocol's tool tags) the opening and closing counts agree and every opening
  tag is followed by a closing one; and an `<answer>...</answer>` is present. Each turn is checked on its own, which
  implies the reference's check on the concatenation (and is slightly stricter: a tag may not open in one turn and
  close in a later one, which our engine cannot produce since a turn ends at a closing tag). Under protocol "dr"
  every turn must also close a `<think>`: the reference appends `<think>` to every turn's prompt, so a turn without
  `</think>` is unbalanced (-1); our loop forces it into the turn's text (`turn_prefix_every`), or not: same rule.
- `reward(responses, gold, protocol=None)`: -1 on a format error, otherwise the best word-set F1; returns a `Reward`
  record with the pieces (format_ok, f1, em, answer, reason) so training and eval log them.
- The LLM judge (MBE) is not here: it is eval.py's, its only user.

What it deliberately does not do
- Observations (search results, page extracts) are NEVER format-checked. The reference checked the whole rendered
  trajectory, so a web page that happened to contain "<answer>" or "</think>" turned a good rollout into -1; we pass
  only the policy's own turn texts here.
- No torch, no HTTP, no I/O: pure functions of strings.

How to run
- Library only: `from reward import reward, f1`.
- Tests (CPU, offline): `python -m pytest tests/test_reward.py -x -q`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

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


def _tags_balanced(text: str) -> str | None:
    """The reference's check_tags_balance on one text: the name of the first bad tag, or None. For each tag: as
    many openings as closings, and walking left to right, each opening has a closing after it (the walk resumes after
    that closing, so nesting of a tag inside itself is not rejected, as in the reference)."""
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
    """Reference format rule on the policy's own turn texts (never observations): (ok, reason), reason "ok",
    "unbalanced <tag> in turn i", "no </think> in turn i" (protocol "dr": see the module docstring) or "no answer"."""
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
