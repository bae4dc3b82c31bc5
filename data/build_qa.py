"""Build the offline QA set from the embedded Wikipedia corpus: questions whose answers are found by searching it.

What it does: reads the corpus JSONL (data/wiki_corpus.py; each article has a title, a short Wikipedia description
and a summary), writes questions from templates, keeps only those that are verified answerable, and splits by
the article a question is about, so no dev question is about an article a training question is about.
Reproducible: same corpus + seed -> same files.

Templates (answers are short: a title, a country, a city):
- `who` (1 hop, people): description "German playwright and poet (1898–1956)" -> "Who was the German playwright and
  poet born in 1898?" -> the title (Bertolt Brecht).
- `what` (1 hop): description "Highest mountain on Earth" -> "What is the highest mountain on Earth?" -> the title.
- `country` (1 hop): first sentence "X is a city in A, B, Country." -> "In which country is X?" -> Country.
- `capital` (2 hops): X lies in country C (a `country` fact) and C's article says "its capital is Z" ->
  "What is the capital of the country where X is located?" -> Z.

Answerable means: for each hop, the gold answer (normalised as reward.normalize does) appears in an article that the
local BM25 search returns in its top k (default 5) for a reasonable query (the question itself; for the second hop,
"capital of C"), and the answer is not in the question. Records follow data/prepare.py's schema
(id, source, question, answers) plus `hops` and `support` (the article ids that hold the facts).

Run: python data/build_qa.py                    # -> data/qa_train.jsonl, data/qa_dev.jsonl
     python data/build_qa.py --n_train=3000 --n_dev=300 --seed=0 --corpus=FILE --out_dir=data
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python data/build_qa.py): make the repo root importable
    sys.path.insert(0, str(ROOT))
from data.config import parse_config  # noqa: E402
from reward import normalize  # noqa: E402

PERSON = re.compile(r"^(?P<what>[A-Z][^()]{8,80}?) \((?:born |b\. )?(?:c\. )?(?P<born>\d{3,4})(?:–\d{3,4})?\)$")
PLACE = re.compile(r"^(?:[A-Z]\w+ )?(?:[Cc]ity|[Tt]own|[Cc]apital|[Vv]illage|[Mm]unicipality|[Pp]ort|[Rr]iver|[Ll]ake|"
                   r"[Mm]ountain|[Vv]olcano|[Ii]sland|[Rr]egion|[Pp]rovince|[Dd]esert|[Pp]eninsula|[Uu]niversity|"
                   r"[Mm]useum|[Pp]alace|[Cc]athedral|[Tt]emple|[Pp]ark|[Bb]ridge|[Cc]astle|[Mm]osque|[Ss]tadium)\b")
CAPITAL = [re.compile(r"capital(?: city)?(?:,? (?:and )?(?:largest|main)[\w ,]*?)? (?:is|was) (?P<cap>[A-Z][\w'-]+"
                      r"(?: [A-Z][\w'-]+)?)"),
           re.compile(r"(?P<cap>[A-Z][\w'-]+(?: [A-Z][\w'-]+)?) is the (?:country's|nation's) capital")]


def short_title(t: str) -> str | None:
    """The article title as an answer: without a parenthetical, at most 4 words, no commas."""
    t = re.sub(r"\s*\(.*?\)\s*", " ", t).strip()
    return t if t and "," not in t and len(t.split()) <= 4 else None


def candidates(recs: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Template questions before the answerability check, and the country -> capital table."""
    by_title = {r["title"]: r for r in recs}
    descs = collections.Counter((r.get("description") or "").strip().lower() for r in recs)
    # an opening word keeps its capital when the corpus text capitalises it mid-sentence more often than not
    # ("German", "Roman"; not "Water" or "Inner", which also open names)
    mid = collections.Counter(w for r in recs for w in re.findall(r"(?<=[a-z,] )[\w-]+", r.get("text", "")))
    proper = {w for w in mid if w[:1].isupper() and mid[w] > mid.get(w.lower(), 0)}
    lower_words = {w.lower() for r in recs for w in (r.get("description") or "").split()[:1] if w not in proper}
    countries = {r["title"] for r in recs if (r.get("description") or "").startswith("Country")}
    facts = []
    for r in recs:
        title, desc, text = short_title(r["title"]), (r.get("description") or "").strip(), r.get("text", "")
        first_word = desc.split(" ", 1)[0]
        opening = desc[:1].lower() + desc[1:] if first_word.lower() in lower_words else desc
        if title and (m := PERSON.match(desc)) and len(m["what"].split()) >= 2:
            what = m["what"] if first_word.lower() not in lower_words else opening[:len(m["what"])]
            facts.append(dict(t="who", q=f"Who was the {what} born in {m['born']}?", a=title, doc=r["id"]))
        elif (title and 4 <= len(desc.split()) <= 12 and descs[desc.lower()] == 1 and not re.search(r"\d{3,4}", desc)
              and not re.search(r"(?<![su])s$", first_word) and r["title"] not in countries):
            facts.append(dict(t="what", q=f"What is the {opening.rstrip('.')}?", a=title, doc=r["id"]))
        if title and PLACE.match(desc) and r["title"] not in countries:
            where = re.findall("|".join(re.escape(c) for c in sorted(countries, key=len, reverse=True)),
                               desc + " " + text.split(". ", 1)[0])
            if where:
                facts.append(dict(t="country", q=f"In which country is {title}?", a=where[0], doc=r["id"]))
    capital = {}
    for c in countries:
        for pat in CAPITAL:
            if (m := pat.search(by_title[c]["text"])) and m["cap"] != c:
                capital[c] = m["cap"].strip()
                break
    for f in [f for f in facts if f["t"] == "country" and f["a"] in capital]:
        facts.append(dict(t="capital", q=f"What is the capital of the country where "
                                         f"{f['q'][len('In which country is '):-1]} is located?",
                          a=capital[f["a"]], doc=f["doc"], hop1=f["a"], doc2=by_title[f["a"]]["id"]))
    return facts, capital


