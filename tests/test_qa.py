"""data/build_qa.py (the offline QA set): templates, the answerability check, determinism, and the committed splits.

Run: python -m pytest -x -q tests/test_qa.py     (CPU, offline, a few seconds: the search index is a tiny temp corpus)
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import build_qa  # noqa: E402
from reward import normalize  # noqa: E402


def art(id_, description, text, topic=""):
    return dict(id=id_, title=id_.replace("_", " "), description=description, text=text, topic=topic)


ARTICLES = [
    art("Peru", "Country in South America", "Peru is a country in western South America. Its capital and largest "
        "city is Lima. Peru has a population of over 32 million and borders Chile, Bolivia and Brazil."),
    art("Chile", "Country in South America", "Chile is a country in western South America. Its capital and largest "
        "city is Santiago. It is a long and narrow country between the Andes and the Pacific Ocean."),
    art("Lima", "Capital and largest city of Peru", "Lima is the capital and largest city of Peru. It is located in "
        "the valleys of the Chillon, Rimac and Lurin rivers, in the desert zone of the central coastal part."),
    art("Cusco", "City in southern Peru", "Cusco is a city in southeastern Peru, near the Sacred Valley of the Andes "
        "mountain range. It was the capital of the Inca Empire from the 13th century until the 16th century."),
    art("Bertolt_Brecht", "German playwright and poet (1898–1956)", "Bertolt Brecht was a German theatre "
        "practitioner, playwright, and poet. He wrote The Threepenny Opera in Berlin.", topic="People"),
    art("Jane_Austen", "English novelist (1775–1817)", "Jane Austen was an English novelist known for her six major "
        "novels, which critique the British landed gentry at the end of the 18th century.", topic="People"),
    art("Pride_and_Prejudice", "1813 novel by Jane Austen", "Pride and Prejudice is a novel by English author Jane "
        "Austen. It was published in 1813 and follows Elizabeth Bennet."),
    art("Gold", "Chemical element with atomic number 79 (Au)", "Gold is a chemical element; its chemical symbol is "
        "Au and atomic number 79. It is a bright, dense, soft, malleable and ductile metal."),
    art("Mount_Everest", "Highest mountain on Earth", "Mount Everest is the highest mountain on Earth above sea "
        "level, located in the Mahalangur Himal sub-range of the Himalayas."),
    art("Botany", "Study of plant life", "Botany, also called plant science, is the branch of natural science and "
        "biology studying plants, especially their anatomy, taxonomy, and ecology."),
    art("Ming_dynasty", "Imperial dynasty of China (1368–1644)", "The Ming dynasty was an imperial dynasty of China "
        "that ruled from 1368 to 1644. Its emperors were of the Zhu family; he who founded it was a peasant."),
    art("Amazon_River", "River in Peru, Colombia and Brazil", "The Amazon River in South America is the largest "
        "river by discharge volume of water in the world."),
    art("Symphony_No._9_(Beethoven)", "1824 symphony by Ludwig van Beethoven", "The Symphony No. 9 is the final "
        "complete symphony by Ludwig van Beethoven, composed between 1822 and 1824."),
    art("Hertz", "SI unit of frequency", "The hertz is the unit of frequency in the International System of Units, "
        "equivalent to one event per second."),
]


def questions(recs):
    return {f["q"]: f for f in build_qa.candidates(recs)}


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_CACHE_DIR", str(tmp_path / "cache"))  # the BM25 index of this corpus is built here
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({**a, "url": f"https://en.wikipedia.org/wiki/{a['id']}"}) + "\n"
                            for a in ARTICLES), encoding="utf-8")
    return str(path)


def test_templates_on_hand_written_articles():
    qs = questions(ARTICLES)
    expect = {
        "Which German playwright and poet lived from 1898 to 1956?": (["Bertolt Brecht"], "person_who"),
        "In what year was Bertolt Brecht born?": (["1898"], "born_year"),
        "In what year did Jane Austen die?": (["1817"], "died_year"),
        "What is the capital of Peru?": (["Lima"], "capital"),
        "What is the capital of Chile?": (["Santiago"], "capital"),  # from the country's own text
        "In which country is Cusco?": (["Peru"], "place_country"),
        "On which continent is Chile?": (["South America"], "continent"),
        "Who wrote the novel Pride and Prejudice?": (["Jane Austen"], "work_creator"),
        "In what year was the novel Pride and Prejudice published?": (["1813"], "work_year"),
        "What is the atomic number of gold?": (["79"], "element_number"),
        "What is the chemical symbol of gold?": (["Au"], "element_symbol"),
        "What is the highest mountain on Earth?": (["Mount Everest"], "superlative"),
        "What is the study of plant life called?": (["Botany"], "study_of"),
        "What is the SI unit of frequency?": (["Hertz"], "si_unit"),
        # two hops: the answer of hop 1 is the subject of hop 2
        "What is the capital of the country where Cusco is located?": (["Lima"], "country_capital"),
        "On which continent is the country where Cusco is located?": (["South America"], "country_continent"),
        "In what year was the author of the novel Pride and Prejudice born?": (["1775"], "creator_born"),
    }
    for q, (answers, template) in expect.items():
        assert q in qs, q
        assert (qs[q]["a"], qs[q]["t"]) == (answers, template)
    two = qs["In what year was the author of the novel Pride and Prejudice born?"]
    assert two["hops"] == 2 and two["bridge"] == "Jane Austen"
    assert [s[0] for s in two["steps"]] == ["Who wrote the novel Pride and Prejudice?",
                                            "In what year was Jane Austen born?"]
    # what the templates must NOT produce
    assert not any("Ming" in q for q in qs)               # years of a dynasty are not a life
    assert not any("Amazon" in q for q in qs)             # a river of three countries has no single country
    assert not any("Symphony No. 9" in q for q in qs)     # "(Beethoven)" disambiguates: the bare title is ambiguous
    assert "What is the capital of Lima?" not in qs
    for f in qs.values():                                  # short answers, never given away by the question
        assert 1 <= build_qa.n_words(f["a"][0]) <= 4 and not build_qa.gives_away(f["q"], f["a"])


def test_gives_away():
    assert build_qa.gives_away("In which country is Lake Nicaragua?", ["Nicaragua"])
    assert build_qa.gives_away("What is the capital of Mexico?", ["Mexico City"])  # a shared content word earns F1
    assert not build_qa.gives_away("What is the capital of Peru?", ["Lima"])
    assert build_qa.gives_away("What is the capital of Peru?", ["..."])  # normalises to nothing
    assert build_qa.gives_away("In which country are the Ethiopian Highlands?", ["Ethiopia"])  # a stem counts too


def test_answerability_check(corpus):
    check = build_qa.Checker(corpus, k=3)
    try:
        qs = questions(ARTICLES)
        good = qs["What is the highest mountain on Earth?"]
        assert build_qa.verify(good, check) == ["Mount_Everest"]
        assert check.support(good["q"], ["Mount Everest"]) == "Mount_Everest"
        # the answer exists in the corpus ("Santiago", in Chile) but in none of the top-k articles for this query
        assert not any(check.contains(d, ["Santiago"]) for d in check.top_ids(good["q"]))
        assert build_qa.verify({**good, "a": ["Santiago"], "steps": [(good["q"], ["Mount_Everest"], ["Santiago"])]},
                               check) is None
        assert check.support(good["q"], ["Santiago"]) is None
        # the answer is in a top-k article, but not in the one that states the fact: rejected too
        far = build_qa.fact("place_country", "Which river has the largest discharge?", ["Peru"], "Cusco")
        assert build_qa.verify(far, check) is None
        # answers match whole words of the page, description included ("(1898–1956)" holds 1898)
        born = qs["In what year was Bertolt Brecht born?"]
        assert build_qa.verify(born, check) == ["Bertolt_Brecht"]
        assert not check.contains("Bertolt_Brecht", ["189"])
        # a question that gives its answer away is rejected whatever the search finds
        given = build_qa.fact("capital", "Is Lima the capital of Peru?", ["Lima"], "Lima")
        assert build_qa.verify(given, check) is None
        # two hops: each hop's own question finds its article, and the whole question finds hop 1's article
        two = qs["In what year was the author of the novel Pride and Prejudice born?"]
        assert build_qa.verify(two, check) == ["Pride_and_Prejudice", "Jane_Austen"]
        bad_hop2 = {**two, "steps": [two["steps"][0], (two["steps"][1][0], ["Jane_Austen"], ["1812"])]}
        assert build_qa.verify({**bad_hop2, "a": ["1812"]}, check) is None
        # not really two hops when hop 1's article already holds the final answer ("1813" is in the novel's page)
        short_cut = {**two, "a": ["1813"], "steps": [two["steps"][0], (two["steps"][1][0], ["Jane_Austen"], ["1813"])]}
        assert build_qa.verify(short_cut, check) is None
    finally:
        check.close()


def test_build_is_deterministic(corpus):
    quiet = dict(log=lambda *a: None, dev_frac=0.3)
    a = build_qa.build(corpus, n_train=8, n_dev=3, seed=3, **quiet)
    b = build_qa.build(corpus, n_train=8, n_dev=3, seed=3, **quiet)
    assert a == b and len(a["train"]) >= 5
    rows = a["train"] + a["dev"]
    assert all(set(r) >= {"id", "source", "question", "answers", "hops", "support", "in_snippet"} for r in rows)
    dev_docs = {d for r in a["dev"] for d in r["support"]}
    assert not dev_docs & {d for r in a["train"] for d in r["support"]}


def _load(name):
    return [json.loads(x) for x in open(ROOT / "data" / name, encoding="utf-8")]


def test_committed_splits():
    train, dev = _load("qa_train.jsonl"), _load("qa_dev.jsonl")
    assert len(train) >= 2000 and len(dev) >= 200
    for r in train + dev:
        assert set(r) >= {"id", "source", "question", "answers", "hops", "support", "template", "in_snippet"}
        assert r["source"] == f"wiki_offline_{r['hops']}hop" and r["hops"] in (1, 2)
        assert len(r["support"]) == r["hops"] and all(isinstance(s, str) and s for s in r["support"])
        assert r["answers"] and all(normalize(a) for a in r["answers"])
        assert 1 <= len(normalize(r["answers"][0]).split()) <= 4
        q = f" {normalize(r['question'])} "
        assert all(f" {normalize(a)} " not in q for a in r["answers"]), r
        if r["hops"] == 2:
            assert len(r["hop_questions"]) == 2 and not build_qa.gives_away(r["question"], [r["bridge"]])
    assert len({r["id"] for r in train + dev}) == len(train) + len(dev)
    assert not {r["question"] for r in train} & {r["question"] for r in dev}
    # disjoint articles: no dev question uses an article that a training question uses
    assert not {s for r in train for s in r["support"]} & {s for r in dev for s in r["support"]}
    for rows in (train, dev):
        assert sum(r["hops"] == 1 for r in rows) / len(rows) >= 0.7 and any(r["hops"] == 2 for r in rows)
    for name in ("qa_train.jsonl", "qa_dev.jsonl"):
        assert (ROOT / "data" / name).stat().st_size < 800_000  # small enough to commit
