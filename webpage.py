"""One web page, safely: `fetch(url) -> FetchResult` fetches a URL and returns its readable text, and never raises.

What it does
- http(s) only; a host that resolves to a private, loopback, link-local, multicast or reserved address is refused
  (`check_url`, run on every redirect hop; `allow_hosts` admits e.g. the embedded web on 127.0.0.1).
- One wall-clock deadline per call over connect, slow or trickling headers and bodies (a watchdog thread shuts the
  socket at the deadline) and retries (connection errors, 429, 5xx; jittered backoff, Retry-After); a byte cap.
- Bytes -> text: the declared charset, <meta>, UTF-8, then charset_normalizer's guess; gzip; HTML through
  trafilatura (BeautifulSoup fallback), text as is, PDF through pypdf, anything else "unsupported content type".
  At most EXTRACT_SLOTS threads convert at once (CPU work under the GIL).
- browse.py builds on it: its `Fetcher` adds the thread pool, the per-host limit, the record/replay cache and stats.

What it does not do
- No JavaScript rendering, no cookies or logins. A DNS answer that changes between the address check and the
  connection (DNS rebinding) is not caught: fetch untrusted policies' URLs where the private network holds nothing
  to steal.

How to run
    python browse.py fetch https://example.org/ [--allow_private=1]     # one page's readable text, as JSON
    python -m pytest -q tests/test_fetch.py
"""

from __future__ import annotations

import heapq
import html
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

USER_AGENT = "Mozilla/5.0 (compatible; deepresearch-agent/0.1; +https://github.com/)"
MAX_BYTES = 5_000_000  # a page is cut here (after decompression); the readers never need more

_thread = threading.local()  # per thread: its requests.Session, and the watchdog of the fetch it runs
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("application/json", "application/xml", "application/javascript")


@dataclass
class FetchResult:
    ok: bool
    status: int | None      # HTTP status of the last response (None when no response came)
    url: str                # the final URL, after redirects
    text: str = ""          # readable text (main content of HTML, text as is, PDF text)
    error: str | None = None  # a short reason when not ok: "timeout after 10 s", "HTTP 404 Not Found", ...
    elapsed_s: float = 0.0
    content_type: str = ""
    n_bytes: int = 0        # body bytes read (after decompression)
    title: str = ""
    kind: str = ""          # failure: bad_url blocked dns timeout network http redirects unsupported empty cache_miss
    truncated: bool = False  # the body was cut at max_bytes
    cached: bool = False


def _ip_blocked(ip) -> bool:
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified)


def check_url(url: str, allow_private: bool = False, allow_hosts=()) -> tuple[str, str] | None:
    """None when `url` may be fetched, else (kind, reason). The URLs come from a model, so only http(s) is allowed,
    and a host that resolves to a loopback, private, link-local, multicast or reserved address is refused unless
    allow_private or `host:port` (or `host`) is in allow_hosts. Run on every redirect hop. (A DNS answer that changes
    between this check and the connection is not caught: run the fetcher where the private network has nothing to
    steal, or behind an egress proxy, when the policy is untrusted.)"""
    import ipaddress
    try:
        p = urlsplit(url.strip())
        port = p.port or (443 if p.scheme == "https" else 80)
    except (ValueError, AttributeError):
        return "bad_url", "not a valid URL"
    if not p.scheme:
        return "bad_url", "not a URL (no http:// or https://)"
    if p.scheme not in ("http", "https"):
        return "blocked", f"scheme {p.scheme!r} is not allowed, only http and https"
    host = (p.hostname or "").rstrip(".")
    if not host:
        return "bad_url", "the URL has no host"
    if allow_private or f"{host}:{port}" in allow_hosts or host in allow_hosts:
        return None
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError, ValueError):
        return "dns", f"could not resolve host {host}"
    for a in addrs:
        if _ip_blocked(ipaddress.ip_address(a.split("%")[0])):
            return "blocked", f"{host} resolves to a private or reserved address ({a})"
    return None


