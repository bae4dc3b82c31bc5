"""Build the offline QA set: questions over the embedded Wikipedia corpus whose answers are found by searching it.

What it does
- Reads the corpus JSONL (data/wiki_corpus.py: ~10k Wikipedia articles with a title, a short description and the
  lead-section summary) and writes questions from precise templates. Answers are short (1-4 words: a name, a place,
  a year, a number), because the policy is a small model and the reward is word-set F1.
- Single-hop templates (the fact is stated by one article, in its description or its text):
    person_who     "German playwright and poet (1898–1956)"  -> "Which German playwright and poet lived from 1898 to
                   1956?" -> Bertolt Brecht
    born_year      the same description -> "In what year was Bertolt Brecht born?" -> 1898   (died_year: "...die?")
    office_who     "President of France from 1871 to 1873" -> "Who was president of France from 1871 to 1873?"
    founder_who    "Founder of the Ayyubid dynasty" -> "Who founded the Ayyubid dynasty?" -> Saladin
    capital        "Capital and largest city of Ghana" / "Its capital is Accra" -> "What is the capital of Ghana?"
    superlative    "Highest mountain in Greece" -> "What is the highest mountain in Greece?" -> Mount Olympus
    study_of       "Study of plant life" -> "What is the study of plant life called?" -> Botany
    si_unit        "SI unit of frequency" -> "What is the SI unit of frequency?" -> Hertz
    element_number / element_symbol   "Chemical element with atomic number 79 (Au)" -> 79 / Au
    work_creator   "1813 novel by Jane Austen" -> "Who wrote the novel Pride and Prejudice?" (directed, painted, ...)
    work_year      the same description -> "In what year was the novel Pride and Prejudice published?" -> 1813
    place_country  "City in Peru" (or the first sentence) -> "In which country is Cusco?" -> Peru
    place_city     "Public university in Beijing, China" -> "In which city is Tsinghua University?" -> Beijing
    continent      "Country in South America" -> "On which continent is Peru?" -> South America
    discovered     "The neutron was discovered by James Chadwick in 1932" -> "Who discovered the neutron?" (+ year)
    founded_year   "ESA was founded in 1975 ..." -> "In what year was the European Space Agency founded?"
- Two-hop templates (the answer of hop 1 is the subject of hop 2):
    creator_born / creator_died   "In what year was the author of the novel Pride and Prejudice born?" -> 1775
    country_capital               "What is the capital of the country where Cusco is located?" -> Lima
    country_continent             "On which continent is the country where Cusco is located?" -> South America
- Verification (the answerability check, `Checker` + `verify`): with the local BM25 search (browse.py's local back
  end, top k=5 articles), each hop's question must bring up the article that states the fact, and that article
  (title, description and text: what its LocalWeb page shows) must contain the hop's answer (normalised as
  reward.normalize does, on word boundaries). A two-hop question must also bring up the hop-1 article when asked
  whole, and the hop-1 article must not already contain the final answer. person_who questions need their article
  first (the years that pick the person out are on the page, not in the snippets). Questions that share a content
  word (or a stem: "Ethiopian" / Ethiopia) with their answer or bridge entity are dropped: echoing the question
  would earn F1.
- Split: questions are linked by the articles they use (support articles, and the article named by the answer);
  whole linked groups go to dev or train, so no dev question shares an article with a training question. Within a
  split the templates are balanced (each an equal share, capped by what it has and by `max_share` of the split) and
  `two_hop_frac` of the questions are two-hop where there are enough.
- Output: data/qa_train.jsonl and data/qa_dev.jsonl in data/prepare.py's schema (id, source = wiki_offline_1hop /
  wiki_offline_2hop, question, answers: the gold first, then accepted variants: "USA", "Yaounde" for "Yaoundé")
  plus hops, template, support (article ids, one per hop), hop_questions and bridge (two-hop only), and in_snippet:
  whether the answer is visible in the titles and 200-character snippets of the top 3 results for the question
  (train.py's default search-then-answer scaffold sees exactly that; the rest need a page to be read).
  Reproducible: same corpus, seed and sizes -> byte-identical files.

What it does not do: no paraphrasing, no model in the loop, no facts from outside the corpus.

Run (CPU, ~15 s once the corpus and its index are built):
    python data/build_qa.py                    # -> data/qa_train.jsonl, data/qa_dev.jsonl; prints the statistics
    python data/build_qa.py --corpus=FILE --out_dir=data --seed=0 --n_train=2200 --n_dev=250 --two_hop_frac=0.2
Tests: python -m pytest -x -q tests/test_qa.py
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "data")):
    if p not in sys.path:
        sys.path.insert(0, p)
from reward import normalize  # noqa: E402

# Words that may be shared by a question and its answer (everything else shared = the answer is given away).
STOP = frozenset("a an the of and in on at to for by de da del di du la le les van von der den al el y st".split())
# Country names as they appear in descriptions and first sentences -> canonical country (None: not a country).
COUNTRY_ALIASES = {"US": "United States", "U.S.": "United States", "USA": "United States", "UK": "United Kingdom",
                   "England": "United Kingdom", "Scotland": "United Kingdom", "Wales": "United Kingdom",
                   "Northern Ireland": "United Kingdom", "New Mexico": None, "New South Wales": None, "Papua": None,
                   "Georgia": None, "Ireland": None, "New Guinea": None,  # islands, or a US state
                   "Korea": "Korea"}  # "Korea" is two countries: it makes a place ambiguous, never an answer
# Extra gold strings for a canonical answer (the reward takes the best F1 over them).
ANSWER_ALIASES = {"United States": ["US", "USA", "United States of America"], "United Kingdom": ["UK"],
                  "Republic of Ireland": ["Ireland"]}
CONTINENTS = ("Africa", "Europe", "Asia", "South America", "North America", "Oceania")
PLACE_HEADS = ("city|town|capital|metropolis|village|port|municipality|river|lake|mountain|mountains|mountain range|"
               "volcano|island|islands|archipelago|region|province|state|desert|peninsula|waterfall|"
               "university|museum|palace|cathedral|temple|mosque|church|castle|park|bridge|stadium|tower|monument|"
               "district|county|prefecture")
NATURAL = ("river", "lake", "mountain", "mountains", "mountain range", "region", "desert", "peninsula", "volcano",
           "waterfall")
INSTITUTIONS = ("university", "museum", "palace", "cathedral", "temple", "mosque", "church", "castle", "stadium",
                "tower", "bridge", "monument")
THE_NAMES = re.compile(r"(?: River| Mountains| Desert| Sea| Ocean| Canal| Gulf| Strait| Islands| Plateau| Basin|"
                       r" Range| Museum| Gallery| Party| Agency| Observatories)$|"
                       r"^(?:Gulf|Bay|Sea|Strait|Isle|University|Council) of |\b(?:Republic|Kingdom|Emirates|States)\b")
NOT_PERSON = re.compile(r"\b(?:dynasty|empire|kingdom|monarchy|war|period|state|movement|house|family|band|group|"
                        r"company|republic|caliphate|sultanate|conflict|revolution|civili[sz]ation|culture|city|battle|"
                        r"series|ship|building|church|party|order|league|team|territory|station)\b", re.I)
YEARS = re.compile(r"^(?P<what>[^()]+?) \((?:born (?P<born>\d{3,4})|(?P<b>\d{3,4})\s?–\s?(?P<d>\d{3,4}))\)$")
WORK = re.compile(r"^(?:(?P<year>\d{4}) )?(?:[\w'-]+ ){0,3}?(?P<kind>novel|novella|film|painting|opera|play|book|"
                  r"symphony|album|poem|sculpture|ballet|fresco|musical|treatise)(?: directed)? by (?P<who>.+)$", re.I)
NAME = re.compile(r"^(?:the )?[A-Z][\w'.-]*(?: (?:de |da |van |von |der |del |di )?[A-Z][\w'.-]*){0,3}$")
OFFICE = re.compile(r"^(?P<office>President|Prime Minister|King|Queen|Emperor|Empress|Chancellor|Sultan|Pharaoh|Shah|"
                    r"Tsar|Caliph|Pope|Dictator|Premier|Shogun|Regent) of (?P<of>[^()]+?) from (?P<a>\d{3,4}) to "
                    r"(?P<b>\d{3,4})$")
CAPITAL_DESC = re.compile(r"^Capital(?: city)?(?: and (?:the )?(?:largest|most populous) city)? of (?P<of>[^()]+)$")
CAPITAL_TEXT = re.compile(r"\b(?:Its|The country's|The nation's) capital(?: city)?(?: and (?:its )?(?:largest|most "
                          r"populous) city)? is (?P<cap>[A-Z][\w'-]+(?: [A-Z][\w'-]+){0,2})")
SUPERLATIVE = re.compile(r"^(?:(?:Second|Third)-)?(?:Highest|Largest|Longest|Biggest|Smallest|Deepest|Tallest|Oldest|"
                         r"Brightest|Holiest|Most populous|Most common|Most abundant)\b[^();]*$")
STUDY = re.compile(r"^(?P<sci>Scientific )?(?:Study|Science) of (?P<x>[^()]+)$")
SI_UNIT = re.compile(r"^SI (?:base |derived )?unit of (?P<x>[^()]+)$")
ELEMENT = re.compile(r"^Chemical element with atomic number (?P<n>\d+) \((?P<sym>\w+)\)$")
ENGLISH_SYMBOLS = {"i", "in", "as", "he", "be", "no", "at", "am", "es", "os", "ca", "pa", "co"}  # words, not answers
DISCOVERED = re.compile(r"(?:^|\. )(?P<subj>The [\w -]+?|It|They) (?:was|were) (?:first )?discovered by (?:[\w-]+ )*?"
                        r"(?P<who>[A-Z][\w'-]+(?: (?:de |von |van )?[A-Z][\w'-]+){1,2}) in (?P<y>\d{4})\b")
FOUNDED = re.compile(r"(?:^|\. )(?:(?P<subj>It|The (?:university|city|company|organization|organisation|agency|"
                     r"society|magazine|order|museum|school|institute|party|band|club|empire|kingdom|dynasty)|[A-Z]"
                     r"[\w -]*?) (?:was|were) (?:officially )?(?:founded|established) in (?P<y>\d{4})\b|Founded in "
                     r"(?P<y2>\d{4}),)")


def short_title(title: str) -> str:
    """The article title as an answer or a subject: without a parenthetical ("Casablanca (film)" -> "Casablanca")."""
    return re.sub(r"\s*\([^)]*\)", "", title).strip()


def content_words(text: str) -> set[str]:
    return set(normalize(text).split()) - STOP


def gives_away(question: str, answers: list[str]) -> bool:
    """True when an answer is empty or shares a content word with the question (echoing it would earn F1), or a
    word's stem ("Ethiopian Highlands" gives away Ethiopia, "Mongolian" Mongolia)."""
    q = content_words(question)

    def shown(w: str) -> bool:  # the word, or (6+ letters) its first letters but two: "ethiop" for "ethiopia"
        return w in q or (len(w) >= 6 and any(x.startswith(w[:-2]) for x in q))

    return any(not content_words(a) or any(shown(w) for w in content_words(a)) for a in answers)


