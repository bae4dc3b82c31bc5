"""browse.py, reading side: fetch() against a local server with injected faults, the SSRF guard, the Fetcher pool,
page record/replay, the readers, and Browser/Session rules on a tiny local corpus. Offline: 127.0.0.1 only.
Run: pytest tests/test_fetch.py -q
"""

import gzip
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import browse
from browse import BrowseConfig, Browser, Cache, Fetcher, PageState, fetch

PAGE = ("<html><head><title>Lima - Wiki</title><style>p{color:red}</style><script>var secret='js';</script></head>"
        "<body><nav>Home | About | Login</nav><article><h1>Lima</h1>"
        "<p>Lima is the capital and largest city of Peru. It lies on the central coast of the country.</p>"
        "<h2>History</h2><p>The city was founded in 1535 by Francisco Pizarro as the City of Kings.</p>"
        "<p>Lima is home to one of the oldest universities in the Americas, founded in 1551.</p>"
        "</article><footer>Copyright footer text</footer></body></html>")


def _pdf_bytes(text: str) -> bytes:
    """A minimal one-page PDF whose content stream draws `text` (pypdf extracts it)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


class Faults(BaseHTTPRequestHandler):
    """Each path is one behaviour; `hits` counts requests per path, `active`/`peak` concurrency."""
    hits: dict = {}
    lock = threading.Lock()
    active = peak = 0
    other_port = 0

    def log_message(self, *a):
        pass

    def _send(self, code, body=b"", ctype="text/html; charset=utf-8", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: C901 - a table of behaviours
        cls = type(self)
        with cls.lock:
            n = cls.hits[self.path] = cls.hits.get(self.path, 0) + 1
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            self._route(self.path, n)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with cls.lock:
                cls.active -= 1

    def _route(self, p, n):
        if p == "/page":
            return self._send(200, PAGE.encode())
        if p.startswith("/pool/"):
            time.sleep(0.2)
            return self._send(200, f"<html><body><p>{p} {'word ' * 60}</p></body></html>".encode())
        if p == "/slow":
            time.sleep(5)
            return self._send(200, PAGE.encode())
        if p == "/trickle":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
            return
        if p == "/reset":
            self.connection.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_LINGER,
                                       b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            return
        if p == "/flaky":
            return self._send(500, b"oops") if n == 1 else self._send(200, PAGE.encode())
        if p == "/busy":
            return self._send(429, b"slow down", headers=[("Retry-After", "1")]) if n == 1 else \
                self._send(200, PAGE.encode())
        if p == "/busy_long":
            return self._send(429, b"slow down", headers=[("Retry-After", "30")])
        if p == "/big":
            return self._send(200, b"a" * 10_000_000, "text/plain")
        if p == "/png":
            return self._send(200, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png")
        if p == "/nul":
            return self._send(200, b"abc\x00\x01\x02" * 50, "text/plain")
        if p == "/latin1":
            return self._send(200, "Caf\u00e9 cr\u00e8me in S\u00e3o Paulo, na\u00efve r\u00e9sum\u00e9.".encode(
                "cp1252"), "text/plain; charset=utf-8")
        if p == "/gzip":
            return self._send(200, gzip.compress(PAGE.encode()), headers=[("Content-Encoding", "gzip")])
        if p == "/loop":
            return self._send(302, b"", headers=[("Location", "/loop")])
        if p == "/to_other":
            return self._send(302, b"", headers=[("Location", f"http://127.0.0.1:{type(self).other_port}/page")])
        if p == "/to_metadata":
            return self._send(302, b"", headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        if p == "/to_page":
            return self._send(301, b"", headers=[("Location", "/page")])
        if p == "/empty":
            return self._send(200, b"")
        if p == "/pdf":
            return self._send(200, _pdf_bytes("Lima is the capital of Peru"), "application/pdf")
        if p == "/404":
            return self._send(404, b"no")
        return self._send(404, b"no")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Faults)
    srv.daemon_threads = True
    other = ThreadingHTTPServer(("127.0.0.1", 0), Faults)
    Faults.other_port = other.server_address[1]
    for s in (srv, other):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{srv.server_address[1]}"
    yield f"http://{host}", (host,)
    srv.shutdown()
    other.shutdown()


def get(server, path, timeout=2.0, **kw):
    base, allow = server
    r = fetch(base + path, timeout=timeout, allow_hosts=allow, backoff_s=0.05, **kw)
    assert r.elapsed_s <= timeout + 1.0, (path, r.elapsed_s)
    return r


def test_html_main_text(server):
    r = get(server, "/page")
    assert r.ok and r.status == 200 and r.title == "Lima - Wiki" and r.kind == ""
    assert "capital and largest city of Peru" in r.text and "Francisco Pizarro" in r.text
    assert "var secret" not in r.text and "color:red" not in r.text and "Home | About" not in r.text


@pytest.mark.parametrize("path,kind,words", [
    ("/slow", "timeout", "timeout after 2 s"),
    ("/trickle", "timeout", "too slowly"),
    ("/reset", "network", "connection"),
    ("/busy_long", "http", "retry after 30 s"),
    ("/png", "unsupported", "image/png"),
    ("/nul", "unsupported", "binary"),
    ("/loop", "redirects", "redirects"),
    ("/to_other", "blocked", "private"),
    ("/to_metadata", "blocked", "169.254.169.254"),
    ("/empty", "empty", "empty"),
    ("/404", "http", "404"),
])
def test_faults(server, path, kind, words):
    r = get(server, path)
    assert not r.ok and r.kind == kind and words in r.error, r
    assert r.text == ""


def test_retries(server):
    r = get(server, "/flaky")
    assert r.ok and "Peru" in r.text and Faults.hits["/flaky"] == 2  # 500, then 200
    r = get(server, "/busy", timeout=4.0)
    assert r.ok and r.elapsed_s >= 1.0 and Faults.hits["/busy"] == 2  # waited Retry-After: 1


def test_body_handling(server):
    r = get(server, "/big", max_bytes=100_000)
    assert r.ok and r.truncated and r.n_bytes == 100_000 and len(r.text) == 100_000
    r = get(server, "/latin1")  # says utf-8, is cp1252
    assert r.ok and "Café crème in São Paulo" in r.text and "\ufffd" not in r.text
    r = get(server, "/gzip")
    assert r.ok and "Francisco Pizarro" in r.text
    r = get(server, "/pdf")
    assert r.ok and "Lima is the capital of Peru" in r.text
    r = get(server, "/to_page")  # a redirect within the allowed host is followed
    assert r.ok and r.url.endswith("/page")


@pytest.mark.parametrize("url,kind", [
    ("file:///etc/passwd", "blocked"), ("ftp://example.org/x", "blocked"), ("", "bad_url"), ("garbage", "bad_url"),
    ("http://", "bad_url"), ("http://[::1", "bad_url"), ("http://127.0.0.1:9/x", "blocked"),
    ("http://169.254.169.254/latest/meta-data/", "blocked"), ("http://10.0.0.1/", "blocked"),
    ("http://[::1]:80/", "blocked"), ("http://localhost/", "blocked"),
])
def test_ssrf_guard_and_garbage(url, kind):
    r = fetch(url, timeout=1.0)
    assert not r.ok and r.kind == kind and r.error and r.elapsed_s < 1.0, r


def test_pool_order_and_per_host_limit(server):
    base, allow = server
    Faults.peak = 0
    f = Fetcher(n_threads=16, per_host=3, timeout=5.0, allow_hosts=allow)
    urls = [f"{base}/pool/{i}" for i in range(12)]
    t0 = time.perf_counter()
    out = f.fetch_many(urls)
    wall = time.perf_counter() - t0
    f.close()
    assert [r.url for r in out] == urls and all(r.ok for r in out)
    assert all(f"/pool/{i} " in r.text for i, r in enumerate(out))
    assert Faults.peak <= 3  # never more than per_host at once on one host
    assert wall < 12 * 0.2 * 0.6  # but concurrent: 4 waves of 0.2 s, not 12
    assert f.stats.pages == 12 and f.stats.ok == 12 and f.stats.bytes > 0


def test_page_record_replay(server, tmp_path):
    base, allow = server
    db = tmp_path / "web.sqlite"
    rec = Fetcher(cache=Cache(db, "record"), allow_hosts=allow, timeout=2.0)
    live = rec.fetch(base + "/page")
    bad = rec.fetch(base + "/slow")  # a timeout is not recorded: another run might get the page
    assert live.ok and not bad.ok
    rep = Fetcher(cache=Cache(db, "replay"), allow_hosts=(), timeout=2.0)  # no host allowed: only the cache
    again = rep.fetch(base + "/page")
    assert again.ok and again.cached and again.text == live.text and rep.stats.cache_hits == 1
    miss = rep.fetch(base + "/slow")
    assert not miss.ok and miss.kind == "cache_miss" and "replay" in miss.error


# ------------------------------------------------------------------------------------------------ readers

def test_extract_reader_new_relevant_passages():
    cfg = BrowseConfig(page_chars=120, chunk_chars=400, max_chunks=2)
    text = "\n".join(["The weather in Lima is mild all year.", "Lima was founded in 1535 by Francisco Pizarro.",
                      "Football is popular.", "Lima has the oldest university in the Americas, from 1551."] +
                     [f"Filler paragraph number {i} about nothing in particular at all." for i in range(12)] +
                     ["Pizarro named Lima the City of Kings when he founded it."])
    page = PageState("u", "Lima", browse.chunk_text(text, cfg.chunk_chars))
    assert len(page.chunks) > 2
    reader = browse.ExtractReader(cfg)
    q = "Who founded Lima and when?"
    first = reader.read(page, q, ["Lima founded"])
    assert "Francisco Pizarro" in first and "Football" not in first
    second = reader.read(page, q, ["Lima founded"])
    assert second and "1535 by Francisco Pizarro" not in second  # never the same passage twice
    seen = first + second
    for _ in range(6):  # reading resumes where it stopped and reaches the last chunk, bounded per call
        pos = page.pos
        more = reader.read(page, q, ["Lima founded"])
        assert page.pos - pos <= cfg.max_chunks
        seen += more
    assert "City of Kings" in seen
    assert reader.read(page, q, ["Lima founded"]) == ""  # nothing new is left


class FakeLLM(BaseHTTPRequestHandler):
    replies: list = []
    calls: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append((body, self.headers.get("Authorization")))
        code, content = type(self).replies.pop(0) if type(self).replies else (200, "{}")
        data = json.dumps({"choices": [{"message": {"content": content}}]}).encode() if code == 200 else b"err"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def llm():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    FakeLLM.replies, FakeLLM.calls = [], []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def _reply(info, more, summary="s"):
    return 200, "Sure: " + json.dumps({"extracted_info": info, "read_more": more, "summary": summary})


def test_llm_reader(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("READER_KEY", "sk-very-secret-123")
    cfg = BrowseConfig(reader="llm", llm_base_url=llm, llm_model="m", llm_api_key_env="READER_KEY", max_chunks=2,
                       llm_timeout=2.0)
    reader = browse.LLMReader(cfg, Cache(tmp_path / "c.sqlite", "replay_or_live"))
    page = PageState("u", "t", ["part one", "part two", "part three", "part four"])
    FakeLLM.replies = [_reply("fact A", True), _reply("fact B", True)]
    assert reader.read(page, "q?", ["query"]) == "fact A\nfact B" and page.pos == 2  # bounded by max_chunks
    assert FakeLLM.calls[0][0]["temperature"] == 0 and "part one" in FakeLLM.calls[0][0]["messages"][0]["content"]
    assert FakeLLM.calls[0][1] == "Bearer sk-very-secret-123"
    FakeLLM.replies = [_reply("fact C", False)]
    assert reader.read(page, "q?", ["query"]) == "fact C" and page.pos == 3  # read_more false stops
    # the running summary of this search is carried into the next prompt
    assert "s" in FakeLLM.calls[-1][0]["messages"][0]["content"]
    # cached: the same reading again makes no call
    n = len(FakeLLM.calls)
    page2 = PageState("u", "t", ["part one", "part two", "part three", "part four"])
    assert reader.read(page2, "q?", ["query"]) == "fact A\nfact B" and len(FakeLLM.calls) == n


@pytest.mark.parametrize("replies,words", [
    ([(200, "I think the page is about Lima.")], "not the JSON"),
    ([(401, "")], "refused the key"),
    ([(500, "")] * 3, "HTTP 500"),
])
def test_llm_reader_failures(llm, monkeypatch, replies, words):
    monkeypatch.setenv("READER_KEY", "sk-very-secret-123")
    cfg = BrowseConfig(reader="llm", llm_base_url=llm, llm_model="m", llm_api_key_env="READER_KEY", llm_timeout=2.0)
    FakeLLM.replies = list(replies)
    with pytest.raises(browse.ReaderError) as e:
        browse.LLMReader(cfg).read(PageState("u", "t", ["text"]), "q?", [])
    assert words in str(e.value) and "sk-very-secret" not in str(e.value)


def test_llm_reader_retry_then_ok_and_down(llm):
    cfg = BrowseConfig(reader="llm", llm_base_url=llm, llm_model="m", llm_api_key_env="", llm_timeout=2.0)
    FakeLLM.replies = [(503, ""), _reply("fact", False)]
    assert browse.LLMReader(cfg).read(PageState("u", "t", ["x"]), "q?", []) == "fact"
    down = BrowseConfig(reader="llm", llm_base_url="http://127.0.0.1:9/v1", llm_model="m", llm_timeout=1.0)
    with pytest.raises(browse.ReaderError, match="unreachable"):
        browse.LLMReader(down).read(PageState("u", "t", ["x"]), "q?", [])
    with pytest.raises(ValueError, match="llm_base_url"):
        browse.LLMReader(BrowseConfig(reader="llm"))


# ------------------------------------------------------------------------------------------------ Browser / Session

@pytest.fixture()
def web(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DR_LOCALWEB_PORT", "0")
    corpus = tmp_path / "corpus.jsonl"
    arts = [("Lima", "Lima is the capital and largest city of Peru. It was founded in 1535 by Francisco Pizarro."),
            ("Cusco", "Cusco is a city in southeastern Peru near the Sacred Valley."),
            ("Kiwi", "Kiwi are flightless birds endemic to New Zealand.")]
    corpus.write_text("".join(json.dumps(dict(id=t, title=t, url=f"https://en.wikipedia.org/wiki/{t}", text=x)) + "\n"
                              for t, x in arts))
    b = Browser(BrowseConfig(corpus=str(corpus), top_k=2, max_queries=2, snippet_chars=60))
    yield b
    b.close()


def test_session_rules(web):
    s = web.session("Who founded Lima?")
    assert "Search first" in s.browse_webpage(["http://127.0.0.1:1/wiki/Lima"])
    obs = s.web_search(["Lima founder", "Peru capital", "a third query"])
    assert 'Search "Lima founder":' in obs and "(only the first 2 queries were run)" in obs
    assert "a third query" not in obs.split("(only")[0]
    lima = next(u for u in s.urls if u.endswith("/wiki/Lima"))
    page = s.browse_webpage([lima, "http://127.0.0.1:1/not-from-search"])
    assert "Francisco Pizarro" in page and "not in your most recent search results" in page
    assert "nothing new" in s.browse_webpage([lima])  # the reader returns only new information
    s.web_search(["kiwi bird"])  # a new search: the old URLs are no longer readable
    if lima not in s.urls:
        assert "not in your most recent search results" in s.browse_webpage([lima])
    assert web.stats["fetch"]["pages"] >= 2 and web.stats["search"]["queries"] == 3


@pytest.mark.parametrize("bad", [None, [], [""], {"q": 1}, "   ", 42])
def test_session_malformed_args_never_raise(web, bad):
    s = web.session("q?")
    assert "at least one" in s.web_search(bad)
    s.web_search(["Lima"])
    assert "at least one" in s.browse_webpage(bad)


def test_render_budgets():
    res = [browse.SearchResult("T" * 50, "https://x.org/" + "a" * 50, "snippet " * 100, 1)]
    obs = browse.render_search(["q1", "q2"], [res, browse.SearchError("timeout", "took too long")],
                               snippet_chars=40, budget=300)
    assert len(obs) <= 300 + 10 and 'Search "q2" failed: timeout' in obs
    items = [("https://a.org", "info " * 500, None), ("https://b.org", None, "could not be fetched: timeout")]
    out = browse.render_browse(items, budget=400)
    assert len(out) <= 420 and "https://b.org: could not be fetched: timeout" in out


def test_no_key_in_repr_or_stats(monkeypatch):
    cfg = BrowseConfig(reader="llm", llm_base_url="http://127.0.0.1:9/v1", llm_model="m")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-shown")
    r = browse.LLMReader(cfg)
    assert "sk-never-shown" not in repr(cfg) and "sk-never-shown" not in repr(r.__dict__.get("cfg"))
    assert os.environ["OPENAI_API_KEY"] == r.api_key  # read from the environment, kept off the config