class _Watchdog:
    """The deadline of one fetch() on one thread. A socket timeout restarts at every byte, so a server that trickles
    its status line or headers would hold the thread for hours; at the deadline this shuts the socket in use down
    (the connection registers itself on `_thread.watchdog` when it waits for the response). One daemon thread serves
    every watchdog of the process from a heap of deadlines (a thread per fetch costs ~1 ms to start)."""
    _cond = threading.Condition()
    _heap: list = []  # (deadline, seq, watchdog); cancelled ones are dropped when they reach the top
    _seq = 0
    _thread: threading.Thread | None = None

    def __init__(self, seconds: float):
        self.sock, self.fired, self.done = None, False, False
        cls = _Watchdog
        with cls._cond:
            cls._seq += 1
            entry = (time.monotonic() + seconds, cls._seq, self)
            heapq.heappush(cls._heap, entry)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="fetch-watchdog", daemon=True)
                cls._thread.start()
            if cls._heap[0] is entry:  # a new earliest deadline: wake the thread to sleep less
                cls._cond.notify()

    @staticmethod
    def _run() -> None:
        cls = _Watchdog
        with cls._cond:
            while True:
                now = time.monotonic()
                while cls._heap and (cls._heap[0][2].done or cls._heap[0][0] <= now):
                    w = heapq.heappop(cls._heap)[2]
                    if not w.done:
                        w.fire()
                cls._cond.wait(cls._heap[0][0] - now if cls._heap else None)

    def attach(self, sock) -> None:
        self.sock = sock
        if self.fired:
            self.fire()

    def fire(self) -> None:
        self.fired = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self.done = True
        self.sock = None


# HTML/PDF -> text is CPU work under the GIL: threads running it at once only take turns, and with 32 of them the
# switching cost more than the work (bench/browse.py: 7.6 -> 4.0 ms of CPU per page, 15x -> 21-25x speedup, with
# 1-2 slots). Two slots, so that one pathological page cannot stall every other page's extraction.
EXTRACT_SLOTS = 2
_extracting = threading.BoundedSemaphore(EXTRACT_SLOTS)


def _after_fork() -> None:
    """A forked child has no watchdog thread, and a lock may have been held by a thread that did not come along."""
    global _extracting
    _Watchdog._cond, _Watchdog._heap, _Watchdog._thread = threading.Condition(), [], None
    _extracting = threading.BoundedSemaphore(EXTRACT_SLOTS)


os.register_at_fork(after_in_child=_after_fork)


_WATCHED_POOLS: dict = {}


def _watched_pools() -> dict:
    """urllib3 pool classes whose connections hand their socket to this thread's watchdog before reading headers."""
    if not _WATCHED_POOLS:
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        def watched(pool_cls):
            class Conn(pool_cls.ConnectionCls):
                def getresponse(self, *a, **kw):
                    w = getattr(_thread, "watchdog", None)
                    if w is not None:
                        w.attach(self.sock)
                    return super().getresponse(*a, **kw)
            return type("Watched" + pool_cls.__name__, (pool_cls,), {"ConnectionCls": Conn})
        _WATCHED_POOLS.update(http=watched(HTTPConnectionPool), https=watched(HTTPSConnectionPool))
    return _WATCHED_POOLS


def _http_session():
    """One requests.Session per thread (connection reuse; Session objects are not thread-safe)."""
    import requests
    s = getattr(_thread, "http", None)
    if s is None:
        s = _thread.http = requests.Session()
        s.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate"})
        for adapter in s.adapters.values():  # (a proxy from the environment gets urllib3's plain pools)
            adapter.poolmanager.pool_classes_by_scheme = _watched_pools()
    return s


def _sock_timeout(resp, seconds: float) -> None:
    """Bound the next socket read by the time left (urllib3 keeps the read timeout it started with)."""
    try:
        resp.raw._fp.fp.raw._sock.settimeout(max(seconds, 0.01))
    except (AttributeError, OSError):
        pass


def _read_body(resp, deadline: float, max_bytes: int) -> tuple[bytes, bool, str | None]:
    """(body, truncated, None) or (partial, False, "timeout" | "network"): read as bytes arrive, so a server that
    trickles cannot hold the thread past the deadline."""
    import urllib3
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(buf), False, "timeout"
        _sock_timeout(resp, left)
        try:
            chunk = resp.raw.read1(65536, decode_content=True)
        except (TimeoutError, socket.timeout, urllib3.exceptions.ReadTimeoutError):
            return bytes(buf), False, "timeout"
        except (urllib3.exceptions.HTTPError, OSError):
            return bytes(buf), False, "timeout" if time.monotonic() >= deadline else "network"
        if not chunk:  # the end of the page, or the watchdog shut the socket at the deadline
            return bytes(buf), False, "timeout" if time.monotonic() >= deadline else None
        buf += chunk
        if len(buf) >= max_bytes:
            return bytes(buf[:max_bytes]), True, None