def leaked(f: dict) -> bool:
    """The question gives away its answer, or (two hops) its bridge entity."""
    return gives_away(f["q"], f["a"] + ([f["bridge"]] if "bridge" in f else []))


def n_words(answer: str) -> int:
    return len(normalize(answer).split())


class Corpus:
    """The records plus the lookups the templates need (titles, countries, proper words, capitals)."""

    def __init__(self, recs: list[dict]):
        self.recs = sorted(recs, key=lambda r: r["id"])
        self.by_title = {}
        for r in self.recs:  # a short title that two articles share ("Georgia") names neither
            t = short_title(r["title"])
            self.by_title[t] = None if t in self.by_title else r
        desc = {r["id"]: (r.get("description") or "").strip() for r in self.recs}
        self.desc = desc
        self.desc_count = collections.Counter(d.lower() for d in desc.values())
        # "Country in South America", "Landlocked country in West Africa", "African island country in ..."
        is_country = re.compile(r"^(?:[\w-]+ )?(?:[Ii]sland |[Ll]andlocked |[Aa]rchipelagic )?[Cc]ountry "
                                r"(?:in|primarily|of)\b")
        self.countries = sorted(r["title"] for r in self.recs if is_country.match(desc[r["id"]]))
        names = {c: c for c in self.countries} | {k: v for k, v in COUNTRY_ALIASES.items()}
        self._country_names = names
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        # not "Uruguay" in "Uruguay River": a feature named after a country is not the country
        self._country_re = re.compile(r"(?<![\w-])(" + alternatives + r")(?![\w-]| River| Sea| Lake| Mountains|"
                                      r" Desert)")
        # a word is a proper adjective/noun when the corpus capitalises it mid-sentence more often than not
        cap, low = collections.Counter(), collections.Counter()
        for r in self.recs:
            for w in re.findall(r"(?<=[a-z,;] )([A-Za-z][\w-]*)", r["text"]):
                (cap if w[0].isupper() else low)[w.lower()] += 1
        self._proper = {w for w in cap if cap[w] > low[w]}
        self.capital = self._capitals()

    def countries_in(self, text: str) -> list[str]:
        """Canonical countries named in `text` (longest names first, so "Papua New Guinea" is not "Guinea")."""
        out = []
        for m in self._country_re.finditer(text):
            c = self._country_names[m.group(1)]
            if c and c not in out:
                out.append(c)
        return out

    def lower_first(self, phrase: str) -> str:
        """Lowercase the first word for use mid-sentence, unless it is a proper word ("German", "Roman")."""
        first = phrase.split(" ", 1)[0].split("-")[0]  # "Georgian-American": judged by "Georgian"
        return phrase if first.lower() in self._proper or first.isupper() else phrase[:1].lower() + phrase[1:]

    def the(self, title: str, rec: dict) -> str:
        """`title` as a subject mid-sentence: with "the" when the article opens with it ("The Maldives ...") or the
        name is a river, desert, sea, ... ("the Irrawaddy River")."""
        t = short_title(title)
        if t.lower().startswith("the ") or not (rec["text"].startswith(f"The {t}") or THE_NAMES.search(t)):
            return t
        return "the " + t

    def _capitals(self) -> dict[str, tuple[str, str]]:
        """country -> (capital, id of the article that says so); a country whose sources disagree is left out."""
        found = collections.defaultdict(set)
        for r in self.recs:  # the city's description: "Capital and largest city of Peru"
            m = CAPITAL_DESC.match(self.desc[r["id"]])
            if m and m["of"].removeprefix("the ") in self.countries:
                found[m["of"].removeprefix("the ")].add((short_title(r["title"]), r["id"]))
        for c in self.countries:  # the country's text: "Its capital and largest city is Lima"
            rec = self.by_title.get(c)
            m = rec and CAPITAL_TEXT.search(rec["text"])
            if m and m["cap"] != c:
                found[c].add((m["cap"], rec["id"]))
        return {c: sorted(v)[0] for c, v in found.items() if len({cap for cap, _ in v}) == 1}


