"""eval.py: scoring and summaries, resume after an interruption, score-only with a judge, the tiny preset end to end.

The agent is faked in most tests (a scripted rollout) so they check eval.py's own logic fast; the last test runs the
real tiny preset (rollout + browse + model) when those files are importable."""

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import browse
import eval as ev
import train
from rollout import question_first_plan
from test_train import use_agent

DEV = Path(__file__).resolve().parents[2] / "shared" / "held_out_data" / "dev.parquet"
needs_dev = pytest.mark.skipif(not DEV.exists(), reason="../shared/held_out_data/dev.parquet not present")


@dataclass
class FakeTurn:
    text: str
    tool: str | None = None
    args: dict | None = None
    observation: str | None = None
    error: str | None = None
    n_tokens: int = 3
    gen_s: float = 0.0
    tool_s: float = 0.0


@dataclass
class FakeTraj:
    question: str
    group: int
    turns: list
    answer: str | None
    end_reason: str = "answer"
    tokens: list = field(default_factory=lambda: [1, 2, 3])
    loss_mask: list = field(default_factory=lambda: [0, 1, 1])
    logprobs: list = field(default_factory=lambda: [0.0, -0.5, -0.25])
    prompt_len: int = 1
    stats: dict = field(default_factory=dict)


def gold_lookup() -> dict:
    """question -> gold answers, over the held-out dev file (when present) and the repo's offline QA files."""
    from data.prepare import load_examples

    root = Path(ev.__file__).resolve().parent
    paths = [root / "data" / "qa_train.jsonl", root / "data" / "qa_dev.jsonl"] + ([DEV] if DEV.exists() else [])
    return {row["question"]: row["answers"] for path in paths for row in load_examples(path)}


class FakeAgent:
    """Scripted agent: searches once, then answers the first gold for even questions and "no idea" for odd ones;
    every 5th question never answers (format error). The observation holds stray tags (must not be checked)."""

    def __init__(self, fail_after: int | None = None):
        self.seen: list[str] = []
        self.fail_after = fail_after

    def rollout(self, model, tokenizer, questions, browser, cfg, group_size=1, seed=0):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        # rollout() gets no gold answers (the caller scores); this scripted agent looks them up in the data files
        golds = gold_lookup()
        out = []
        for q in questions:
            g = golds[q]
            i = len(self.seen)
            self.seen.append(q)
            search = FakeTurn("<think>look</think><search>q</search>", tool="web_search", args={"query": [q]},
                              observation="page says </think> <answer>junk")
            if i % 5 == 4:
                final = FakeTurn("<think>hmm</think>")
            else:
                final = FakeTurn(f"<think>ok</think><answer>{g[0] if i % 2 == 0 else 'no idea'}</answer>")
            out.append(FakeTraj(q, len(out), [search, final], None, stats={"n_search": 1, "n_browse": 0}))
        return out


@dataclass
class FakeRolloutConfig:
    protocol: str = "tags"
    max_turns: int = 10
    max_new_tokens: int = 512
    max_len: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    n_slots: int = 64
    on_bad_call: str = "error_observation"
    date: str | None = None


@dataclass
class FakeBrowseConfig:
    backend: str = "local"
    top_k: int = 10
    corpus: str | None = None
    cache: str | None = None
    cache_mode: str = "replay_or_live"
    reader: str = "extract"


class FakeBrowser:
    def __init__(self, cfg):
        self.cfg = cfg

    def close(self):
        pass


@pytest.fixture
def fake_agent(monkeypatch):
    agent = FakeAgent()
    use_agent(monkeypatch, lambda: (agent.rollout, FakeRolloutConfig, FakeBrowser, FakeBrowseConfig), ev)
    return agent