_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_\-:.]+)""", re.I)


_LATIN = {"cp1250", "cp1252", "latin_1", "iso8859_2", "iso8859_15", "iso8859_9", "cp1254", "mac_roman", "cp1257"}


def _decodes(body: bytes, enc: str) -> bool:
    try:
        body.decode(enc)
        return True
    except UnicodeDecodeError:
        return False


def decode_body(body: bytes, declared: str | None = None, is_html: bool = False) -> str:
    """Bytes -> str: the declared charset (header, then <meta>), then UTF-8, then charset_normalizer's guess, then
    UTF-8 with replacement characters. A wrong declaration falls through to the next guess."""
    cands = [declared]
    if is_html and (m := _META_CHARSET.search(body[:4096])):
        cands.append(m.group(1).decode("ascii", "ignore"))
    for enc in [c for c in cands if c] + ["utf-8"]:
        try:
            return body.decode(enc)
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        import charset_normalizer
        best = charset_normalizer.from_bytes(body[:500_000]).best()
        if best is not None:
            # a short Western text is ambiguous among the Latin code pages; cp1252 is the web's usual mislabel
            enc = "cp1252" if best.encoding in _LATIN and _decodes(body, "cp1252") else best.encoding
            return body.decode(enc, errors="replace")
    except Exception:  # a detector failure must not lose the page
        pass
    return body.decode("utf-8", errors="replace")


def _squeeze(text: str) -> str:
    lines = (" ".join(ln.split()) for ln in text.splitlines())
    return "\n".join(ln for ln in lines if ln)


# (the <title> is FetchResult.title; left in, it would also open the text)
_DROP_TAGS = ("title", "script", "style", "noscript", "nav", "header", "footer", "aside", "form", "iframe", "svg",
              "template")


def html_to_text(page: str) -> tuple[str, str]:
    """(title, main text) of an HTML page: trafilatura's main-content extraction (boilerplate, navigation, scripts
    out; headings, paragraphs, lists and tables kept), BeautifulSoup with those tags removed as the fallback when
    trafilatura finds little."""
    m = re.search(r"<title[^>]*>(.*?)</title>", page[:20000], re.I | re.S)
    title = " ".join(html.unescape(m.group(1)).split()) if m else ""
    try:
        import trafilatura
        text = trafilatura.extract(page, include_comments=False, include_tables=True) or ""
    except Exception:  # trafilatura can choke on hostile markup; the fallback still reads it
        text = ""
    if len(text) < 200:
        from bs4 import BeautifulSoup
        soup = BeautifulSoup(page, "lxml")
        for t in soup(_DROP_TAGS):
            t.decompose()
        alt = _squeeze(soup.get_text("\n"))
        text = alt if len(alt) > len(text) else text
    return title, _squeeze(text)


def pdf_to_text(body: bytes) -> str:
    import io
    from pypdf import PdfReader
    return _squeeze("\n".join((p.extract_text() or "") for p in PdfReader(io.BytesIO(body)).pages))


def _page_from_body(body: bytes, ctype_header: str) -> tuple[str, str, str | None]:
    """(title, text, error) from a response body and its Content-Type header."""
    ctype, _, params = ctype_header.partition(";")
    ctype = ctype.strip().lower()
    m = re.search(r"charset=[\"']?([^;\"'\s]+)", params, re.I)
    charset = m.group(1) if m else None
    head = body[:2048]
    if not ctype:  # no header: sniff
        low = head.lstrip().lower()
        ctype = ("application/pdf" if head.startswith(b"%PDF") else
                 "text/html" if low.startswith((b"<!doctype html", b"<html")) else "text/plain")
    if ctype == "application/pdf":
        try:
            return "", pdf_to_text(body), None
        except Exception as e:
            return "", "", f"unreadable PDF ({type(e).__name__})"
    if ctype not in HTML_TYPES and not ctype.startswith("text/") and ctype not in TEXT_TYPES:
        return "", "", f"unsupported content type {ctype}"
    if b"\x00" in head:
        return "", "", f"binary content served as {ctype}"
    text = decode_body(body, charset, ctype in HTML_TYPES)
    if ctype in HTML_TYPES:
        return (*html_to_text(text), None)
    return "", _squeeze(text), None


def _fail(url: str, kind: str, error: str, status: int | None = None, **kw) -> FetchResult:
    return FetchResult(False, status, url, error=error, kind=kind, **kw)


def _fetch_once(sess, url: str, deadline: float, timeout: float, max_bytes: int, max_redirects: int,
                allow_private: bool, allow_hosts) -> tuple[FetchResult, float | None]:
    """One try, following redirects by hand (each hop is checked). Returns (result, retry): retry is None when
    the result is final, else the seconds to wait before another try (0 = use the backoff)."""
    import requests
    import urllib3
    cur = url
    for _ in range(max_redirects + 1):
        bad = check_url(cur, allow_private, allow_hosts)
        if bad:
            return _fail(cur, *bad), None
        left = deadline - time.monotonic()
        if left <= 0:
            return _fail(cur, "timeout", f"timeout after {timeout:g} s"), None
        try:
            resp = sess.get(cur, stream=True, allow_redirects=False, timeout=urllib3.Timeout(total=left))
        except requests.exceptions.Timeout:
            return _fail(cur, "timeout", f"timeout after {timeout:g} s"), None
        except requests.exceptions.ConnectionError as e:
            if time.monotonic() >= deadline:  # the watchdog cut a response that came too slowly
                return _fail(cur, "timeout", f"timeout after {timeout:g} s (response sent too slowly)"), None
            reason = "connection refused" if "refused" in str(e).lower() else "connection failed"
            return _fail(cur, "network", reason), 0.0
        except (requests.exceptions.RequestException, ValueError, UnicodeError) as e:
            return _fail(cur, "bad_url", f"not a fetchable URL ({type(e).__name__})"), None
        with resp:
            code = resp.status_code
            if resp.is_redirect:
                cur = requests.compat.urljoin(cur, resp.headers["location"])
                continue
            ctype = resp.headers.get("content-type", "")
            if code == 429 or code >= 500:
                wait = _retry_after_s(resp.headers.get("retry-after"))
                return _fail(cur, "http", f"HTTP {code} {resp.reason or ''}".strip(), code), (wait or 0.0)
            if code >= 400:
                return _fail(cur, "http", f"HTTP {code} {resp.reason or ''}".strip(), code), None
            body, truncated, err = _read_body(resp, deadline, max_bytes)
        if err == "timeout":
            return _fail(cur, "timeout", f"timeout after {timeout:g} s (page sent too slowly)", code), None
        if err:
            return _fail(cur, "network", "connection lost while reading the page", code), 0.0
        if not body.strip():
            return _fail(cur, "empty", "empty page", code, content_type=ctype), None
        with _extracting:
            title, text, why = _page_from_body(body, ctype)
        if why:
            return _fail(cur, "unsupported", why, code, content_type=ctype, n_bytes=len(body)), None
        if not text:
            return _fail(cur, "empty", "no readable text on the page", code, content_type=ctype,
                         n_bytes=len(body)), None
        return FetchResult(True, code, cur, text, None, 0.0, ctype, len(body), title, "", truncated), None
    return _fail(cur, "redirects", f"more than {max_redirects} redirects"), None


def fetch(url: str, *, timeout: float = 10.0, max_bytes: int = MAX_BYTES, allow_private: bool = False,
          allow_hosts=(), max_redirects: int = 5, max_tries: int = 3, backoff_s: float = 0.5) -> FetchResult:
    """Fetch one URL and return its readable text; never raises. The whole call, retries included, ends within
    `timeout` seconds (plus the last socket read's scheduling slack). Connection errors, 429 and 5xx are retried
    with jittered exponential backoff, honouring Retry-After, at most `max_tries` tries and never past the deadline."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    _thread.watchdog = watchdog = _Watchdog(timeout)
    try:
        sess = _http_session()
        for attempt in range(max_tries):
            res, retry = _fetch_once(sess, url, deadline, timeout, max_bytes, max_redirects, allow_private,
                                     allow_hosts)
            if retry is None or attempt == max_tries - 1:
                break
            wait = retry or backoff_s * 2 ** attempt * random.uniform(0.5, 1.5)
            if time.monotonic() + wait >= deadline:
                if retry:  # Retry-After asks for more time than is left
                    res.error += f" (retry after {retry:g} s exceeds the {timeout:g} s timeout)"
                break
            time.sleep(wait)
    except Exception as e:  # a bug or a library surprise must not take a rollout down: report it as a result
        res = _fail(url, "network", f"fetch failed ({type(e).__name__}: {str(e)[:100]})")
    finally:
        watchdog.cancel()
        _thread.watchdog = None
    res.elapsed_s = time.monotonic() - t0
    return res


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds (a number or an HTTP date, parsed by urllib3), None when absent or unreadable."""
    from urllib3.exceptions import HTTPError
    from urllib3.util.retry import Retry
    try:
        return Retry().parse_retry_after(value) if value else None
    except (HTTPError, TypeError, ValueError, OverflowError):
        return None