def is_person(r: dict) -> bool:
    """Years in a description belong to a life ("German poet (1898–1956)"), not to a dynasty, war or state."""
    if NOT_PERSON.search(" ".join(r.get("description", "").split()[:3])):
        return False
    if r.get("topic") == "People":
        return True
    # other topics (and corpora without topics): people are written about as he/she
    pronoun = re.search(r"\b(?:he|she|his|her|him)\b", r["text"], re.I)
    return r.get("topic", "") in ("", "Uncategorized") and bool(pronoun)


def fact(t: str, q: str, answers: list[str], doc: str, **extra) -> dict:
    """A one-hop candidate: `q`'s search must bring up article `doc`, which must contain an answer."""
    return dict(t=t, q=q, a=answers, hops=1, steps=[(q, [doc], answers)], **extra)


def with_aliases(answer: str) -> list[str]:
    return [answer] + ANSWER_ALIASES.get(answer, [])


def ascii_fold(text: str) -> str:
    """ "Yaoundé" -> "Yaounde": a model that drops the accent still matches a gold string."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def one_hop(c: Corpus) -> list[dict]:
    """All single-hop candidates (before verification)."""
    out = []
    for r in c.recs:
        rid, title, desc, text = r["id"], short_title(r["title"]), c.desc[r["id"]], r["text"]
        unique_desc = c.desc_count[desc.lower()] == 1
        if (m := YEARS.match(desc)) and is_person(r):
            what = m["what"]
            if m["b"] and int(m["b"]) < int(m["d"]):
                if len(what.split()) >= 2 and unique_desc:
                    out.append(fact("person_who", f"Which {c.lower_first(what)} lived from {m['b']} to {m['d']}?",
                                    [title], rid))
                out.append(fact("born_year", f"In what year was {title} born?", [m["b"]], rid))
                out.append(fact("died_year", f"In what year did {title} die?", [m["d"]], rid))
            elif m["born"]:
                if len(what.split()) >= 3 and unique_desc:
                    out.append(fact("person_who", f"Which {c.lower_first(what)} was born in {m['born']}?", [title],
                                    rid))
                out.append(fact("born_year", f"In what year was {title} born?", [m["born"]], rid))
        if m := OFFICE.match(desc):
            out.append(fact("office_who", f"Who was {m['office'].lower()} of {m['of']} from {m['a']} to "
                                          f"{m['b']}?", [title], rid))
        if (m := re.match(r"^Founder of (?P<x>[^()]+?)(?: \(.*\))?$", desc)) and unique_desc:
            out.append(fact("founder_who", f"Who founded {m['x']}?", [title], rid))
        if m := CAPITAL_DESC.match(desc):
            out.append(fact("capital", f"What is the capital of {m['of']}?", [title], rid))
        if SUPERLATIVE.match(desc) and unique_desc:
            out.append(fact("superlative", f"What is the {c.lower_first(desc)}?", [title], rid))
        if (m := STUDY.match(desc)) and unique_desc:
            out.append(fact("study_of", f"What is the {'scientific ' if m['sci'] else ''}study of {m['x']} called?",
                            [title], rid))
        if (m := SI_UNIT.match(desc)) and unique_desc:
            out.append(fact("si_unit", f"What is the SI unit of {m['x']}?", [title], rid))
        if m := ELEMENT.match(desc):
            out.append(fact("element_number", f"What is the atomic number of {title.lower()}?", [m["n"]], rid))
            if m["sym"].lower() not in ENGLISH_SYMBOLS:
                out.append(fact("element_symbol", f"What is the chemical symbol of {title.lower()}?", [m["sym"]], rid))
        out += works(c, r)
        out += places(c, r)
        if title in c.countries:
            conts = [k for k in CONTINENTS if k in desc]
            if len(conts) == 1 and not re.search(r"Central America|Caribbean|Antilles", desc):
                out.append(fact("continent", f"On which continent is {c.the(r['title'], r)}?", [conts[0]], rid))
            if title in c.capital and c.capital[title][1] == rid:  # the country's own text names its capital
                out.append(fact("capital", f"What is the capital of {c.the(r['title'], r)}?", [c.capital[title][0]],
                                rid))
        head = ". ".join(text.split(". ")[:3])  # facts about the subject sit in the first sentences
        if (m := DISCOVERED.search(head)) and (m["subj"] == "It" or m["subj"].lower() == f"the {title.lower()}"):
            subj = c.the(r["title"], r) if m["subj"] == "It" else "the " + c.lower_first(title)
            out.append(fact("discovered", f"Who discovered {subj}?", [m["who"]], rid))
            out.append(fact("discovered", f"In what year was {subj} discovered?", [m["y"]], rid))
        if m := FOUNDED.search(head):
            subj = m["subj"] or ""
            if m["y2"] or subj in ("It",) or subj.startswith("The ") or subj == title or (
                    subj.isupper() and subj in text[:200]):
                out.append(fact("founded_year", f"In what year was {c.the(r['title'], r)} founded?",
                                [m["y"] or m["y2"]], rid))
    return out


def works(c: Corpus, r: dict) -> list[dict]:
    """Creator and year of a novel, film, painting, opera, ... from "1813 novel by Jane Austen"."""
    m = WORK.match(c.desc[r["id"]])
    # "Symphony No. 2 (Mahler)": a title told apart by its creator is ambiguous without the parenthetical
    if not m or re.search(r"\((?!(?:\d{4} )?(?:film|novel|album|book|musical)\))", r["title"]):
        return []
    who = re.split(r",| describing | about | written ", m["who"])[0].strip()
    if not NAME.match(who) or " and " in who:
        return []
    kind = m["kind"].lower()
    subject = (c.the(r["title"], r) if kind in ("painting", "fresco", "sculpture")
               else f"the {kind} {short_title(r['title'])}")
    verb = {"film": "directed", "painting": "painted", "fresco": "painted", "sculpture": "sculpted",
            "album": "recorded", "opera": "composed", "ballet": "composed", "symphony": "composed",
            "musical": "composed"}.get(kind, "wrote")
    out = [fact("work_creator", f"Who {verb} {subject}?", [who], r["id"], kind=kind, work=subject)]
    when = {"novel": "published", "novella": "published", "book": "published", "film": "released",
            "album": "released", "painting": "painted"}
    if m["year"] and kind in when:
        out.append(fact("work_year", f"In what year was {subject} {when[kind]}?", [m["year"]], r["id"]))
    return out


def places(c: Corpus, r: dict) -> list[dict]:
    """The country (and, for institutions, the city) of a city, river, lake, university, ... from its description
    ("City in southern Peru") or, failing that, its first sentence."""
    desc, title = c.desc[r["id"]], short_title(r["title"])
    m = re.match(r"^(?:[\w'-]+ ){0,3}?(?P<head>" + PLACE_HEADS + r")\b(?P<more>(?: [\w'-]+){0,3}?) (?:in|of|on) "
                 r"(?P<where>.+)$", desc, re.I)
    if not m or title in c.countries or "(" in desc:
        return []
    natural = m["head"].lower() in NATURAL
    if natural and " and " in m["where"]:  # "River in Peru, Colombia and Brazil": several countries
        return []
    # countries named by the description, else (not for rivers, regions, ..., which often span borders) by the first
    # sentence, without the place's own name ("Niger River")
    found = c.countries_in(m["where"])
    if not found and not natural:
        found = c.countries_in(r["text"].split(". ", 1)[0].replace(title, ""))
    out = []
    subject = c.the(r["title"], r)
    if len(found) == 1 and found[0] != title:
        country = found[0]
        # answers: the country, its short forms, and the UK nation the article names ("England")
        answers = with_aliases(country) + [n for n in ("England", "Scotland", "Wales", "Northern Ireland")
                                           if country == "United Kingdom" and n in desc + r["text"][:300]]
        out.append(fact("place_country", f"In which country is {subject}?", answers, r["id"], country=country))
    if m["head"].lower() in INSTITUTIONS and not m["more"]:  # "Zen Buddhist temple in Kyoto, Japan"
        city = m["where"].split(",")[0].strip()
        city_rec = c.by_title.get(city)  # the city must be an article that describes itself as a city
        if city_rec and re.search(r"\b(?:[Cc]ity|[Cc]apital|[Tt]own|[Mm]etropolis)\b", c.desc[city_rec["id"]]):
            out.append(fact("place_city", f"In which city is {subject}?", [city], r["id"]))
    return out


def two_hop(c: Corpus, singles: list[dict]) -> list[dict]:
    """Chains of two facts: the answer of hop 1 (a creator, a country) is the subject of hop 2."""
    by_doc = collections.defaultdict(dict)
    for f in singles:
        by_doc[f["steps"][0][1][0]][f["t"]] = f  # the last fact of each kind per article
    role = {"novel": "author", "novella": "author", "book": "author", "poem": "author", "treatise": "author",
            "play": "author", "film": "director", "painting": "painter", "fresco": "painter", "sculpture": "sculptor",
            "opera": "composer", "ballet": "composer", "symphony": "composer", "musical": "composer"}
    continent = {f["steps"][0][1][0]: f for f in singles if f["t"] == "continent"}  # country id -> fact
    out = []
    for f in singles:
        if f["t"] == "work_creator" and f["kind"] in role and (p := c.by_title.get(f["a"][0])):
            for t, verb in (("born_year", "was the {} of {} born"), ("died_year", "did the {} of {} die")):
                if (h2 := by_doc[p["id"]].get(t)) and f["a"][0] in h2["q"]:
                    q = "In what year " + verb.format(role[f["kind"]], f["work"]) + "?"
                    out.append(dict(t="creator_" + t.split("_")[0], q=q, a=h2["a"], hops=2, bridge=f["a"][0],
                                    steps=[f["steps"][0], h2["steps"][0]]))
        country = c.by_title.get(f.get("country", ""))
        if f["t"] == "place_country" and country and (h2 := continent.get(country["id"])):
            subject = f["q"].removeprefix("In which country is ").removesuffix("?")
            out.append(dict(t="country_continent", q=f"On which continent is the country where {subject} is located?",
                            a=h2["a"], hops=2, bridge=f["country"], steps=[f["steps"][0], h2["steps"][0]]))
        if f["t"] == "place_country" and country and f["country"] in c.capital:
            cap, cap_doc = c.capital[f["country"]]  # hop 2 is stated by the capital's or the country's article
            subject = f["q"].removeprefix("In which country is ").removesuffix("?")
            h2q = f"What is the capital of {c.the(f['country'], country)}?"
            out.append(dict(t="country_capital", q=f"What is the capital of the country where {subject} is located?",
                            a=[cap], hops=2, bridge=f["country"],
                            steps=[f["steps"][0], (h2q, sorted({cap_doc, country["id"]}), [cap])]))
    return out


def candidates(recs: list[dict]) -> list[dict]:
    """Every template question (one- and two-hop) before verification, in a deterministic order."""
    c = Corpus(recs)
    singles = one_hop(c)
    out, seen = [], set()
    for f in singles + two_hop(c, singles):
        if f["q"] in seen or "(" in f["q"] or leaked(f) or n_words(f["a"][0]) > 4:
            continue
        seen.add(f["q"])
        out.append(f)
    return out


# Templates whose telling detail (the years of a life) is only on the article's page, not in its snippet: the
# article must be the first result, or a reader of the results could not tell which person is meant.
TOP1 = frozenset({"person_who"})


def words(text: str) -> str:
    """reward.normalize, then split on any non-word character too ("1898–1956" -> "1898 1956"), padded with spaces
    so that `words(answer) in words(page)` matches whole words only."""
    return " " + " ".join(re.findall(r"\w+", normalize(text))) + " "


class Checker:
    """The answerability check, on the local search back end (browse.py) over `corpus`."""

    def __init__(self, corpus: str, k: int = 5, snippet_k: int = 3, snippet_chars: int = 200):
        from browse import make_backend
        self.search = make_backend("local", top_k=k, corpus=corpus, serve=False, snippet_chars=snippet_chars)
        self.snippet_k = snippet_k
        self.docs = {}
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)  # what the article's page shows: title, description, text
                    self.docs[r["id"]] = words(f"{r['title']} {r.get('description', '')} {r['text']}")
        self._memo: dict[str, list] = {}

    def top(self, query: str) -> list:
        """The top-k results (SearchResult) of the local search, memoised."""
        if query not in self._memo:
            self._memo[query] = self.search.search([query])[0]
        return self._memo[query]

    def top_ids(self, query: str) -> list[str]:
        return [unquote(r.url.rsplit("/wiki/", 1)[1]) for r in self.top(query)]

    def contains(self, doc_id: str, answers: list[str]) -> bool:
        text = self.docs.get(doc_id, "")
        return any(words(a).strip() and words(a) in text for a in answers)

    def support(self, query: str, answers: list[str], docs: list[str] | None = None) -> str | None:
        """The best-ranked top-k article (one of `docs`, if given) that contains an answer, else None."""
        for doc_id in self.top_ids(query):
            if (docs is None or doc_id in docs) and self.contains(doc_id, answers):
                return doc_id
        return None

    def in_snippet(self, query: str, answers: list[str]) -> bool:
        seen = words(" ".join(f"{r.title} {r.snippet}" for r in self.top(query)[:self.snippet_k]))
        return any(words(a).strip() and words(a) in seen for a in answers)

    def close(self) -> None:
        self.search.close()


def verify(f: dict, check: Checker) -> list[str] | None:
    """Support article ids (one per hop) when every hop is answerable by search, else None."""
    if leaked(f):
        return None
    if f["t"] in TOP1 and check.top_ids(f["q"])[:1] != f["steps"][0][1][:1]:
        return None
    support = []
    for query, docs, answers in f["steps"]:
        s = check.support(query, answers, docs)
        if s is None:
            return None
        support.append(s)
    if f["hops"] == 2:
        # asked whole, the question must find hop 1's article, and that article must not already hold the answer
        if support[0] not in check.top_ids(f["q"]) or check.contains(support[0], f["a"]) or support[0] == support[1]:
            return None
    return support


def split_of(rows: list[dict], seed: int, dev_frac: float, by_title: dict) -> list[str]:
    """'train' or 'dev' per row: rows linked by a shared article (support, or the article the answer names) form a
    group, and a group goes to one split as a whole (by a hash of the seed and its first article)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    nodes = []
    for r in rows:
        ids = list(r["support"])
        if r["a"][0] not in CONTINENTS and (a := by_title.get(r["a"][0])):  # continents would tie countries together
            ids.append(a["id"])
        nodes.append(ids)
        for x in ids[1:]:
            parent[find(x)] = find(ids[0])
    groups = collections.defaultdict(list)
    for ids in nodes:
        groups[find(ids[0])].append(ids)
    first = {g: min(x for ids in members for x in ids) for g, members in groups.items()}
    out = []
    for ids in nodes:
        g = find(ids[0])
        h = int(hashlib.sha256(f"{seed}:{first[g]}".encode()).hexdigest()[:8], 16) / 2**32
        big = len(groups[g]) > 0.01 * len(rows)  # a big group (China's places) would swing the dev mix: train
        out.append("dev" if h < dev_frac and not big else "train")
    return out