def make_cfg(tmp_path, **kw):
    cfg = ev.parse_config(ev.Config, ["--preset=tiny", f"--data={DEV}", f"--out_dir={tmp_path / 'out'}"], ev.PRESETS)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_parse_config():
    cfg = ev.parse_config(ev.Config, ["--preset=tiny", "--limit=3", "--temperature=0.5", "--score_only=true"],
                          ev.PRESETS)
    assert (cfg.model, cfg.limit, cfg.temperature, cfg.score_only) == ("tiny", 3, 0.5, True)
    with pytest.raises(SystemExit):
        ev.parse_config(ev.Config, ["--nope=1"], ev.PRESETS)
    with pytest.raises(SystemExit):
        ev.parse_config(ev.Config, ["--limit=abc"], ev.PRESETS)


def test_summarize_hand_checked():
    def rec(source, turns, gold):
        n_search = sum(x["tool"] == "web_search" for x in turns)
        r = {"id": source + str(len(turns)), "source": source, "question": "q", "gold": gold, "turns": turns,
             "stats": {"n_search": n_search, "n_browse": 0}}
        r["scores"] = ev.score_record(r)
        return r

    t = lambda text, tool=None: {"text": text, "tool": tool}  # noqa: E731
    recs = [rec("nq", [t("<search>x</search>", "web_search"), t("<answer>New York City</answer>")], ["New York"]),
            rec("nq", [t("<answer>The Beatles</answer>")], ["Beatles"]),
            rec("tq", [t("<think>no answer")], ["Paris"])]
    m = ev.summarize(recs)
    assert m["nq"]["n"] == 2 and m["nq"]["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["nq"]["squad_em"] == pytest.approx(0.5)        # "The Beatles" == "Beatles" without articles
    assert m["nq"]["em"] == 0.0 and m["nq"]["mean_tool_calls"] == pytest.approx(0.5)
    assert m["tq"]["format_error_rate"] == 1.0 and m["tq"]["f1"] == 0.0
    assert m["overall"]["n"] == 3 and m["overall"]["format_error_rate"] == pytest.approx(1 / 3)
    assert "mbe" not in m["overall"]


@needs_dev
def test_run_resume_and_crash(tmp_path, fake_agent, monkeypatch):
    cfg = make_cfg(tmp_path, limit=6, batch_size=4)
    s = ev.main(cfg)
    out = Path(cfg.out_dir)
    assert len(fake_agent.seen) == 6 and len(ev.load_records(out / "trajectories.jsonl")) == 6
    assert s["metrics"]["overall"]["n"] == 6 and s["meta"]["model"] == "tiny"
    # questions 0, 2: right; 1, 3, 5: wrong; 4: format error (observations' stray tags are ignored)
    assert s["metrics"]["overall"]["f1"] == pytest.approx(2 / 6)
    assert s["metrics"]["overall"]["format_error_rate"] == pytest.approx(1 / 6)
    md = (out / "summary.md").read_text()
    assert "**overall**" in md and "F1 (ref)" in md and "tq" in md
    # a longer run skips the 6 finished ids; it crashes after one more batch of 4 ...
    crashing = FakeAgent(fail_after=4)
    use_agent(monkeypatch, lambda: (crashing.rollout, FakeRolloutConfig, FakeBrowser, FakeBrowseConfig), ev)
    with pytest.raises(KeyboardInterrupt):
        ev.main(make_cfg(tmp_path, limit=14, batch_size=4))
    assert len(ev.load_records(out / "trajectories.jsonl")) == 10  # the finished batch was saved
    with open(out / "trajectories.jsonl", "a") as fh:  # ... and leaves a torn line behind
        fh.write('{"id": "torn", "sour')
    # ... then a restart runs only the last 4
    again = FakeAgent()
    use_agent(monkeypatch, lambda: (again.rollout, FakeRolloutConfig, FakeBrowser, FakeBrowseConfig), ev)
    s = ev.main(make_cfg(tmp_path, limit=14, batch_size=4))
    assert len(again.seen) == 4 and s["metrics"]["overall"]["n"] == 14
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 14 and all(json.loads(x)["id"] != "torn" for x in lines)
    # a smaller limit afterwards runs nothing and summarises only its own questions
    s = ev.main(make_cfg(tmp_path, limit=3))
    assert s["metrics"]["overall"]["n"] == 3


class Judge200(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"content": '{"rationale": "r", "judgement": "correct"}'}}]})
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@needs_dev
def test_score_only_with_judge(tmp_path, fake_agent):
    cfg = make_cfg(tmp_path, limit=5)
    ev.main(cfg)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge200)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg2 = ev.parse_config(ev.Config, [f"--out_dir={cfg.out_dir}", "--score_only=true",
                                           f"--judge_base_url=http://127.0.0.1:{srv.server_address[1]}/v1"],
                               ev.PRESETS)
        s = ev.main(cfg2)
    finally:
        srv.shutdown()
        srv.server_close()
    # 2 exact, 2 wrong-but-judged-correct by the fake, 1 format error (incorrect without a call)
    assert s["metrics"]["overall"]["mbe"] == pytest.approx(4 / 5) and s["metrics"]["overall"]["n_unjudged"] == 0
    assert s["meta"]["judge_model"] == "gpt-4o-mini" and s["meta"]["model"] == "tiny"
    assert "MBE" in (Path(cfg.out_dir) / "summary.md").read_text()


