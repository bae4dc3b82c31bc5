"""data/build_qa.py (the offline QA set) and the committed splits. Run: pytest tests/test_qa.py -q"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import build_qa  # noqa: E402
from reward import normalize  # noqa: E402

ARTICLES = [
    dict(id="Lima", title="Lima", description="Capital and largest city of Peru",
         text="Lima is the capital and largest city of Peru. It is located in the valleys of the Chillon, Rimac and "
              "Lurin rivers, in the desert zone of the central coastal part of the country."),
    dict(id="Peru", title="Peru", description="Country in South America",
         text="Peru is a country in western South America. Its capital and largest city is Lima. Peru has a "
              "population of over 32 million."),
    dict(id="Chile", title="Chile", description="Country in South America",
         text="Chile is a country in western South America. Its capital and largest city is Santiago."),
    dict(id="Cusco", title="Cusco", description="City in Peru",
         text="Cusco is a city in southeastern Peru, near the Sacred Valley of the Andes mountain range."),
    dict(id="Bertolt_Brecht", title="Bertolt Brecht", description="German playwright and poet (1898–1956)",
         text="Bertolt Brecht was a German theatre practitioner, playwright, and poet of the Weimar Republic."),
    dict(id="Mount_Everest", title="Mount Everest", description="Highest mountain on planet Earth",
         text="Mount Everest is the highest mountain on Earth above sea level, in the Himalayas."),
    dict(id="Kiwi", title="Kiwi", description="Flightless bird native to New Zealand",
         text="Kiwi are flightless birds endemic to New Zealand, about the size of a domestic chicken."),
]


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_CACHE_DIR", str(tmp_path / "cache"))  # the BM25 index of this corpus lives here
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({**a, "url": f"https://en.wikipedia.org/wiki/{a['id']}"}) + "\n"
                            for a in ARTICLES))
    return str(path)


def test_templates_on_hand_written_articles(corpus):
    facts, capital = build_qa.candidates([json.loads(x) for x in open(corpus)])
    qa = {(f["t"], f["q"]): f["a"] for f in facts}
    assert qa[("who", "Who was the German playwright and poet born in 1898?")] == "Bertolt Brecht"
    assert qa[("what", "What is the highest mountain on planet Earth?")] == "Mount Everest"
    assert qa[("country", "In which country is Cusco?")] == "Peru"
    assert qa[("capital", "What is the capital of the country where Cusco is located?")] == "Lima"
    assert capital == {"Peru": "Lima", "Chile": "Santiago"}
    # the plural-looking description "Flightless bird ..." is fine; countries are never "what" answers
    assert not any(f["a"] in ("Peru", "Chile") and f["t"] == "what" for f in facts)


def test_answerability_check(corpus):
    check = build_qa.Checker(corpus, k=2)
    good = dict(t="what", q="What is the highest mountain on planet Earth?", a="Mount Everest", doc="Mount_Everest")
    assert build_qa.verify(good, check) == ["Mount_Everest"]
    # the answer is in the corpus, but not in what the search returns for this query: rejected
    far = dict(t="country", q="Which bird cannot fly?", a="Santiago", doc="Kiwi")
    assert build_qa.verify(far, check) is None
    # the described article must itself come up for who/what questions, not merely some article with the title
    wrong_doc = dict(t="what", q="What is the capital and largest city of Peru?", a="Lima", doc="Kiwi")
    assert build_qa.verify(wrong_doc, check) is None
    # an answer given away by the question is rejected
    assert build_qa.verify(dict(t="country", q="Is Lima in Peru?", a="Peru", doc="Lima"), check) is None
    # two hops: each hop's answer must be found by its own query
    two = dict(t="capital", q="What is the capital of the country where Cusco is located?", a="Lima",
               doc="Cusco", hop1="Peru", doc2="Peru")
    support = build_qa.verify(two, check)
    assert support is not None and support[1] == "Peru"
    assert "Peru" in next(a["text"] for a in ARTICLES if a["id"] == support[0])
    assert build_qa.verify({**two, "a": "Santiago"}, check) is None  # Santiago is not what "capital of Peru" finds


def test_build_is_deterministic(corpus):
    a = build_qa.build(corpus, n_train=5, n_dev=5, seed=3)
    b = build_qa.build(corpus, n_train=5, n_dev=5, seed=3)
    assert a == b and sum(map(len, a.values())) >= 3


def _load(name):
    return [json.loads(x) for x in open(ROOT / "data" / name, encoding="utf-8")]


def test_committed_splits():
    train, dev = _load("qa_train.jsonl"), _load("qa_dev.jsonl")
    assert len(train) >= 2000 and len(dev) >= 200
    for r in train + dev:
        assert set(r) >= {"id", "source", "question", "answers", "hops", "support"}
        assert r["source"] in ("wiki_offline_1hop", "wiki_offline_2hop") and r["hops"] in (1, 2)
        assert r["answers"] and all(a.strip() for a in r["answers"])
        assert normalize(r["answers"][0]) not in normalize(r["question"])
        assert len(r["support"]) == r["hops"]
    assert len({r["id"] for r in train + dev}) == len(train) + len(dev)
    assert not {r["question"] for r in train} & {r["question"] for r in dev}
    # split by the article a question is about: no dev question is about a training question's article
    assert not {r["support"][0] for r in train if r["hops"] == 1} & {r["support"][0] for r in dev if r["hops"] == 1}
    assert sum(r["hops"] == 1 for r in train) / len(train) >= 0.7 and any(r["hops"] == 2 for r in dev)


# ------------------------------------------------------------------------------------------ the research set (issue 21)

TOPICS = {"Bertolt_Brecht": "People", "Cusco": "Geography", "Lima": "Geography"}


@pytest.fixture()
def research_corpus(tmp_path, monkeypatch):
    """The hand-written articles with the Wikipedia topics the research kinds read (people, places)."""
    monkeypatch.setenv("DR_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({**a, "topic": TOPICS.get(a["id"], "Uncategorized"),
                                        "url": f"https://en.wikipedia.org/wiki/{a['id']}"}) + "\n"
                            for a in ARTICLES))
    return str(path)

def test_policy_view_matches_train_defaults():
    """The checks must see what the default agent sees: train.py's search settings."""
    import train
    cfg = train.Config()
    assert (cfg.top_k, cfg.snippet_chars, cfg.obs_chars) == (build_qa.POLICY_TOP_K, build_qa.POLICY_SNIPPET_CHARS,
                                                             build_qa.POLICY_OBS_CHARS)


