"""browse.py, fetching: fetch() against local servers with injected faults, the SSRF guard, the
Fetcher pool (input order, per-host limit, stats), page record/replay, and the Browser/Session rules on a tiny local
corpus.
Offline: servers on 127.0.0.1 only, admitted with allow_hosts (the guard refuses loopback by default).
The readers have their own file, tests/test_reader.py.

Run: python -m pytest -q tests/test_fetch.py      (about 20 s on 2 CPU cores)
"""

import email.utils
import gzip
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import browse
from browse import BrowseConfig, Browser, Cache, Fetcher, fetch
from data.localweb import page_html

# A short page as the embedded web serves it (title, h1, one paragraph, a source footer).
SHORT = page_html({"id": "Kiwi", "title": "Kiwi", "text": "Kiwi are flightless birds endemic to New Zealand.",
                           "url": "https://en.wikipedia.org/wiki/Kiwi"})

PAGE = ("<html><head><title>Lima - Wiki</title><style>p{color:red}</style><script>var secret='js';</script></head>"
        "<body><nav>Home | About | Login</nav><article><h1>Lima</h1>"
        "<p>Lima is the capital and largest city of Peru. It lies on the central coast of the country.</p>"
        "<h2>History</h2><p>The city was founded in 1535 by Francisco Pizarro as the City of Kings.</p>"
        "<p>Lima is home to one of the oldest universities in the Americas, founded in 1551.</p>"
        "</article><footer>Copyright footer text</footer></body></html>")

# A page shaped like a real site: trafilatura's main-content extraction reads it.
ARTICLE = ("<html><head><title>Andean condor - Birds</title><style>.x{color:red}</style>"
           "<script>window.track('pageview');</script></head><body><header><div class='logo'>BirdSite</div><nav><ul>"
           + "".join(f"<li><a href='/s{i}'>Section {i}</a></li>" for i in range(15)) + "</ul></nav></header>"
           "<div id='cookie-banner'>We use cookies to improve your experience. Accept all cookies</div>"
           "<article><h1>The Andean condor</h1><p>The Andean condor is a South American bird in the New World vulture "
           "family. It is one of the largest flying birds in the world by combined weight and wingspan.</p>"
           "<h2>Range and habitat</h2><p>The condor is found in the Andes mountains and adjacent Pacific coasts of "
           "western South America. It prefers open grasslands and alpine areas up to 5,000 metres.</p>"
           "<h2>Conservation</h2><p>It is listed as vulnerable by the IUCN. It is threatened by habitat loss and by "
           "secondary poisoning from animals killed by hunters.</p></article>"
           "<aside>Related: sponsored content you may like</aside>"
           "<footer>Copyright 2026 BirdSite. All rights reserved. Privacy policy</footer>"
           "<script>console.log('tail')</script></body></html>")

ACCENTS = "Café crème in São Paulo, naïve résumé, Zürich."


def failures(stats) -> dict:
    """The "failed:<kind>" counts of a Fetcher's stats, by kind."""
    return {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("failed:") and v}