@needs_dev
def test_tiny_preset_end_to_end(tmp_path):
    cfg = make_cfg(tmp_path, limit=14)
    s = ev.main(cfg)
    m = s["metrics"]
    assert m["overall"]["n"] == 14 and len(m) >= 3
    for row in m.values():
        assert row["f1"] is not None and row["em"] is not None
    recs = ev.load_records(Path(cfg.out_dir) / "trajectories.jsonl")
    assert len(recs) == 14 and all(r["turns"] for r in recs)


# ----------------------------------------------------------------------------------------------- data/prepare.py

@needs_dev
def test_prepare_reads_reference_parquet_and_jsonl(tmp_path):
    from data.prepare import Config, load_examples, main

    exs = load_examples(DEV)
    assert len(exs) == 875 and set(exs[0]) == {"id", "source", "question", "answers", "template", "bridge", "oracle_queries"}
    assert {e["source"] for e in exs} == {"nq", "tq", "hotpotqa", "2wiki", "musique", "Bamboogle", "popqa"}
    tq = next(e for e in exs if e["id"] == "tq_qg_3477")
    assert "turkey" in tq["answers"] and tq["question"].startswith("Lasting from 1299")
    out = tmp_path / "dev.jsonl"
    main(Config(src="parquet", input=str(DEV), out=str(out), limit=5))
    again = load_examples(out)
    assert again == exs[:5]
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "question": "q", "answers": ["x"]}\n' * 2)
    with pytest.raises(ValueError, match="duplicate"):
        load_examples(tmp_path / "dup.jsonl")


def test_contamination_filter(monkeypatch):
    import sys
    import types

    from data.prepare import contains_gold, contaminated

    assert contains_gold("It is Paris, of course.", ["paris"])
    assert not contains_gold("Parisian food", ["Paris"])        # whole words only
    assert not contains_gold("anything", [""])

    class Tok:
        eos_token_id = 0

        def apply_chat_template(self, msgs, add_generation_prompt, tokenize):
            return [len(msgs[0]["content"])]

        def decode(self, ids, skip_special_tokens=True):
            return {1: "I think Paris", 2: "no clue"}[ids[0]]

    calls = []

    def fake_generate(model, prompts, max_new_tokens, temperature=1.0, stop_token_ids=(), seed=0, **kw):
        calls.append(len(prompts))
        # question 0's second sample names the gold; question 1 never does
        return [[1] if i == 1 else [2] for i in range(len(prompts))]

    monkeypatch.setitem(sys.modules, "rollout", types.SimpleNamespace(generate=fake_generate))
    exs = [{"question": "Capital of France?", "answers": ["Paris"]}, {"question": "Capital of Peru?",
                                                                      "answers": ["Lima"]}]
    assert contaminated(None, Tok(), exs, k=2) == [True, False] and calls == [4]