def test_visible_and_creator_parsing():
    assert build_qa.visible("John Milton (1608–1674) was", "1608")
    assert not build_qa.visible("in 16080 BC", "1608")
    assert build_qa.visible("the Capital of PERU.", "capital of peru")
    by = "by the Macedonian Greek general Ptolemy I Soter, in 305 BC"
    assert build_qa._creator(by, 3) == "Ptolemy I Soter"
    assert build_qa._creator("by D. W. Griffith and starring Lillian Gish", 3) == "D. W. Griffith"
    assert build_qa._creator("by HBO for cable", 3) is None  # one word is not a person's name


def test_research_checks_on_hand_written_articles(research_corpus):
    corpus = research_corpus
    recs = [json.loads(x) for x in open(corpus)]
    by_id = {r["id"]: r for r in recs}
    cands, _ = build_qa.research_candidates(recs, build_qa.random.Random(0))
    found = {(c["template"], c["kind"], c["q"]): c for c in cands}
    read = found[("read", "nationality", "What nationality was Bertolt Brecht?")]
    assert read["a"] == "German"
    bridge = found[("bridge", "capital", "What is the capital of the country where Cusco is located?")]
    assert (bridge["a"], bridge["bridge"]) == ("Lima", "Peru")
    web = build_qa.PolicyWeb(corpus)
    try:
        support, queries, why = build_qa.check_research(read, web, by_id)
        assert (support, queries, why) == (["Bertolt_Brecht"], ["Bertolt Brecht"], "")
        # the answer given away by the question is rejected
        leaked = {**read, "q": "Was Bertolt Brecht German?"}
        assert build_qa.check_research(leaked, web, by_id)[2] == "answer in question"
        # an answer the oracle's search never shows is rejected
        unseen = {**read, "a": "Danish"}
        assert build_qa.check_research(unseen, web, by_id)[0] is None
        # on 7 articles the question's own search puts Lima first: the first-title heuristic answers it, rejected
        assert build_qa.check_research(bridge, web, by_id) == (None, [], "first title answers")
    finally:
        web.close()


def test_research_build_is_deterministic(research_corpus):
    corpus = research_corpus
    a = build_qa.build_research(corpus, [], [], seed=1)
    b = build_qa.build_research(corpus, [], [], seed=1)
    assert a == b and any(a[0].values())


