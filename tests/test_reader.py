"""browse.py, reading side: the `extract` reader (no model) and the `llm` reader against a fake local
OpenAI-compatible server (http.server on 127.0.0.1 answering /v1/chat/completions), directly and through
Browser/Session observations, including the endpoint's failures. Offline.

Run: python -m pytest -q tests/test_reader.py      (about 15 s on 2 CPU cores; the endpoint-down case waits out
chat_completion's bounded backoff)
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import browse
from browse import (READER_MAX_TOKENS, BrowseConfig, Browser, Cache, ExtractReader, LLMReader, PageState, chunk_text,
                    fit_page_text, parse_reader_reply)

SECRET = "sk-test-SECRET-4242"

FACTS = ["The weather in Lima is mild all year, with little rain.",
         "Lima was founded on 18 January 1535 by Francisco Pizarro.",
         "Football is the most popular sport in the country.",
         "The National University of San Marcos in Lima, founded in 1551, is the oldest in the Americas.",
         "Pizarro named Lima the City of Kings when he founded it."]


def lines(text: str) -> list[str]:
    return [x for x in text.split("\n") if x]


# ------------------------------------------------------------------------------------------------ extract reader

def test_extract_returns_the_answer_and_never_repeats():
    cfg = BrowseConfig(page_chars=130, chunk_chars=10_000)
    page = PageState("u", "Lima", chunk_text("\n".join(FACTS), cfg.chunk_chars))
    reader = ExtractReader(cfg)
    q, queries = "When was Lima founded?", ["Lima founded"]
    first = reader.read(page, q, queries)
    assert "18 January 1535 by Francisco Pizarro" in first and "Football" not in first
    assert len(first) <= cfg.page_chars and set(lines(first)) <= set(FACTS)  # whole passages, within the budget
    seen = lines(first)
    for _ in range(5):  # browse the same page again: other passages, then nothing
        more = reader.read(page, q, queries)
        assert not set(lines(more)) & set(seen), more  # nothing returned before
        seen += lines(more)
        if not more:
            break
    assert more == "" and "Pizarro named Lima the City of Kings when he founded it." in seen
    assert "Football is the most popular sport in the country." not in seen  # irrelevant passages never come back
    assert reader.read(page, q, queries) == ""


def test_extract_deterministic_and_page_order():
    cfg = BrowseConfig(page_chars=1000)
    outs = [ExtractReader(cfg).read(PageState("u", "t", [("\n".join(FACTS))]), "Lima founded Pizarro", [])
            for _ in range(2)]
    assert outs[0] == outs[1]
    got = lines(outs[0])
    assert got == [f for f in FACTS if f in got] and len(got) >= 2  # best passages, shown in page order


def test_extract_resumes_across_chunks_bounded_per_call():
    cfg = BrowseConfig(page_chars=300, chunk_chars=120, max_chunks=3)
    filler = [f"Filler paragraph number {i} says nothing in particular at all." for i in range(14)]
    paras = [FACTS[1]] + filler[:6] + [FACTS[3]] + filler[6:] + [FACTS[4]]
    page = PageState("u", "Lima", chunk_text("\n".join(paras), cfg.chunk_chars))
    n = len(page.chunks)
    assert n >= 10 and all(len(c) <= cfg.chunk_chars for c in page.chunks)
    where = {f: next(i for i, c in enumerate(page.chunks) if f in c) for f in (FACTS[1], FACTS[3], FACTS[4])}
    assert where[FACTS[1]] == 0 and where[FACTS[3]] > cfg.max_chunks and where[FACTS[4]] == n - 1
    reader = ExtractReader(cfg)
    got, positions = [], []
    for _ in range(n):  # browse again and again: each call reads on from where the last one stopped
        before = page.pos
        out = reader.read(page, "Who founded Lima and when? Which university?", ["Lima founded university"])
        assert page.pos - before <= cfg.max_chunks  # at most max_chunks chunks per call
        positions.append(page.pos)
        got += lines(out)
        if page.pos >= n:
            break
    assert got == [FACTS[1], FACTS[3], FACTS[4]]  # each fact once, in page order
    assert positions == sorted(positions) and page.pos == n and positions[0] == 0
    assert reader.read(page, "Who founded Lima?", []) == "" and page.pos == n  # the end: nothing new, no error


def test_extract_first_visit_without_match_gives_the_opening():
    page = PageState("u", "Lima", ["Lima is the capital of Peru.\nIt has ten million people."])
    reader = ExtractReader(BrowseConfig())
    assert reader.read(page, "zebra migration", []) == "Lima is the capital of Peru."
    assert reader.read(page, "zebra migration", []) == ""


# ------------------------------------------------------------------------------------------------ fake LLM endpoint

class FakeLLM(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: answers from `server.replies` ((status, content) each; content None means an
    error body that echoes the request's Authorization header, as some servers do); records each request."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        st = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st.calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        code, content = st.replies.pop(0) if st.replies else (200, '{"extracted_info": "", "read_more": false}')
        if code == 200 and isinstance(content, str):
            data = json.dumps({"id": "x", "object": "chat.completion",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
        elif code == 200:
            data = json.dumps(content)  # a raw body (not a chat completion)
        else:
            data = json.dumps({"error": {"message": f"request with {self.headers.get('Authorization')} failed"}})
        data = data.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def llm(monkeypatch):
    monkeypatch.setenv("READER_KEY", SECRET)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    srv.daemon_threads = True
    srv.replies, srv.calls = [], []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def reply(info: str, more: bool) -> tuple[int, str]:
    return 200, "Here is the JSON:\n" + json.dumps({"extracted_info": info, "read_more": more})


def prompt_of(call: dict) -> str:
    return call["body"]["messages"][0]["content"]


def llm_cfg(url: str, **kw) -> BrowseConfig:
    return BrowseConfig(reader="llm", llm_base_url=url, llm_model="reader-m", llm_api_key_env="READER_KEY",
                        llm_timeout=2.0, **kw)


# ------------------------------------------------------------------------------------------------ llm reader

def test_llm_normal_reply_and_request(llm):
    page = PageState("http://x.org/lima", "Lima", ["Lima was founded in 1535 by Francisco Pizarro."])
    llm.replies = [reply("Lima was founded in 1535.", False)]
    out = LLMReader(llm_cfg(llm.url)).read(page, "When was Lima founded?", ["Lima founded", "Lima history"])
    assert out == "Lima was founded in 1535." and page.pos == 1
    (call,) = llm.calls
    assert call["path"] == "/v1/chat/completions" and call["auth"] == f"Bearer {SECRET}"
    body = call["body"]
    assert body["model"] == "reader-m" and body["temperature"] == 0 and body["messages"][0]["role"] == "user"
    assert body["max_tokens"] == READER_MAX_TOKENS  # room for what the prompt asks for (issue 22.2)
    for part in ("When was Lima founded?", "Lima founded; Lima history", "Page part 1 of 1 (http://x.org/lima)",
                 "Lima was founded in 1535 by Francisco Pizarro.", "(nothing yet)", '"read_more"', "1,500 words"):
        assert part in prompt_of(call), part


def test_llm_read_more_and_resume(llm):
    page = PageState("u", "t", ["part one text", "part two text", "part three text"], memory="fact from another page")
    reader = LLMReader(llm_cfg(llm.url, max_chunks=4))
    llm.replies = [reply("fact A", True), reply("fact B", False)]
    assert reader.read(page, "q?", ["query"]) == "fact A\nfact B" and page.pos == 2  # read on, then stop
    prompts = [prompt_of(call) for call in llm.calls]
    assert "part one text" in prompts[0] and "part two text" in prompts[1] and "Page part 2 of 3" in prompts[1]
    assert "fact from another page" in prompts[0] and "fact A" not in prompts[0]
    assert "fact from another page\nfact A" in prompts[1]  # the facts found so far go into the next part's prompt
    llm.replies = [reply("fact C", True)]
    assert reader.read(page, "q?", ["query"]) == "fact C" and page.pos == 3  # re-browsing resumes at part three
    assert "part three text" in prompt_of(llm.calls[-1])
    n_calls = len(llm.calls)
    assert reader.read(page, "q?", ["query"]) == "" and len(llm.calls) == n_calls  # the end of the page: no call
    assert (reader.calls, reader.failures, reader.unparsed) == (3, 0, 0)


def test_llm_reading_caps(llm):
    reader = LLMReader(llm_cfg(llm.url, max_chunks=3))
    page = PageState("u", "t", [f"part {i}" for i in range(10)])
    llm.replies = [reply(f"fact {i}", True) for i in range(10)]
    assert reader.read(page, "q?", []) == "fact 0\nfact 1\nfact 2" and len(llm.calls) == 3 and page.pos == 3
    # read_more at the last chunk ends the reading (the reference looped here forever)
    page = PageState("u", "t", ["only part"])
    llm.replies, llm.calls[:] = [reply("x", True)] * 5, []
    assert reader.read(page, "q?", []) == "x" and len(llm.calls) == 1
    # the default, as the reference: no cap, read on while the reader asks, to the page's end
    reader = LLMReader(llm_cfg(llm.url))
    page = PageState("u", "t", [f"part {i}" for i in range(7)])
    llm.replies, llm.calls[:] = [reply(f"fact {i}", i < 5) for i in range(7)], []
    assert reader.read(page, "q?", []) == "\n".join(f"fact {i}" for i in range(6)) and page.pos == 6
    # nothing the reader extracts is cut (issue 22.1: the reference returns all of it)
    llm.replies = [reply("y" * 5000, False)]
    assert reader.read(PageState("u", "t", ["p"]), "q?", []) == "y" * 5000


def test_llm_memory_is_bounded(llm):
    reader = LLMReader(llm_cfg(llm.url, chunk_chars=100))
    old_facts = "\n".join(f"old fact number {i:03d}" for i in range(50))  # 1,000 characters of earlier facts
    page = PageState("u", "t", ["part"], memory=old_facts)
    llm.replies = [reply("", False)]
    reader.read(page, "q?", [])
    prompt = prompt_of(llm.calls[0])
    assert "old fact number 049" in prompt and "old fact number 000" not in prompt  # the newest facts, whole lines
    memory = prompt.split("(do not repeat them):\n")[1].split("\n\nPage part")[0]
    assert len(memory) <= 100 and memory.startswith("old fact number")


def test_llm_replies_cached(llm, tmp_path):
    db = tmp_path / "web.sqlite"
    chunks = ["part one", "part two"]
    reader = LLMReader(llm_cfg(llm.url), Cache(db, "replay_or_live"))
    llm.replies = [reply("fact A", True), reply("fact B", False)]
    first = reader.read(PageState("u", "t", list(chunks)), "q?", ["query"])
    assert first == "fact A\nfact B" and len(llm.calls) == 2
    again = reader.read(PageState("u", "t", list(chunks)), "q?", ["query"])  # the same reading: from the cache
    assert again == first and len(llm.calls) == 2 and reader.calls == 2
    replay = LLMReader(llm_cfg(llm.url), Cache(db, "replay"))  # another run, replaying
    assert replay.read(PageState("u", "t", list(chunks)), "q?", ["query"]) == first and len(llm.calls) == 2
    with pytest.raises(browse.WebError, match="not in the replay cache"):
        replay.read(PageState("u", "t", list(chunks)), "another question?", ["query"])
    assert len(llm.calls) == 2
    # a reply that could not be parsed is recorded too: the replay reads it the same way
    llm.replies = [(200, "no json here")]
    unparsed = reader.read(PageState("u", "t", ["part x"]), "q?", ["query"])
    assert "could not be parsed" in unparsed and len(llm.calls) == 3
    assert replay.read(PageState("u", "t", ["part x"]), "q?", ["query"]) == unparsed and len(llm.calls) == 3


def test_parse_reader_reply():
    """The reply's JSON is found inside code fences or prose, "yes"/"no" read as booleans, null as empty; a reply
    without the JSON asked for is None, never a guess."""
    fenced = '```json\n{"extracted_info": "a", "read_more": "yes", "summary": "s"}\n```'
    assert parse_reader_reply(fenced) == {"extracted_info": "a", "read_more": True}
    assert parse_reader_reply('{"extracted_info": null, "read_more": "no"}') == {"extracted_info": "",
                                                                                 "read_more": False}
    cut_at_the_limit = '{"extracted_info": "Lima was founded in 1535 by Francisco Piz'
    for bad in ("no json here", '{"read_more": true}', "{not json}", "[1, 2]", "", cut_at_the_limit):
        assert parse_reader_reply(bad) is None, bad


def test_llm_unparsed_reply_is_skipped_not_raised(llm):
    """Issue 22.2: a reply that is not the JSON asked for ends this reading with a note; the part counts as read
    (at temperature 0 the model would write the same again) and the next browse reads on."""
    reader = LLMReader(llm_cfg(llm.url))
    page = PageState("u", "t", ["part one", "part two", "part three"])
    llm.replies = [reply("fact A", True), (200, '{"extracted_info": "fact B, cut at the li')]
    out = reader.read(page, "q?", ["query"])
    assert out == ("fact A\n(part 2 of 3: the reading model's reply could not be parsed, so this part was skipped; "
                   "browse the page again to read on)")
    assert page.pos == 2 and (reader.calls, reader.failures, reader.unparsed) == (2, 0, 1)
    llm.replies = [(200, "I think the page is about Lima.")]
    last = reader.read(page, "q?", ["query"])
    assert last == "(part 3 of 3: the reading model's reply could not be parsed, so this part was skipped)"
    assert page.pos == 3


def test_llm_needs_an_endpoint():
    with pytest.raises(ValueError, match="llm_base_url"):
        LLMReader(BrowseConfig(reader="llm"))
    with pytest.raises(ValueError, match="unknown reader"):
        Browser(BrowseConfig(reader="policy"))


# ------------------------------------------------------------------------------------------------ through the Browser

@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.jsonl"
    arts = [("Lima", "Lima is the capital and largest city of Peru. It was founded in 1535 by Francisco Pizarro."),
            ("Kiwi", "Kiwi are flightless birds endemic to New Zealand.")]
    path.write_text("".join(json.dumps(dict(id=t, title=t, url=f"https://en.wikipedia.org/wiki/{t}", text=x)) + "\n"
                            for t, x in arts))
    return str(path)


def browse_lima(browser: Browser, question: str = "Who founded Lima?") -> str:
    s = browser.session(question)
    s.web_search(["Lima founded"])
    return s.browse_webpage([browser.backend.base_url + "/wiki/Lima"])


def test_session_extract_reader(corpus):
    b = Browser(BrowseConfig(corpus=corpus))
    try:
        s = b.session("Who founded Lima?")
        s.web_search(["Lima founded"])
        lima = b.backend.base_url + "/wiki/Lima"
        obs = s.browse_webpage([lima])
        answer = "Lima is the capital and largest city of Peru. It was founded in 1535 by Francisco Pizarro."
        assert obs == f"Page {lima}:\nLima\n{answer}"  # the heading and the answer passage, nothing else
        assert s.browse_webpage([lima]) == f"Page {lima}: nothing new on this page about the question."
    finally:
        b.close()


def test_session_llm_reader_and_cache(corpus, llm, tmp_path):
    b = Browser(llm_cfg(llm.url, corpus=corpus, cache=str(tmp_path / "web.sqlite")))
    try:
        llm.replies = [reply("Francisco Pizarro founded Lima in 1535.", False)]
        lima = b.backend.base_url + "/wiki/Lima"
        assert browse_lima(b) == f"Page {lima}:\nFrancisco Pizarro founded Lima in 1535."
        assert "founded in 1535 by Francisco Pizarro" in llm.calls[0]["body"]["messages"][0]["content"]
        assert browse_lima(b) == f"Page {lima}:\nFrancisco Pizarro founded Lima in 1535."  # another trajectory
        assert len(llm.calls) == 1 and (b.reader.calls, b.reader.failures) == (1, 0)  # the reply was cached
    finally:
        b.close()


@pytest.mark.parametrize("replies,words", [
    ([(200, {"result": "not a chat completion"})], "a reply that is not a chat completion"),
    ([(401, None)], "refused access (HTTP 401)"),
    ([(400, None)], "answered HTTP 400"),
])
def test_session_llm_endpoint_failures_are_failed_observations(corpus, llm, replies, words):
    b = Browser(llm_cfg(llm.url, corpus=corpus))
    try:
        llm.replies = list(replies)
        obs = browse_lima(b)
        lima = b.backend.base_url + "/wiki/Lima"
        assert obs.startswith(f"Page {lima}: fetched, but the reading model failed: ") and words in obs, obs
        assert len(llm.calls) == 1 and llm.calls[0]["auth"] == f"Bearer {SECRET}"  # 4xx: no retry
        for text in (obs, str(b.fetcher.stats), str(b.backend.stats), repr(b.cfg), repr(b.reader.__dict__.get("cfg"))):
            assert SECRET not in text  # the key never shows, even when the server echoes it back
        assert b.reader.failures == 1
        assert obs.failed  # the reading model's endpoint, not the policy, failed on the call's only page
    finally:
        b.close()


@pytest.mark.parametrize("bad_reply", ["I think the page is about Lima.",
                                       '{"extracted_info": "Francisco Pizarro founded Lima in 15',  # cut at the limit
                                       'Sure! {"extracted_info": "Pizarro", "read_more": false} and {more}'])
def test_session_unparsed_reply_is_an_observation_not_a_failure(corpus, llm, bad_reply):
    """Issue 22.2: the reading model's formatting is not the web failing: the policy reads that the reply could not
    be parsed, and the trajectory stays in the loss (failed=False)."""
    b = Browser(llm_cfg(llm.url, corpus=corpus))
    try:
        llm.replies = [(200, bad_reply)]
        obs = browse_lima(b)
        lima = b.backend.base_url + "/wiki/Lima"
        note = "(part 1 of 1: the reading model's reply could not be parsed, so this part was skipped)"
        assert obs == f"Page {lima}:\n{note}"
        assert obs.failed is False
        assert (b.reader.calls, b.reader.failures, b.reader.unparsed) == (1, 0, 1)
    finally:
        b.close()


def test_session_llm_retry_then_ok_and_failure_resumes(corpus, llm):
    b = Browser(llm_cfg(llm.url, corpus=corpus))
    try:
        lima = b.backend.base_url + "/wiki/Lima"
        llm.replies = [(500, None), reply("Pizarro, 1535.", False)]
        assert browse_lima(b) == f"Page {lima}:\nPizarro, 1535." and len(llm.calls) == 2  # 500, retried, 200
        # a failed reading keeps its place: the same session's next browse reads the same part again
        s = b.session("Who founded Lima?")
        s.web_search(["Lima founded"])
        llm.replies = [(400, None)]
        obs = s.browse_webpage([lima])
        assert "reading model failed" in obs and obs.failed and s.pages[lima].pos == 0
        llm.replies = [reply("Pizarro.", False)]
        assert s.browse_webpage([lima]) == f"Page {lima}:\nPizarro." and s.pages[lima].pos == 1
    finally:
        b.close()


FACT_LINES = [f"Fact {i:02d}: Lima's district number {i} was founded in year {1500 + i} by settler {i}." for i in
              range(70)]  # ~5,000 characters, one fact a line


def test_session_long_reply_reaches_the_policy_in_full_across_browses(corpus, llm):
    """Issue 22.1: a reply of 5,000 characters reaches the policy in full: what does not fit the observation waits
    for the next browse of the page, which shows it before reading on; nothing is cut silently."""
    facts = "\n".join(FACT_LINES)
    assert 4900 <= len(facts) <= 5600
    b = Browser(llm_cfg(llm.url, corpus=corpus, obs_chars=1500))
    try:
        lima = b.backend.base_url + "/wiki/Lima"
        s = b.session("Who founded Lima?")
        s.web_search(["Lima founded"])
        llm.replies = [reply(facts, False)]
        seen, n_browses = [], 0
        while True:
            obs = s.browse_webpage([lima])
            n_browses += 1
            assert len(obs) <= 1500 and obs.startswith(f"Page {lima}:\n") and not obs.failed
            body = obs.split("\n")[1:]
            if body[-1].endswith("browse it again to read them)"):
                left = int(body[-1].split()[0].lstrip("("))
                body = body[:-1]
                assert left == len(s.pages[lima].pending) > 0  # the note says how much is still to come
            seen += body
            if not s.pages[lima].pending:
                break
        assert seen == FACT_LINES and n_browses >= 4  # every fact once, in order, whole lines
        assert len(llm.calls) == 1  # shown from what was read, not read again
        assert s.browse_webpage([lima]) == f"Page {lima}: nothing new on this page about the question."
    finally:
        b.close()
    b = Browser(llm_cfg(llm.url, corpus=corpus, obs_chars=15000))  # the deepresearcher preset's budget: one browse
    try:
        llm.replies = [reply(facts, False)]
        assert browse_lima(b) == f"Page {b.backend.base_url}/wiki/Lima:\n{facts}"
    finally:
        b.close()


def test_fit_page_text_always_moves_on():
    page = PageState("http://x.org/p", "t", ["c"])
    text = "one two three four five six seven eight nine ten " * 20
    shown = []
    for _ in range(len(text)):
        block = fit_page_text(page, page.pending or text, 30)  # a share smaller than the header and the note
        shown.append(block.split("\n")[1])
        if not page.pending:
            break
    assert "".join(shown).replace(" ", "") == text.replace(" ", "")  # every character, in order (spaces aside)
    assert len(shown) > 100  # a character or so per browse, but always some


def test_session_memory_is_the_facts_since_the_last_search(corpus, llm):
    """The reading model remembers the facts found on every page since the trajectory's most recent search (the
    reference's context of a sub-question); the pages of one call are read in parallel, each with the facts found
    before the call, and their facts join the memory in URL order."""
    b = Browser(llm_cfg(llm.url, corpus=corpus))
    try:
        lima, kiwi = b.backend.base_url + "/wiki/Lima", b.backend.base_url + "/wiki/Kiwi"
        s = b.session("Who founded Lima, and what are kiwi?")
        s.web_search(["Lima founded", "kiwi bird"])
        assert {lima, kiwi} <= set(s.urls)
        llm.replies = [reply("Pizarro founded Lima.", False)]
        s.browse_webpage([lima])
        llm.replies = [reply("Kiwi are flightless.", False)]
        s.browse_webpage([kiwi])
        assert "Pizarro founded Lima." in prompt_of(llm.calls[1])  # another page's facts, same search
        assert s.found == "Pizarro founded Lima.\nKiwi are flightless."
        s.web_search(["Lima founded", "kiwi bird"])  # a new search starts a new memory
        assert s.found == ""
        s = b.session("Who founded Lima, and what are kiwi?")  # (pages already read to their end stay read)
        s.web_search(["Lima founded", "kiwi bird"])
        llm.replies = [reply("fact one", False), reply("fact two", False)]
        obs = s.browse_webpage([kiwi, lima])
        kiwi_block, lima_block = obs.split("\n\n")
        kiwi_fact = kiwi_block.removeprefix(f"Page {kiwi}:\n")
        lima_fact = lima_block.removeprefix(f"Page {lima}:\n")
        assert {kiwi_fact, lima_fact} == {"fact one", "fact two"}  # (the fake answers in arrival order)
        assert all("(nothing yet)" in prompt_of(call) for call in llm.calls[2:])  # both read with the same memory
        assert s.found == f"{kiwi_fact}\n{lima_fact}"  # URL order
    finally:
        b.close()


def test_session_llm_endpoint_down(corpus):
    b = Browser(llm_cfg("http://127.0.0.1:9/v1", corpus=corpus))  # nothing listens on port 9
    try:
        t0 = time.monotonic()
        obs = browse_lima(b)
        assert "reading model failed: network: reader endpoint http://127.0.0.1:9/v1 unreachable" in obs
        assert "after 3 tries" in obs and time.monotonic() - t0 < 10  # bounded retries
        assert obs.failed  # the reader on every page of the call failed: a tool failure (issue 14), not the policy's
    finally:
        b.close()


def test_custom_reader_seam(corpus):
    class Echo:  # what a `policy` reader plugs into: any object with read(page, question, queries)
        def read(self, page, question, queries):
            return f"{page.title} | {question} | {queries} | {len(page.chunks)} chunk(s)"

    b = Browser(BrowseConfig(corpus=corpus), reader=Echo())
    try:
        assert browse_lima(b).endswith("\nLima | Who founded Lima? | ['Lima founded'] | 1 chunk(s)")
    finally:
        b.close()