@needs_dev
@pytest.mark.slow
def test_torchrun_two_ranks_share_the_work(tmp_path):
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    script = tmp_path / "run.py"
    script.write_text(f"""import sys
sys.path[:0] = [{str(tests.parent)!r}, {str(tests)!r}]
import eval as ev
import test_eval as te
from test_train import AGENT_NAMES
agent = te.FakeAgent()
for name, value in zip(AGENT_NAMES, (agent.rollout, te.FakeRolloutConfig, te.FakeBrowser, te.FakeBrowseConfig)):
    setattr(ev, name, value)
ev.main(ev.parse_config(ev.Config, sys.argv[1:], ev.PRESETS))
print("SEEN", len(agent.seen), flush=True)
""")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--preset=tiny", f"--data={DEV}", "--limit=7", "--batch_size=2", f"--out_dir={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tests.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = sorted(int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("SEEN"))
    assert seen == [3, 4]                                    # rank 0: ids 0,2,4,6; rank 1: ids 1,3,5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["overall"]["n"] == 7


class StubSession:
    def web_search(self, queries):
        return "1. Stub page\nhttps://example.org/a\nA page that mentions <answer>Paris</answer> in its text."

    def browse_webpage(self, urls):
        return "Nothing relevant."


class StubBrowser:
    """The Browser interface (session(question), close()) without any web: for the real agent loop."""

    def __init__(self, cfg=None):
        self.cfg = cfg

    def session(self, question):
        return StubSession()

    def close(self):
        pass


@needs_dev
def test_real_agent_loop_with_stub_browser(tmp_path, monkeypatch):
    from rollout import RolloutConfig, rollout
    use_agent(monkeypatch, lambda: (rollout, RolloutConfig, StubBrowser, FakeBrowseConfig), ev)
    cfg = make_cfg(tmp_path, limit=4, batch_size=4)
    s = ev.main(cfg)
    assert s["metrics"]["overall"]["n"] == 4
    recs = ev.load_records(Path(cfg.out_dir) / "trajectories.jsonl")
    assert all(r["turns"] and "scores" in r for r in recs)


def test_agent_baselines_through_the_same_harness(tmp_path):
    """--agent=first_title answers the first result's title of the real local search (no model), scored and summarised
    per template like any agent; --agent=closed_book runs the model in one turn with no tool call."""
    from browse import BrowseConfig, Browser

    qs = ["What is the capital of Peru?", "Who painted the Mona Lisa?"]
    browser = Browser(BrowseConfig(backend="local", top_k=3))
    try:
        firsts = [browser.backend.search([q])[0][0].title for q in qs]
    finally:
        browser.close()
    data = tmp_path / "qa.jsonl"
    rows = [dict(id="a", source="s", question=qs[0], answers=[firsts[0]], template="capital"),
            dict(id="b", source="s", question=qs[1], answers=["not a title at all"], template="who")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = ev.main(make_cfg(tmp_path, agent="first_title", data=str(data), out_dir=str(tmp_path / "ft")))
    recs = {r["id"]: r for r in ev.load_records(tmp_path / "ft" / "trajectories.jsonl")}
    assert [recs[i]["answer"] for i in "ab"] == firsts
    assert recs["a"]["scores"]["f1"] == 1.0 and recs["b"]["scores"]["f1"] == 0.0
    assert s["metrics"]["template: capital"]["f1"] == 1.0 and s["metrics"]["overall"]["f1"] == 0.5
    assert s["meta"]["agent"] == "first_title" and recs["a"]["turns"][0]["observation"].count("localweb") == 3
    s = ev.main(make_cfg(tmp_path, agent="closed_book", data=str(data), out_dir=str(tmp_path / "cb")))
    recs = ev.load_records(tmp_path / "cb" / "trajectories.jsonl")
    assert len(recs) == 2 and all(len(r["turns"]) == 1 and not r["turns"][0]["tool"] for r in recs)
    assert s["meta"]["agent"] == "closed_book"


def test_oracle_agent_and_behaviour_counts(tmp_path):
    """--agent=oracle searches each supporting article (the data's oracle_queries) through the policy's own prompt and
    token framing, and answers the gold only when its searches showed it; the summary counts the behaviour: searches,
    a later query naming the bridge entity, answers that are a result's title."""
    rows = [dict(id="a", source="s", question="What nationality was the author of Hamlet?", answers=["English"],
                 template="bridge", bridge="William Shakespeare", oracle_queries=["Hamlet", "William Shakespeare"]),
            dict(id="b", source="s", question="What nationality was the author of Hamlet?", answers=["Zzyzxian"],
                 template="bridge", bridge="William Shakespeare", oracle_queries=["Hamlet", "William Shakespeare"])]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = ev.main(make_cfg(tmp_path, agent="oracle", data=str(data), out_dir=str(tmp_path / "or"), max_turns=3))
    recs = {r["id"]: r for r in ev.load_records(tmp_path / "or" / "trajectories.jsonl")}
    assert recs["a"]["answer"] == "English" and recs["a"]["scores"]["f1"] == 1.0
    assert recs["b"]["answer"] == "unknown" and recs["b"]["scores"]["f1"] == 0.0  # not seen: no guess
    for rec in recs.values():
        assert train.search_queries(rec["turns"]) == ["Hamlet", "William Shakespeare"]
        assert rec["scores"]["searched_twice"] and rec["scores"]["bridge_in_later_query"]
        # the exact token stream: the scripted turns are the policy-written (mask 1) tokens, nothing else is
        assert len(rec["tokens"]) == len(rec["loss_mask"]) == len(rec["logprobs"]) == rec["n_tokens"]
        assert 0 < sum(rec["loss_mask"]) < rec["n_tokens"] - rec["prompt_len"]
    row = s["metrics"]["template: bridge"]
    assert row["mean_search"] == 2.0 and row["bridge_in_later_query"] == 1.0 and row["answer_is_title"] == 0.0


class FakeSession:
    """browse.Session's search side for a scripted plan: each query's results as (title, snippet), in rank order."""

    def __init__(self, results: dict):
        self.results = results
        self.urls = {}

    def web_search(self, queries):
        shown = self.results.get(queries[0], [])
        self.urls = {f"http://localweb/wiki/{title}": SimpleNamespace(title=title) for title, _ in shown}
        return "\n".join(f"{title}: {snippet}" for title, snippet in shown)


def test_question_first_plan_searches_the_question_then_what_it_did_not_return():
    """rollout.question_first_plan: the question as it is first; then each supporting article no search returned
    (by title), and a bridge question's bridge entity whether or not it was returned; the gold only when shown."""
    question = "What nationality was the author of Hamlet?"
    bridge = dict(question=question, answers=["English"], bridge="William Shakespeare",
                  oracle_queries=["Hamlet", "William Shakespeare"])
    shakespeare = [("William Shakespeare", "an English playwright")]
    hamlet = [("Hamlet", "a tragedy by William Shakespeare"), ("Denmark", "a Nordic country")]
    # the question returns the first article: its search is skipped, the bridge entity's is not
    session = FakeSession({question: hamlet, "William Shakespeare": shakespeare})
    assert question_first_plan(bridge, session) == ([question, "William Shakespeare"], "English")
    # ... even where the question's results show the bridge entity's article and the answer already
    session = FakeSession({question: hamlet + shakespeare, "William Shakespeare": shakespeare})
    assert question_first_plan(bridge, session)[0] == [question, "William Shakespeare"]
    # the question misses the first article: both hops are searched
    session = FakeSession({question: [("Denmark", "a Nordic country")], "Hamlet": hamlet,
                           "William Shakespeare": shakespeare})
    assert question_first_plan(bridge, session) == ([question, "Hamlet", "William Shakespeare"], "English")
    # a comparison: only the names whose article the question's search did not return
    ask = "Which was founded first, Alpha, Beta or Gamma?"
    comparison = dict(question=ask, answers=["Alpha"], oracle_queries=["Alpha", "Beta", "Gamma"])
    session = FakeSession({ask: [("Beta", "founded in 1900"), ("Alpha", "founded in 1800")],
                           "Gamma": [("Gamma", "founded in 1950")]})
    assert question_first_plan(comparison, session) == ([ask, "Gamma"], "Alpha")
    # a single-hop question (its oracle query is the question itself): one search; the gold never shown: no guess
    single = dict(question="What is a young frog?", answers=["Tadpole"], oracle_queries=["What is a young frog?"])
    session = FakeSession({"What is a young frog?": [("Frog", "an amphibian")]})
    assert question_first_plan(single, session) == (["What is a young frog?"], "unknown")


def test_behaviour_hand_checked():
    """reward.behaviour (shared by eval's summary and train's metrics) on hand-made records, through eval's reading
    of a record: its queries, the titles browse.render_search showed, its bridge entity."""
    def rec(queries, observation, bridge=""):
        turns = [dict(text="", tool="web_search", args={"query": [q]}, observation=observation) for q in queries]
        return dict(turns=turns, stats={"n_search": len(queries)}, bridge=bridge)

    shown = 'Search "x":\n1. Apple Inc.\nhttp://localweb/wiki/Apple_Inc.\nApple is ...\n2. Steve Jobs\nhttp://l/S\n...'
    one = ev.record_behaviour(rec(["apple founder"], shown, bridge="Steve Jobs"), "steve jobs")
    assert one == {"n_queries": 1, "searched_twice": False, "bridge_in_later_query": False, "answer_is_title": True}
    two = ev.record_behaviour(rec(["apple founder", "Steve Jobs birth"], shown, bridge="Steve Jobs"), "1955")
    assert two["searched_twice"] and two["bridge_in_later_query"] and not two["answer_is_title"]
    assert ev.record_behaviour(rec(["a", "b"], shown), None)["bridge_in_later_query"] is None  # not a bridge question
    # the first query naming the bridge does not count: the entity must come from reading, in a later query
    first_only = ev.record_behaviour(rec(["Steve Jobs", "apple"], shown, bridge="Steve Jobs"), None)
    assert first_only["bridge_in_later_query"] is False and first_only["answer_is_title"] is False


def test_shown_titles_reads_render_search():
    """The titles come back out of browse's own rendering of results, in order, and from nothing else."""
    results = [browse.SearchResult(rank=i + 1, title=t, url=f"http://localweb/wiki/{i}", snippet="1. Not a title")
               for i, t in enumerate(["Oslo", "Norway (country)"])]
    text = browse.render_search(["capital of Norway"], [results], snippet_chars=200, obs_chars=2000)
    assert browse.shown_titles(text) == ["Oslo", "Norway (country)"]
    assert browse.shown_titles("Page http://x:\n1. Oslo is the capital") == [] and browse.shown_titles(None) == []


def test_run_identity_counts_the_date_only_where_the_prompt_shows_it(tmp_path):
    """An offline eval (short prompt, no date in it) resumed the next day is the same run; under the reference
    prompt, which states today's date, it is not (the policy reads a different prompt)."""
    from dataclasses import replace

    cfg = make_cfg(tmp_path, prompt="short")
    today = ev.run_identity(replace(cfg, date="2025-01-01"), None, None)
    assert ev.run_identity(replace(cfg, date="2025-01-02"), None, None) == today
    ref = replace(cfg, prompt="reference")
    assert ev.run_identity(replace(ref, date="2025-01-01"), None, None) != ev.run_identity(
        replace(ref, date="2025-01-02"), None, None)