def test_research_train_exclude(research_corpus):
    """train_exclude drops a kind from the training split only; a name that is no kind of the build stops."""
    full, _ = build_qa.build_research(research_corpus, [], [], seed=1, dev_frac=0.0)
    less, _ = build_qa.build_research(research_corpus, [], [], seed=1, dev_frac=0.0,
                                      train_exclude=("bridge/continent",))
    assert {r["kind"] for r in full["train"]} == {"continent", "nationality"}
    assert [r["question"] for r in less["train"]] == [r["question"] for r in full["train"] if r["kind"] != "continent"]
    with pytest.raises(ValueError, match="bridge/contnent"):
        build_qa.build_research(research_corpus, [], [], seed=1, train_exclude=("bridge/contnent",))


@pytest.mark.slow
def test_research_train_exclude_leaves_dev_as_committed():
    """On the embedded corpus, leaving the continent bridges out of training (the eighth session's probe) builds the
    committed dev file unchanged, so the probe's agent is measured on the same questions."""
    from data.wiki_corpus import default_corpus_path
    out, _ = build_qa.build_research(str(default_corpus_path()), _load("qa_train.jsonl"), _load("qa_dev.jsonl"),
                                     max_per_kind={"train": 150, "dev": 80}, train_exclude=("bridge/continent",))
    assert out["dev"] == _load("qa_dev_research.jsonl")
    assert not any(r.get("kind") == "continent" for r in out["train"])
    assert sum(r.get("kind") == "capital" for r in out["train"]) > 50


def _named(r):
    """The articles a question is about: the compared pair, else the article it names."""
    return r["support"][:2] if r["template"] == "comparison" else r["support"][:1]


def test_committed_research_splits():
    train, dev = _load("qa_train_research.jsonl"), _load("qa_dev_research.jsonl")
    research_train = [r for r in train if r["source"] == build_qa.RESEARCH_SOURCE]
    single = [r for r in train if r["source"] != build_qa.RESEARCH_SOURCE]
    assert len(dev) >= 300 and len(train) >= 1500
    per_template = {t: sum(r["template"] == t for r in dev) for t in ("bridge", "comparison", "read")}
    assert min(per_template.values()) >= 80, per_template
    assert 2.5 <= len(research_train) / len(single) <= 3.5  # about 3 research : 1 single-hop
    assert all(r["hops"] == 1 for r in single)
    # half of the single-hop ones are questions the shortcut answers: answering a title is sometimes right
    assert 0.4 <= sum(r["first_title_answers"] for r in single) / len(single) <= 0.6
    for r in research_train + dev:
        assert set(r) >= {"id", "source", "question", "answers", "hops", "template", "kind", "support",
                          "oracle_queries"}
        answer = r["answers"][0]
        if r["template"] == "comparison":
            assert answer in r["question"] and len(r["years"]) == len(r["oracle_queries"]) == r["hops"]
        else:
            assert not build_qa.visible(r["question"], answer)
        if r["template"] == "bridge":
            assert not build_qa.visible(r["question"], r["bridge"]) and len(r["oracle_queries"]) == 2
            assert not any(build_qa.visible(q, answer) for q in r["oracle_queries"])
    assert len({r["id"] for r in train + dev}) == len(train) + len(dev)
    # split by article: no dev question names an article a training question names, nor one of qa_train.jsonl's
    train_articles = {a for r in train for a in _named(r)}
    train_articles |= {r["support"][0] for r in _load("qa_train.jsonl") if r["hops"] == 1}
    assert not train_articles & {a for r in dev for a in _named(r)}
    # and training on the research mix leaves data/qa_dev.jsonl's articles unseen, so that table stays comparable
    old_dev_articles = {r["support"][0] for r in _load("qa_dev.jsonl") if r["hops"] == 1}
    assert not {a for r in train for a in _named(r)} & old_dev_articles


@pytest.mark.slow
def test_committed_research_acceptance():
    """On the committed files, through the policy's own search: the first title never answers (F1 < 0.5), for dev
    and for every training question but the single-hop ones marked first_title_answers (where it always does); no
    dev read or bridge answer is a top-3 title; the oracle sees every fact."""
    from data.wiki_corpus import default_corpus_path
    from reward import f1
    train, dev = _load("qa_train_research.jsonl"), _load("qa_dev_research.jsonl")
    web = build_qa.PolicyWeb(str(default_corpus_path()))
    try:
        for r in train + dev:
            shown, _ = web.search(r["question"])
            assert (f1(shown[0]["title"], r["answers"]) >= 0.5) == r.get("first_title_answers", False), r
        for r in dev + [r for r in train if r["source"] == build_qa.RESEARCH_SOURCE]:
            shown, _ = web.search(r["question"])
            if r["template"] != "comparison":
                assert all(f1(s["title"], r["answers"]) < 0.5 for s in shown), r
            assert build_qa.oracle_sees(r, web), r
    finally:
        web.close()