class Checker:
    """The answerability check: the gold answer appears in a top-k article of the local search for the query."""

    def __init__(self, corpus: str, k: int = 5):
        from data.localweb import open_index
        self.index, self.k = open_index(corpus), k
        self._text: dict[str, str] = {}

    def _doc(self, doc_id: str) -> str:
        if doc_id not in self._text:
            rec = self.index.lookup(doc_id) or {}
            self._text[doc_id] = normalize(f"{rec.get('title', '')} {rec.get('text', '')}")
        return self._text[doc_id]

    def support(self, query: str, answer: str) -> str | None:
        """The id of the best-ranked top-k article that contains `answer`, or None."""
        gold = f" {normalize(answer)} "
        seen = []
        for p in self.index.query(query, self.k * 3):
            if p["id"] not in seen:
                seen.append(p["id"])
        for doc_id in seen[:self.k]:
            if gold in f" {self._doc(doc_id)} ":
                return doc_id
        return None


def verify(fact: dict, check: Checker) -> list[str] | None:
    """Support article ids when every hop is answerable, else None."""
    if normalize(fact["a"]) in normalize(fact["q"]) or not normalize(fact["a"]):
        return None
    if fact["t"] == "capital":
        s1 = check.support(fact["q"], fact["hop1"])
        s2 = check.support(f"capital of {fact['hop1']}", fact["a"])
        return [s1, s2] if s1 and s2 and s1 != s2 else None
    s = check.support(fact["q"], fact["a"])
    if fact["t"] in ("who", "what") and s != fact["doc"]:  # the described article itself must come up
        return None
    return [s] if s else None


def in_dev(doc_id: str, seed: int, frac: float = 0.12) -> bool:
    """Articles are split once, by a hash; a question goes with the article it is about (a second hop's country
    article can serve both splits)."""
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16) / 2**32 < frac


def build(corpus: str, n_train: int, n_dev: int, seed: int = 0, k: int = 5, two_hop_frac: float = 0.2):
    recs = [json.loads(line) for line in open(corpus, encoding="utf-8") if line.strip()]
    facts, _ = candidates(recs)
    rng = random.Random(seed)
    rng.shuffle(facts)
    check = Checker(corpus, k)
    want = {"train": n_train, "dev": n_dev}
    cap2 = {s: int(n * two_hop_frac) for s, n in want.items()}  # two-hop share per split
    out = {"train": [], "dev": []}
    seen_q = set()
    for f in facts:
        if f["q"] in seen_q:
            continue
        split = "dev" if in_dev(f["doc"], seed) else "train"  # by the article the question is about
        if len(out[split]) >= want[split]:
            continue
        hops = 2 if f["t"] == "capital" else 1
        n2 = sum(x["hops"] == 2 for x in out[split])
        if hops == 2 and n2 >= cap2[split]:
            continue
        if hops == 1 and len(out[split]) - n2 >= want[split] - cap2[split]:
            continue
        support = verify(f, check)
        if support is None:
            continue
        seen_q.add(f["q"])
        out[split].append(dict(id=f"wiki-{split}-{len(out[split]):05d}", source=f"wiki_offline_{hops}hop",
                               question=f["q"], answers=[f["a"]], hops=hops, template=f["t"], support=support))
        if all(len(out[s]) >= want[s] for s in out):
            break
    return out


@dataclass
class Args:
    corpus: str = ""                    # corpus JSONL ("" = the embedded Wikipedia summaries)
    out_dir: str = str(ROOT / "data")
    n_train: int = 3000
    n_dev: int = 300
    seed: int = 0
    k: int = 5                          # top-k of the answerability check


def main(argv: list[str]) -> None:
    a = parse_config(Args, argv)
    if not a.corpus:
        from data.wiki_corpus import default_corpus_path
        a.corpus = str(default_corpus_path())
    out = build(a.corpus, a.n_train, a.n_dev, a.seed, a.k)
    for split, rows in out.items():
        path = Path(a.out_dir) / f"qa_{split}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        by_t = collections.Counter(r["template"] for r in rows)
        lens = collections.Counter(min(len(r["answers"][0].split()), 4) for r in rows)
        print(f"{path}: {len(rows)} questions | templates {dict(by_t)} | answer words {dict(sorted(lens.items()))}")


if __name__ == "__main__":
    main(sys.argv[1:])