def balanced(rows: list[dict], n: int, rng: random.Random, cap: int) -> list[dict]:
    """n rows with the templates as even as possible: each gets an equal share, capped by what it has and by `cap`;
    the spare goes to the others (water-filling); the cap rises only if n cannot be met under it. Rows are picked at
    random within a template."""
    by_t = collections.defaultdict(list)
    for r in rows:
        by_t[r["t"]].append(r)
    while True:
        quota, left = {}, n
        for i, t in enumerate(sorted(by_t, key=lambda t: (len(by_t[t]), t))):
            quota[t] = min(len(by_t[t]), cap, left // (len(by_t) - i))
            left -= quota[t]
        if left <= 0 or all(quota[t] == len(by_t[t]) for t in by_t):
            break
        cap += 1
    out = []
    for t in sorted(by_t):
        out += rng.sample(by_t[t], quota[t])
    return out


def build(corpus: str, n_train: int = 2200, n_dev: int = 250, seed: int = 0, k: int = 5,
          two_hop_frac: float = 0.2, max_share: float = 0.1, dev_frac: float = 0.15,
          log=print) -> dict[str, list[dict]]:
    """Generate, verify, split and sample; returns {"train": rows, "dev": rows} in the output schema."""
    recs = [json.loads(line) for line in open(corpus, encoding="utf-8") if line.strip()]
    cands = candidates(recs)
    check = Checker(corpus, k)
    good = []
    try:
        for f in cands:
            if support := verify(f, check):
                good.append({**f, "support": support, "in_snippet": check.in_snippet(f["q"], f["a"])})
    finally:
        check.close()
    log(f"{len(cands)} candidates, {len(good)} verified answerable (top-{k})")
    per_t = collections.Counter(f["t"] for f in good)
    log("verified per template: " + ", ".join(f"{t} {n}" for t, n in sorted(per_t.items())))
    labels = split_of(good, seed, dev_frac, Corpus(recs).by_title)
    out = {}
    for split, n in (("train", n_train), ("dev", n_dev)):
        pool = [f for f, s in zip(good, labels) if s == split]
        rng = random.Random(f"{seed}:{split}")
        n2 = round(n * two_hop_frac)
        cap = max(1, int(max_share * n))
        picked = balanced([f for f in pool if f["hops"] == 2], n2, rng, cap)
        picked += balanced([f for f in pool if f["hops"] == 1], n - len(picked), rng, cap)
        if len(picked) < n:
            log(f"warning: {split} has only {len(picked)} questions (asked for {n})")
        rng.shuffle(picked)
        out[split] = [record(f, f"wiki-{split}-{i:05d}") for i, f in enumerate(picked)]
    return out


def record(f: dict, rid: str) -> dict:
    """A row of the output file (data/prepare.py's schema plus provenance)."""
    answers = list(f["a"])
    for a in f["a"]:  # accent-free spellings as extra golds
        if (folded := ascii_fold(a)) not in answers and normalize(folded) and len(folded) >= len(a) - 3:
            answers.append(folded)
    r = dict(id=rid, source=f"wiki_offline_{f['hops']}hop", question=f["q"], answers=answers, hops=f["hops"],
             template=f["t"], support=f["support"], in_snippet=f["in_snippet"])
    if f["hops"] == 2:
        r["bridge"] = f["bridge"]
        r["hop_questions"] = [s[0] for s in f["steps"]]
    return r


def summary(rows: list[dict]) -> str:
    n = len(rows)
    hops = collections.Counter(r["hops"] for r in rows)
    by_t = collections.Counter(r["template"] for r in rows)
    lens = collections.Counter(n_words(r["answers"][0]) for r in rows)
    snip = sum(r["in_snippet"] for r in rows)
    return (f"{n} questions | hops: " + ", ".join(f"{h}-hop {c} ({c / n:.0%})" for h, c in sorted(hops.items())) +
            f" | answer visible in top-3 snippets: {snip} ({snip / n:.0%})\n  templates: " +
            ", ".join(f"{t} {c}" for t, c in sorted(by_t.items(), key=lambda x: -x[1])) +
            "\n  answer words: " + ", ".join(f"{k}: {v}" for k, v in sorted(lens.items())))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="corpus JSONL (default: the embedded Wikipedia summaries)")
    ap.add_argument("--out_dir", default=str(ROOT / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_train", type=int, default=2200)
    ap.add_argument("--n_dev", type=int, default=250)
    ap.add_argument("--k", type=int, default=5, help="top-k articles of the answerability check")
    ap.add_argument("--two_hop_frac", type=float, default=0.2, help="share of two-hop questions")
    ap.add_argument("--max_share", type=float, default=0.1, help="most questions one template may have (share)")
    a = ap.parse_args(argv)
    if a.corpus is None:
        from wiki_corpus import default_corpus_path
        a.corpus = default_corpus_path()
    out = build(a.corpus, a.n_train, a.n_dev, a.seed, a.k, a.two_hop_frac, a.max_share)
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    for split, rows in out.items():
        path = Path(a.out_dir) / f"qa_{split}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
        print(f"{path}: {summary(rows)}")


if __name__ == "__main__":
    main()