def pdf_bytes(pages: list[str]) -> bytes:
    """A PDF with one line of Helvetica text per page, written with pypdf's public API (a blank page has no text,
    so each page gets a font resource and a content stream that draws its line)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
    w = PdfWriter()
    for line in pages:
        page = w.add_blank_page(612, 792)
        helv = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        fonts = DictionaryObject({NameObject("/F1"): helv})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({line}) Tj ET".encode())
        page.replace_contents(stream)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Each path is one behaviour. Per server (self.server.state): hits per path, /pool/ requests in flight and their
    peak."""

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

    def _rst(self):  # close with a TCP reset instead of a clean FIN
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.connection.close()

    def _trickle(self, data: bytes):
        # one byte every 0.2 s until the client hangs up; "forever" is 8 s here (4x the longest timeout used), so a
        # fetch that waits for the server fails its time assertion instead of hanging the suite
        for i in range(40):
            self.wfile.write(data[i % len(data):i % len(data) + 1])
            self.wfile.flush()
            time.sleep(0.2)

    def do_GET(self):
        st = self.server.state
        pool = self.path.startswith("/pool/")  # (other tests' slow handlers may still be sleeping: not counted)
        with st.lock:
            n = st.hits[self.path] = st.hits.get(self.path, 0) + 1
            st.active += pool
            st.peak = max(st.peak, st.active)
        try:
            self._route(self.path, n, st)
        except OSError:  # the client hung up (timeouts, cut pages): expected here
            pass
        finally:
            with st.lock:
                st.active -= pool

    def _route(self, p, n, st):  # noqa: C901 - a table of behaviours
        if p == "/page":
            return self._send(200, PAGE.encode())
        if p == "/short":
            return self._send(200, SHORT.encode())
        if p == "/article":
            return self._send(200, ARTICLE.encode())
        if p.startswith("/pool/"):
            time.sleep(0.2)
            return self._send(200, f"<html><body><p>{p} {'word ' * 60}</p></body></html>".encode())
        if p == "/slow":
            time.sleep(5)
            return self._send(200, PAGE.encode())
        if p == "/trickle_body":  # headers at once, then the body a byte at a time
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            return self._trickle(b"x")
        if p == "/trickle_head":  # the status line and headers a byte at a time (a socket timeout never fires)
            return self._trickle(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 50)
        if p == "/reset":
            return self._rst()
        if p == "/reset_mid":  # half the promised body, then a reset
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"hello " * 1000)
            self.wfile.flush()
            return self._rst()
        if p == "/flaky":
            if n == 1:
                return self._send(500, b"oops")
            return self._send(200, PAGE.encode())
        if p == "/down":
            return self._send(503, b"down")
        if p == "/busy":
            if n == 1:
                return self._send(429, b"slow down", headers=[("Retry-After", "1")])
            return self._send(200, PAGE.encode())
        if p == "/busy_date":  # Retry-After as an HTTP date, ~2 s ahead
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            if n == 1:
                return self._send(429, b"slow down", headers=[("Retry-After", when)])
            return self._send(200, PAGE.encode())
        if p == "/busy_long":
            return self._send(429, b"slow down", headers=[("Retry-After", "30")])
        if p == "/big":
            return self._send(200, b"a" * 10_000_000, "text/plain")
        if p == "/big_html":
            para = ("<p>" + "Lima is a city by the sea. " * 30 + "</p>\n").encode()
            return self._send(200, b"<html><body><article>" + para * (10_000_000 // len(para)) + b"</article>")
        if p == "/bomb":  # 10 MB of text in ~10 kB of gzip
            return self._send(200, gzip.compress(b"a" * 10_000_000), "text/plain", [("Content-Encoding", "gzip")])
        if p == "/png":
            return self._send(200, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png")
        if p == "/octet":
            return self._send(200, bytes(range(256)) * 4, "application/octet-stream")
        if p == "/nul":
            return self._send(200, b"abc\x00\x01\x02" * 50, "text/plain")
        if p == "/latin1":  # says utf-8, is ISO-8859-1
            return self._send(200, ACCENTS.encode("latin-1"), "text/plain; charset=utf-8")
        if p == "/cp1252":  # says utf-8, is Windows-1252 (curly quotes, dash, euro sign)
            text = f"\u201cHello\u201d \u2014 it costs 5 \u20ac. {ACCENTS}"
            return self._send(200, f"<html><body><p>{text}</p></body></html>".encode("cp1252"))
        if p == "/gzip":
            return self._send(200, gzip.compress(ARTICLE.encode()), headers=[("Content-Encoding", "gzip")])
        if p == "/loop":
            return self._send(302, b"", headers=[("Location", "/loop")])
        if p == "/to_other":
            return self._send(302, b"", headers=[("Location", f"http://127.0.0.1:{st.other_port}/page")])
        if p == "/to_metadata":
            return self._send(302, b"", headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        if p == "/to_file":
            return self._send(302, b"", headers=[("Location", "file:///etc/passwd")])
        if p == "/to_page":
            return self._send(301, b"", headers=[("Location", "/page")])
        if p == "/empty":
            return self._send(200, b"")
        if p == "/blank":
            return self._send(200, b"<html><body>  \n </body></html>")
        if p == "/pdf":
            return self._send(200, pdf_bytes(["Lima is the capital of Peru.", "It was founded in 1535."]),
                              "application/pdf")
        return self._send(404, b"no")


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request, client_address):  # resets and hang-ups are the point here
        pass


class Server:
    def __init__(self, other_port: int = 0):
        self.hits, self.active, self.peak, self.lock, self.other_port = {}, 0, 0, threading.Lock(), other_port
        self.httpd = _Quiet(("127.0.0.1", 0), Handler)
        self.httpd.state = self
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.base = f"http://{self.host}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def other():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def srv(other):
    s = Server(other_port=int(other.host.rsplit(":", 1)[1]))
    yield s
    s.close()


def get(srv, path, timeout=2.0, **kw):
    r = fetch(srv.base + path, timeout=timeout, allow_hosts=(srv.host,), backoff_s=0.05, **kw)
    assert isinstance(r, browse.FetchResult)
    assert r.elapsed_s <= timeout + 1.0, (path, r.elapsed_s)  # the whole call, retries included
    return r


# ------------------------------------------------------------------------------------------------ pages

def test_html_page(srv):
    r = get(srv, "/page")
    assert r.ok and r.status == 200 and r.kind == "" and r.error is None and r.title == "Lima - Wiki"
    assert "capital and largest city of Peru" in r.text and "Francisco Pizarro" in r.text
    assert "History" in r.text.splitlines() and r.text.splitlines()[0] == "Lima"  # headings kept
    for junk in ("var secret", "color:red", "Home | About", "Copyright footer", "Lima - Wiki"):
        assert junk not in r.text, junk


def test_html_short_page(srv):
    r = get(srv, "/short")  # the <title> is not repeated in the text, the footer is dropped
    assert r.ok and r.title == "Kiwi" and r.text == "Kiwi\nKiwi are flightless birds endemic to New Zealand."


def test_html_boilerplate_removed(srv):
    r = get(srv, "/article")
    assert r.ok and r.title == "Andean condor - Birds" and r.content_type.startswith("text/html")
    lines = r.text.splitlines()
    for kept in ("The Andean condor", "Range and habitat", "Conservation"):
        assert kept in lines, kept  # headings, each on its own line
    assert "largest flying birds" in r.text and "listed as vulnerable by the IUCN" in r.text
    for junk in ("window.track", "color:red", "Section 3", "BirdSite", "cookies", "sponsored", "All rights reserved",
                 "console.log"):
        assert junk not in r.text, junk


def test_charset_gzip_pdf_redirect(srv):
    r = get(srv, "/latin1")
    assert r.ok and r.text == ACCENTS
    r = get(srv, "/cp1252")
    assert r.ok and "\u201cHello\u201d \u2014 it costs 5 \u20ac." in r.text and ACCENTS in r.text
    assert "\ufffd" not in r.text
    r = get(srv, "/gzip")
    assert r.ok and "Range and habitat" in r.text and "window.track" not in r.text
    r = get(srv, "/pdf", timeout=10.0)  # about content, not timing: the first PDF parse imports pypdf
    assert r.ok and r.content_type == "application/pdf"
    assert "Lima is the capital of Peru." in r.text and "It was founded in 1535." in r.text
    r = get(srv, "/to_page")  # a redirect within the allowed host is followed; url is the final one
    assert r.ok and r.url == srv.base + "/page" and "Pizarro" in r.text


def test_big_pages_are_cut(srv):
    r = get(srv, "/big", timeout=5.0)  # 10 MB, default cap
    assert r.ok and r.truncated and r.n_bytes == browse.MAX_BYTES and len(r.text) == browse.MAX_BYTES
    r = get(srv, "/big_html", timeout=5.0, max_bytes=1_000_000)
    assert r.ok and r.truncated and r.n_bytes == 1_000_000 and "Lima is a city by the sea." in r.text
    r = get(srv, "/bomb", max_bytes=1_000_000)  # the cap holds after decompression
    assert r.ok and r.truncated and r.n_bytes == 1_000_000
    r = get(srv, "/page")
    assert not r.truncated


# ------------------------------------------------------------------------------------------------ faults

@pytest.mark.parametrize("path,kind,words", [
    ("/slow", "timeout", "timeout after 1.5 s"),
    ("/trickle_body", "timeout", "timeout after 1.5 s"),
    ("/trickle_head", "timeout", "timeout after 1.5 s"),
    ("/reset_mid", "network", "connection lost"),
    ("/png", "unsupported", "unsupported content type image/png"),
    ("/octet", "unsupported", "unsupported content type application/octet-stream"),
    ("/nul", "unsupported", "binary"),
    ("/loop", "redirects", "more than 5 redirects"),
    ("/empty", "empty", "empty page"),
    ("/blank", "empty", "no readable text"),
    ("/404", "http", "HTTP 404"),
])
def test_faults(srv, path, kind, words):
    t0 = time.monotonic()
    r = get(srv, path, timeout=1.5)
    assert not r.ok and r.kind == kind and words in r.error, r
    assert r.text == "" and time.monotonic() - t0 <= 2.5


def test_timeouts_end_on_time(srv):
    """A slow or trickling server is cut at the deadline, not a socket timeout per byte later."""
    for path in ("/slow", "/trickle_body", "/trickle_head"):
        r = get(srv, path, timeout=1.0)
        assert r.kind == "timeout" and 0.9 <= r.elapsed_s <= 1.6, (path, r.elapsed_s)


def test_connection_errors_retried_bounded(srv):
    r = get(srv, "/reset")
    assert not r.ok and r.kind == "network" and "connection" in r.error and srv.hits["/reset"] == 3  # max_tries
    r = fetch("http://127.0.0.1:9/", timeout=2.0, allow_hosts=("127.0.0.1:9",), backoff_s=0.05)
    assert not r.ok and r.kind == "network" and r.error == "connection refused" and r.elapsed_s < 1.0


def test_retries(srv):
    r = get(srv, "/flaky")
    assert r.ok and "Peru" in r.text and srv.hits["/flaky"] == 2  # 500, then 200
    r = get(srv, "/down")
    assert not r.ok and r.kind == "http" and r.status == 503 and "HTTP 503" in r.error and srv.hits["/down"] == 3
    r = get(srv, "/busy", timeout=4.0)
    assert r.ok and r.elapsed_s >= 1.0 and srv.hits["/busy"] == 2  # waited Retry-After: 1
    r = get(srv, "/busy_date", timeout=5.0)
    assert r.ok and r.elapsed_s >= 0.9 and srv.hits["/busy_date"] == 2  # an HTTP-date Retry-After too


def test_retry_after_past_deadline_fails_at_once(srv):
    r = get(srv, "/busy_long", timeout=2.0)
    assert not r.ok and r.kind == "http" and r.status == 429
    assert "retry after 30 s exceeds the 2 s timeout" in r.error
    assert r.elapsed_s < 0.5 and srv.hits["/busy_long"] == 1  # no waiting, no second try


# ------------------------------------------------------------------------------------------------ safety

def test_redirect_hops_are_checked(srv, other):
    n_other = other.hits.get("/page", 0)
    r = get(srv, "/to_other")  # another port on 127.0.0.1 is not in the allow-list
    assert not r.ok and r.kind == "blocked" and "private" in r.error
    assert r.url == f"{other.base}/page" and other.hits.get("/page", 0) == n_other  # refused before connecting
    r = get(srv, "/to_metadata")
    assert not r.ok and r.kind == "blocked" and "169.254.169.254" in r.error
    assert r.url == "http://169.254.169.254/latest/meta-data/" and r.elapsed_s < 1.0
    r = get(srv, "/to_file")
    assert not r.ok and r.kind == "blocked" and "'file'" in r.error
    # the allow-list admits exactly what it names; allow_private admits any local address
    r = fetch(srv.base + "/to_other", timeout=2.0, allow_hosts=(srv.host, other.host))
    assert r.ok and r.url == f"{other.base}/page"
    assert fetch(other.base + "/page", timeout=2.0, allow_private=True).ok


@pytest.mark.parametrize("url,kind", [
    ("file:///etc/passwd", "blocked"), ("ftp://example.org/x", "blocked"), ("javascript:alert(1)", "blocked"),
    ("", "bad_url"), ("garbage", "bad_url"), ("http://", "bad_url"), ("http://[::1", "bad_url"),
    ("http://:80/x", "bad_url"), ("http://x:99999/", "bad_url"), (None, "bad_url"), (42, "bad_url"),
    ("http://127.0.0.1:9/x", "blocked"), ("http://169.254.169.254/latest/meta-data/", "blocked"),
    ("http://10.0.0.1/", "blocked"), ("http://192.168.1.1/", "blocked"), ("http://[::1]:80/", "blocked"),
    ("http://0.0.0.0/", "blocked"), ("http://localhost/", "blocked"), ("http://[::ffff:127.0.0.1]/", "blocked"),
    ("http://2130706433/", "blocked"),  # 127.0.0.1 as one decimal number
])
def test_ssrf_guard_and_garbage(url, kind):
    r = fetch(url, timeout=1.0)
    assert not r.ok and r.kind == kind and r.error and r.elapsed_s < 1.0, r
    assert r.text == "" and r.status is None


def test_check_url():
    assert browse.check_url("http://127.0.0.1:5/", allow_hosts=("127.0.0.1:5",)) is None
    assert browse.check_url("http://127.0.0.1:6/", allow_hosts=("127.0.0.1:5",))[0] == "blocked"
    assert browse.check_url("http://127.0.0.1:6/", allow_private=True) is None
    assert browse.check_url("file:///etc/passwd", allow_private=True)[0] == "blocked"  # never another scheme


# ------------------------------------------------------------------------------------------------ pool and cache

def test_pool_order_and_per_host_limit(srv, other):
    srv.peak = other.peak = 0
    f = Fetcher(n_threads=16, per_host=3, timeout=5.0, allow_hosts=(srv.host, other.host))
    urls = [f"{(srv, other)[i % 2].base}/pool/{i}" for i in range(24)]
    t0 = time.perf_counter()
    out = f.fetch_many(urls)
    wall = time.perf_counter() - t0
    f.close()
    assert [r.url for r in out] == urls and all(r.ok for r in out)
    assert all(f"/pool/{i} " in r.text for i, r in enumerate(out))  # each result is its own URL's page
    assert srv.peak == 3 and other.peak == 3  # the limit is reached on each host, never passed
    assert wall < 24 * 0.2 / 2  # concurrent across hosts: 4 waves of 0.2 s, not 24 requests in a row
    st = f.stats
    assert st["pages"] == 24 and st["ok"] == 24 and st["bytes"] > 24 * 300 and not failures(st)


def test_extraction_slots(srv, monkeypatch):
    """HTML -> text runs in at most EXTRACT_SLOTS threads at once (CPU work under the GIL), however many fetch."""
    state = {"active": 0, "peak": 0}
    lock, real = threading.Lock(), browse.html_to_text

    def counting(page):
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        time.sleep(0.05)
        try:
            return real(page)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(browse, "html_to_text", counting)
    f = Fetcher(n_threads=16, timeout=5.0, allow_hosts=(srv.host,))
    out = f.fetch_many([srv.base + "/article"] * 12)
    f.close()
    assert all(r.ok and "Range and habitat" in r.text for r in out)
    assert state["peak"] == browse.EXTRACT_SLOTS == 2


def test_pool_stats_failures_by_kind(srv):
    f = Fetcher(n_threads=4, timeout=2.0, allow_hosts=(srv.host,), backoff_s=0.05)
    out = f.fetch_many([srv.base + "/page", srv.base + "/404", "garbage", "http://10.0.0.1/", srv.base + "/png"])
    f.close()
    assert [r.ok for r in out] == [True, False, False, False, False]
    assert failures(f.stats) == {"http": 1, "bad_url": 1, "blocked": 1, "unsupported": 1} and f.stats["ok"] == 1
    assert f.fetch_many([]) == []


def test_page_record_replay(tmp_path):
    live_srv = Server()
    db = tmp_path / "web.sqlite"
    rec = Fetcher(cache=Cache(db, "record"), allow_hosts=(live_srv.host,), timeout=1.0)
    pages = rec.fetch_many([live_srv.base + "/article", live_srv.base + "/404#frag"])
    bad = rec.fetch(live_srv.base + "/slow")  # a timeout is not recorded: another run might get the page
    rec.close()
    assert pages[0].ok and not pages[0].cached and not pages[1].ok and not bad.ok
    live_srv.close()  # replay needs no server
    rep = Fetcher(cache=Cache(db, "replay"), timeout=2.0)
    again = rep.fetch_many([live_srv.base + "/article", live_srv.base + "/404"])
    assert again[0].ok and again[0].cached and again[0].text == pages[0].text and again[0].title == pages[0].title
    assert again[1].cached and again[1].kind == "http" and again[1].status == 404  # a permanent failure replays
    miss = rep.fetch(live_srv.base + "/slow")
    assert not miss.ok and miss.kind == "cache_miss" and "replay" in miss.error
    assert rep.stats["cache_hits"] == 2 and failures(rep.stats) == {"http": 1, "cache_miss": 1}
    # replay_or_live: a miss goes live, and the server is down now
    rol = Fetcher(cache=Cache(db, "replay_or_live"), allow_hosts=(live_srv.host,), timeout=1.0, backoff_s=0.05)
    assert rol.fetch(live_srv.base + "/article").cached and rol.fetch(live_srv.base + "/page").kind == "network"


# ------------------------------------------------------------------------------------------------ Browser / Session

@pytest.fixture()
def web(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    arts = [("Lima", "Lima is the capital and largest city of Peru. It was founded in 1535 by Francisco Pizarro."),
            ("Cusco", "Cusco is a city in southeastern Peru near the Sacred Valley."),
            ("Kiwi", "Kiwi are flightless birds endemic to New Zealand.")]
    corpus.write_text("".join(json.dumps(dict(id=t, title=t, url=f"https://en.wikipedia.org/wiki/{t}", text=x)) + "\n"
                              for t, x in arts))
    b = Browser(BrowseConfig(corpus=str(corpus), top_k=2, max_queries=2, max_urls=2, snippet_chars=60,
                             obs_chars=600))
    yield b
    b.close()


def test_session_rules(web):
    s = web.session("Who founded Lima?")
    assert "Search first" in s.browse_webpage([web.backend.base_url + "/wiki/Lima"])
    obs = s.web_search(["Lima founder", "Peru capital", "a third query"])
    assert obs.startswith('Search "Lima founder":\n1. Lima\n') and 'Search "Peru capital":' in obs
    assert obs.endswith("(only the first 2 queries were run)") and "a third query" not in obs.split("(only")[0]
    assert len(obs.split("\n\n(only")[0]) <= 600  # the observation budget
    lima = web.backend.base_url + "/wiki/Lima"
    assert lima in s.urls and lima in obs  # the policy sees the URL it may browse
    page = s.browse_webpage([lima, "http://127.0.0.1:1/not-from-search"])
    assert page.startswith(f"Page {lima}:\n") and "founded in 1535 by Francisco Pizarro" in page
    assert "Page http://127.0.0.1:1/not-from-search: not in your most recent search results" in page
    assert "nothing new" in s.browse_webpage([lima])  # the reader returns only new information
    obs = s.web_search(["kiwi bird"])  # a new search: only its URLs are readable now
    assert list(s.urls) == [web.backend.base_url + "/wiki/Kiwi"] and "Kiwi" in obs
    assert "not in your most recent search results" in s.browse_webpage([lima])
    assert "flightless birds" in s.browse_webpage([web.backend.base_url + "/wiki/Kiwi"])
    assert web.fetcher.stats["pages"] == 3 and web.backend.stats["queries"] == 3


def test_session_limits_and_budgets(web):
    s = web.session("Peru cities")
    s.web_search(["Peru"])
    assert set(s.urls) == {web.backend.base_url + "/wiki/Lima", web.backend.base_url + "/wiki/Cusco"}
    three = list(s.urls) + [web.backend.base_url + "/wiki/Kiwi"]
    obs = s.browse_webpage(three)
    assert obs.endswith("(only the first 2 URLs were read)") and "/wiki/Kiwi" not in obs
    web.cfg.obs_chars = 120  # the config is read per call
    s2 = web.session("Who founded Lima?")
    obs = s2.web_search(["Peru", "Lima"])
    assert all(len(block) <= 60 for block in obs.split("\n\n")) and obs.count(" ...") == 2  # equal shares, cut
    lima = web.backend.base_url + "/wiki/Lima"
    shown = []
    for _ in range(10):  # a page's text past its share is not cut away: it waits for the next browse of the page
        obs = s2.browse_webpage([lima])
        assert len(obs) <= 120 and obs.startswith(f"Page {lima}:\n")
        shown.append(obs.split("\n", 1)[1].split("\n(")[0])
        if "browse it again to read them)" not in obs:
            break
    page_text = "Lima Lima is the capital and largest city of Peru. It was founded in 1535 by Francisco Pizarro."
    assert " ".join(shown) == page_text  # all of it, over a few browses


def test_session_fetch_failure_is_an_observation(web, srv):
    s = web.session("q?")
    s.web_search(["Lima"])
    s.urls[srv.base + "/404"] = browse.SearchResult("x", srv.base + "/404", "", 1)  # as if a search returned it
    obs = s.browse_webpage([srv.base + "/404"])  # 127.0.0.1:<srv> is not the embedded web: refused
    assert obs.startswith(f"Page {srv.base}/404: could not be fetched:") and "private" in obs


@pytest.mark.parametrize("bad", [None, [], [""], ["  ", ""], {"q": 1}, "   ", 42, 3.5])
def test_session_malformed_args_never_raise(web, bad):
    s = web.session("q?")
    assert s.web_search(bad) == "web_search needs at least one non-empty query."
    assert s.browse_webpage(bad) == "browse_webpage needs at least one URL from your most recent web_search."
    s.web_search(["Lima"])
    assert s.browse_webpage(bad) == "browse_webpage needs at least one URL from your most recent web_search."


# Session.browse_webpage's Observation.failed (issue 14): every readable page lost to the web (timeouts, 5xx,
# connection errors) is a tool failure; a page's own refusal (404) or a URL not from the last search is not.
def test_browse_failed_only_when_the_web_failed(web, srv):
    web.fetcher.fetch_kw.update(allow_hosts=(srv.host,), backoff_s=0.05, timeout=2.0)
    s = web.session("q?")
    assert s.web_search(["Lima"]).failed is False
    for path in ("/down", "/busy_long", "/404", "/reset"):
        s.urls[srv.base + path] = browse.SearchResult("x", srv.base + path, "", 1)  # as if a search returned it
    obs = s.browse_webpage([srv.base + "/down", srv.base + "/busy_long"])  # 503 every try; 429, come back in 30 s
    assert isinstance(obs, browse.Observation) and obs.failed and "HTTP 503" in obs and "HTTP 429" in obs
    assert s.browse_webpage([srv.base + "/reset"]).failed  # the connection reset, every try
    obs = s.browse_webpage([srv.base + "/404"])
    assert not obs.failed and "HTTP 404" in obs
    assert not s.browse_webpage([srv.base + "/down", srv.base + "/404"]).failed  # only some pages failed
    assert not s.browse_webpage([srv.base + "/down", web.backend.base_url + "/wiki/Lima"]).failed
    assert not s.browse_webpage(["http://not-from-search.org/"]).failed
    assert not s.browse_webpage([]).failed
