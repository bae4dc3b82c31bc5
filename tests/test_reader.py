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
from browse import BrowseConfig, Browser, Cache, ExtractReader, LLMReader, PageState, chunk_text

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


def reply(info: str, more: bool, summary: str = "") -> tuple[int, str]:
    return 200, "Here is the JSON:\n" + json.dumps({"extracted_info": info, "read_more": more, "summary": summary})


def llm_cfg(url: str, **kw) -> BrowseConfig:
    return BrowseConfig(reader="llm", llm_base_url=url, llm_model="reader-m", llm_api_key_env="READER_KEY",
                        llm_timeout=2.0, **kw)


# ------------------------------------------------------------------------------------------------ llm reader

def test_llm_normal_reply_and_request(llm):
    page = PageState("http://x.org/lima", "Lima", ["Lima was founded in 1535 by Francisco Pizarro."])
    llm.replies = [reply("Lima was founded in 1535.", False, "founding date found")]
    out = LLMReader(llm_cfg(llm.url)).read(page, "When was Lima founded?", ["Lima founded", "Lima history"])
    assert out == "Lima was founded in 1535." and page.pos == 1
    assert page.memory == {"Lima founded | Lima history": "founding date found"}
    (call,) = llm.calls
    assert call["path"] == "/v1/chat/completions" and call["auth"] == f"Bearer {SECRET}"
    body = call["body"]
    assert body["model"] == "reader-m" and body["temperature"] == 0 and body["messages"][0]["role"] == "user"
    prompt = body["messages"][0]["content"]
    for part in ("When was Lima founded?", "Lima founded; Lima history", "Page part 1 of 1 (http://x.org/lima)",
                 "Lima was founded in 1535 by Francisco Pizarro.", "(nothing yet)", '"read_more"'):
        assert part in prompt, part


def test_llm_read_more_and_resume(llm):
    page = PageState("u", "t", ["part one text", "part two text", "part three text"])
    reader = LLMReader(llm_cfg(llm.url, max_chunks=4))
    llm.replies = [reply("fact A", True, "noted A"), reply("fact B", False, "noted A and B")]
    assert reader.read(page, "q?", ["query"]) == "fact A\nfact B" and page.pos == 2  # read on, then stop
    prompts = [c["body"]["messages"][0]["content"] for c in llm.calls]
    assert "part one text" in prompts[0] and "part two text" in prompts[1] and "Page part 2 of 3" in prompts[1]
    assert "noted A" in prompts[1]  # the running summary goes into the next chunk's prompt
    llm.replies = [reply("fact C", True)]
    assert reader.read(page, "q?", ["query"]) == "fact C" and page.pos == 3  # re-browsing resumes at part three
    assert "part three text" in llm.calls[-1]["body"]["messages"][0]["content"]
    assert "noted A and B" in llm.calls[-1]["body"]["messages"][0]["content"]
    n = len(llm.calls)
    assert reader.read(page, "q?", ["query"]) == "" and len(llm.calls) == n  # the end of the page: no call
    assert reader.calls == 3 and reader.failures == 0


def test_llm_reading_is_bounded(llm):
    reader = LLMReader(llm_cfg(llm.url, max_chunks=3))
    page = PageState("u", "t", [f"part {i}" for i in range(10)])
    llm.replies = [reply(f"fact {i}", True) for i in range(10)]
    assert reader.read(page, "q?", []) == "fact 0\nfact 1\nfact 2" and len(llm.calls) == 3 and page.pos == 3
    # read_more at the last chunk ends the reading (the reference looped here forever)
    page = PageState("u", "t", ["only part"])
    llm.replies, llm.calls[:] = [reply("x", True)] * 5, []
    assert reader.read(page, "q?", []) == "x" and len(llm.calls) == 1
    # the result is bounded by page_chars
    reader = LLMReader(llm_cfg(llm.url, page_chars=20))
    llm.replies = [reply("y" * 500, False)]
    assert reader.read(PageState("u", "t", ["p"]), "q?", []) == "y" * 20


def test_llm_replies_cached(llm, tmp_path):
    db = tmp_path / "web.sqlite"
    chunks = ["part one", "part two"]
    reader = LLMReader(llm_cfg(llm.url), Cache(db, "replay_or_live"))
    llm.replies = [reply("fact A", True, "s1"), reply("fact B", False, "s2")]
    first = reader.read(PageState("u", "t", list(chunks)), "q?", ["query"])
    assert first == "fact A\nfact B" and len(llm.calls) == 2
    again = reader.read(PageState("u", "t", list(chunks)), "q?", ["query"])  # the same reading: from the cache
    assert again == first and len(llm.calls) == 2 and reader.calls == 2
    replay = LLMReader(llm_cfg(llm.url), Cache(db, "replay"))  # another run, replaying
    assert replay.read(PageState("u", "t", list(chunks)), "q?", ["query"]) == first and len(llm.calls) == 2
    with pytest.raises(browse.WebError, match="not in the replay cache"):
        replay.read(PageState("u", "t", list(chunks)), "another question?", ["query"])
    assert len(llm.calls) == 2


def test_llm_reply_forms(llm):
    """The reply's JSON is found inside code fences or prose, "yes"/"no" read as booleans, null as empty; a reply
    without the JSON asked for is a WebError ("malformed"), never a guess."""
    reader = LLMReader(llm_cfg(llm.url, max_chunks=4))
    page = PageState("u", "t", ["part one", "part two", "part three"])
    llm.replies = [(200, '```json\n{"extracted_info": "a", "read_more": "yes", "summary": "s"}\n```'),
                   (200, '{"extracted_info": null, "read_more": "no"}')]
    assert reader.read(page, "q?", ["query"]) == "a" and page.pos == 2  # "yes": read on; "no": stop
    assert page.memory == {"query": "s"}  # a reply without a summary keeps the last one
    for bad in ("no json here", '{"read_more": true}', "{not json}", "[1, 2]", ""):
        llm.replies = [(200, bad)]
        with pytest.raises(browse.WebError, match="not the JSON asked for"):
            reader.read(PageState("u", "t", ["p"]), "q?", [])


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
        assert obs == f"Page {lima}:\nLima\nLima is the capital and largest city of Peru. It was founded in 1535 by " \
                      "Francisco Pizarro."  # the heading and the answer passage, nothing else
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
    ([(200, "I think the page is about Lima.")], "the reading model's reply was not the JSON asked for"),
    ([(200, {"result": "not a chat completion"})], "a reply that is not a chat completion"),
    ([(401, None)], "refused access (HTTP 401)"),
    ([(400, None)], "answered HTTP 400"),
])
def test_session_llm_failures_are_observations(corpus, llm, replies, words):
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
        assert obs.failed  # the reading model, not the policy, failed on the call's only page
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
        llm.replies = [(200, "not json")]
        assert "reading model failed" in s.browse_webpage([lima]) and s.pages[lima].pos == 0
        llm.replies = [reply("Pizarro.", False)]
        assert s.browse_webpage([lima]) == f"Page {lima}:\nPizarro." and s.pages[lima].pos == 1
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
