"""The agent's web, in the order the agent meets it: config, the two tools, search back ends, page fetching, readers.

- `Browser(BrowseConfig)` (one per process, thread-safe) gives each trajectory a `session(question)` with the
  policy's two tools, `web_search(queries)` and `browse_webpage(urls)`. They never raise: each returns an
  `Observation` (a str) whose `.failed` says the web, not the policy, failed (rollout.py ends such a trajectory as
  "tool_failure"). Only URLs from the trajectory's most recent search are readable (the reference rule).
- Search back ends: `serper` (Google), `searxng` and `local` (BM25 over the embedded Wikipedia summaries, served as
  HTML on 127.0.0.1 by data/localweb.py); an error is a value, per query. `Cache`: one SQLite file records searches,
  pages and readings and replays them.
- `fetch(url)`: http(s) only, private addresses refused on every redirect hop, one deadline over the whole fetch, a
  byte cap; HTML (trafilatura), text and PDF to readable text. A DNS answer that changes between the address check
  and the connection (rebinding) is not caught: fetch an untrusted policy's URLs where the private network holds
  nothing to steal.
- Readers take a page in `chunk_chars` chunks, resume where the last call stopped and return only new information:
  `extract` (no model: BM25 over the chunk's passages) or `llm` (an OpenAI-compatible endpoint, the reference's).
No dense retrieval, JavaScript, cookies or torch; nothing of a page but its readable text reaches the policy.

How to run (flags: BrowseConfig's fields)
    python browse.py search "highest mountain on Earth" --backend=local --top_k=5
    SERPER_API_KEY=... python browse.py search "who wrote hamlet" --backend=serper --cache=runs/web.sqlite \\
        --cache_mode=record        # then --cache_mode=replay replays it without the key
    python -c "import browse; print(browse.fetch('https://example.org/'))"   # one page's readable text
    python -m data.localweb                                           # browse the embedded web at the printed URL
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import http.client
import io
import ipaddress
import json
import math
import os
import random
import re
import socket
import sqlite3
import sys
import threading
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from data.config import parse_config

SERPER_USD_PER_QUERY = 0.001  # Serper's list price at volume, ~$1 per 1k queries (Nov 2026); an estimate, not a bill
CACHE_MODES = ("live", "record", "replay", "replay_or_live")
RETRY_STATUS = (429, 500, 502, 503, 504)  # worth another try; any other status is the answer
MAX_BACKOFF_S = 30  # the longest wait between tries, Retry-After included
MAX_BYTES = 5_000_000  # a page is cut here (after decompression); the readers never need more


@dataclass
class BrowseConfig:  # (plain typed defaults, "" = unset: the flags of `python browse.py`, data/config.py)
    backend: str = "local"              # local | serper | searxng
    top_k: int = 10                     # results per query (the reference: 10)
    corpus: str = ""                    # local back end's JSONL corpus ("" = the embedded Wikipedia summaries)
    searxng_url: str = ""               # searxng: the instance ("" = $SEARXNG_URL)
    cache: str = ""                     # SQLite record/replay file for searches, pages and readings ("" = none)
    cache_mode: str = "replay_or_live"
    reader: str = "extract"             # extract | llm
    max_queries: int = 3                # queries per web_search call (the reference: 3)
    max_urls: int = 3                   # URLs per browse_webpage call
    chunk_chars: int = 40_000           # page chunk a reader takes at once (the reference: ~40k characters)
    max_chunks: int = 4                 # chunks read per page per call (bounds the reading loop)
    page_chars: int = 1500              # information returned per page per call
    snippet_chars: int = 300
    obs_chars: int = 4000               # the whole observation
    llm_base_url: str = ""              # reader=llm: OpenAI-compatible endpoint
    llm_model: str = ""
    llm_api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never logged; "" for local servers
    llm_timeout: float = 60.0
    n_threads: int = 32                 # fetch pool
    per_host: int = 8                   # concurrent requests to one host
    timeout: float = 10.0               # per page, retries included
    max_bytes: int = MAX_BYTES
    allow_private: bool = False         # fetch private/loopback addresses (the embedded web is always allowed)
    allow_hosts: str = ""               # comma-separated host or host:port admitted past the private-address guard


# ------------------------------------- the two tools the policy calls: Session (one per trajectory), Browser (shared)

class Observation(str):
    """A tool's text and `failed` (see the module docstring). No results, a 404, a URL not from the last search or a
    call where only some queries or pages failed are answers, not failures."""
    failed: bool = False

    def __new__(cls, text: str, failed: bool = False):
        obs = super().__new__(cls, text)
        obs.failed = failed
        return obs


class Session:
    """One trajectory's tools (see the module docstring); re-browsing a page resumes where its reading stopped."""

    def __init__(self, browser: "Browser", question: str):
        self.browser, self.question = browser, question
        self.queries: list[str] = []
        self.urls: dict[str, SearchResult] = {}  # url -> result, from the most recent search
        self.pages: dict[str, PageState] = {}

    @staticmethod
    def _clean(items, limit: int) -> tuple[list[str], int]:
        """The policy's arguments as distinct non-empty strings (at most `limit`) and how many were dropped."""
        items = [items] if isinstance(items, str) else items if isinstance(items, (list, tuple)) else []
        out = list(dict.fromkeys(filter(None, (" ".join(str(x).split()) for x in items))))  # distinct, in order
        return out[:limit], max(len(out) - limit, 0)

    def web_search(self, queries) -> Observation:
        cfg = self.browser.cfg
        queries, dropped = self._clean(queries, cfg.max_queries)
        if not queries:
            return Observation("web_search needs at least one non-empty query.")
        try:
            results = self.browser.backend.search(queries)
        except CacheMiss as e:  # a set-up problem of the run, but the policy still gets an observation
            results = [WebError("cache_miss", f"not in the replay cache ({e.kind})")] * len(queries)
        self.queries = queries
        self.urls = {r.url: r for res in results if not isinstance(res, Exception) for r in res}
        text = render_search(queries, results, cfg.snippet_chars, cfg.obs_chars,
                             dropped and f"(only the first {cfg.max_queries} queries were run)")
        # every query's back-end call failed (timeout, 5xx, quota, network, auth, replay miss): nothing the policy did
        return Observation(text, failed=all(isinstance(res, Exception) for res in results))

    def browse_webpage(self, urls) -> Observation:
        cfg = self.browser.cfg
        urls, dropped = self._clean(urls, cfg.max_urls)
        if not urls:
            return Observation("browse_webpage needs at least one URL from your most recent web_search.")
        if not self.urls:
            return Observation("Search first: browse_webpage reads URLs from your most recent web_search results.")
        readable = [u for u in urls if u in self.urls]
        fetched = dict(zip(readable, self.browser.fetcher.fetch_many(readable)))
        blocks, down = [], 0  # down: readable pages lost to the web (an outage, not the page's own refusal)
        for u in urls:
            res = fetched.get(u)
            if res is None:
                blocks.append(f"Page {u}: not in your most recent search results; browse one of their URLs.")
            elif not res.ok:
                down += res.transient
                blocks.append(f"Page {u}: could not be fetched: {res.error}.")
            else:
                if u not in self.pages:
                    self.pages[u] = PageState(u, res.title, chunk_text(res.text, cfg.chunk_chars))
                try:
                    info = self.browser.reader.read(self.pages[u], self.question, self.queries)
                    blocks.append(f"Page {u}:\n{info}" if info else
                                  f"Page {u}: nothing new on this page about the question.")
                except WebError as e:  # the reading model's endpoint, not the policy, failed
                    down += 1
                    blocks.append(f"Page {u}: fetched, but the reading model failed: {e}.")
        text = _render(blocks, cfg.obs_chars, dropped and f"(only the first {cfg.max_urls} URLs were read)")
        return Observation(text, failed=bool(readable) and down == len(readable))


def render_search(queries: list[str], results: list, snippet_chars: int, obs_chars: int, note: str | None = None):
    """The web_search observation: per query its numbered results (title, URL, snippet) or its error."""
    return _render([f'Search "{q}" failed: {res}.' if isinstance(res, Exception) else
                    "\n".join([f'Search "{q}":' if res else f'Search "{q}": no results.'] +
                              [f"{r.rank}. {r.title}\n{r.url}\n{_cut(r.snippet, snippet_chars)}" for r in res])
                    for q, res in zip(queries, results)], obs_chars, note)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:max(n - 4, 0)].rstrip() + " ..."


def _render(blocks: list[str], budget: int, note: str | None) -> str:
    """One observation: the blocks (one per query or page), each cut to an equal share of the budget, and a note."""
    share = budget // max(len(blocks), 1)
    return "\n\n".join([_cut(b, share) for b in blocks] + ([note] if note else []))


class Browser:
    """The web of a run, shared by every trajectory of a process (thread-safe): a search back end, a page fetcher
    with its pool, a reader, and one record/replay Cache under all three. `session(question)` per trajectory."""

    def __init__(self, cfg: BrowseConfig | None = None, *, reader=None, backend=None):
        self.cfg = cfg = cfg or BrowseConfig()
        readers = {"extract": ExtractReader, "llm": LLMReader}
        if reader is None and cfg.reader not in readers:
            raise ValueError(f"unknown reader {cfg.reader!r}: use extract or llm (or pass a reader object)")
        self.cache = Cache(cfg.cache, cfg.cache_mode) if cfg.cache else None
        # the reader: extract | llm, or any object with `read(page: PageState, question, queries) -> str` (the seam
        # for a `policy` reader: the trained model reading through our engine)
        self.reader = reader if reader is not None else readers[cfg.reader](cfg, self.cache)
        opts = {"url": cfg.searxng_url} if cfg.backend == "searxng" and cfg.searxng_url else {}
        self.backend = backend or make_backend(cfg.backend, top_k=cfg.top_k, corpus=cfg.corpus or None,
                                               cache=self.cache, **opts)
        # the embedded web: its canonical host maps to this process's server, the one private host allowed
        aliases = dict(getattr(self.backend, "aliases", {}))
        self.fetcher = Fetcher(cache=self.cache, aliases=aliases, n_threads=cfg.n_threads, per_host=cfg.per_host,
                               timeout=cfg.timeout, max_bytes=cfg.max_bytes, allow_private=cfg.allow_private,
                               allow_hosts=(*filter(None, cfg.allow_hosts.split(",")), *aliases.values()))

    def session(self, question: str) -> Session:
        return Session(self, question)

    def close(self) -> None:
        self.fetcher.close()
        self.backend.close()
        if self.cache is not None:
            self.cache.close()


# ---------------------------------------------- search: records, errors, the shared driver, HTTP, the three back ends

@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str
    rank: int  # 1-based position in the back end's list


class WebError(RuntimeError):
    """A failed search, reading-model call or other request, kept as a value the policy can be shown; reads "kind:
    message". kind: auth | rate_limit | server | timeout | network | malformed | http | config | cache_miss; tries: the
    HTTP requests it took."""

    def __init__(self, kind: str, message: str, tries: int = 0):
        super().__init__(message)
        self.kind, self.tries = kind, tries

    def __str__(self) -> str:
        return f"{self.kind}: {super().__str__()}"


class Backend:
    """What every back end shares: the cache, a small pool and `stats` (a Counter: queries, api_calls, cache_hits,
    cost_usd, latency_s and "failed:<kind>") around each one's `_search_one(query, st)`, which returns one query's
    results, raises WebError and counts its requests in st["api_calls"]."""
    name = "?"
    usd_per_query = 0.0

    def __init__(self, top_k: int = 10, cache: Cache | None = None, n_threads: int = 4):
        self.top_k, self.cache = int(top_k), cache
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix=f"search-{self.name}")
        self.options: dict = {}  # whatever changes the results; part of the cache key

    def _one(self, query: str) -> list[SearchResult] | WebError:
        st, t0 = Counter(queries=1), time.perf_counter()
        key = search_key(self.name, query, self.top_k, self.options)
        try:
            hit = self.cache.get("search", key) if self.cache is not None else None  # CacheMiss propagates
            if hit is not None:
                st["cache_hits"] = 1
                out = [SearchResult(**r) for r in hit["results"]]
            else:
                out = self._search_one(query, st)
                st["cost_usd"] = self.usd_per_query
                if self.cache is not None:
                    self.cache.put("search", key, {"query": query, "results": [asdict(r) for r in out]})
        except WebError as e:
            st[f"failed:{e.kind}"], out = 1, e
        st["latency_s"] = time.perf_counter() - t0
        with self._lock:
            self.stats.update(st)
        return out

    def search(self, queries: list[str]) -> list[list[SearchResult] | WebError]:
        """Results or a WebError per query, run concurrently. CacheMiss (replay) is raised: it is a set-up
        problem (wrong cache file or mode), not a web failure the policy should see."""
        return list(self._pool.map(self._one, [queries] if isinstance(queries, str) else queries))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


_thread = threading.local()  # per thread: its requests.Sessions (not thread-safe), and the deadline of its fetch()


def http_session(max_tries: int = 1, backoff_s: float = 0.5):
    """This thread's requests.Session for one retry policy: urllib3's Retry retries any method (ours are idempotent)
    after backoff_s * 2**n plus jitter, or Retry-After, up to MAX_BACKOFF_S, and returns the last 429/5xx response
    instead of raising. fetch() uses max_tries=1 and retries itself, within its deadline."""
    sessions = _thread.__dict__.setdefault("sessions", {})
    if (max_tries, backoff_s) not in sessions:
        retry = Retry(total=max_tries - 1, status_forcelist=RETRY_STATUS, allowed_methods=None,
                      backoff_factor=backoff_s, backoff_jitter=backoff_s, backoff_max=MAX_BACKOFF_S,
                      retry_after_max=MAX_BACKOFF_S, raise_on_status=False)
        sessions[max_tries, backoff_s] = s = requests.Session()
        s.headers["User-Agent"] = "Mozilla/5.0 (compatible; deepresearch-agent/0.1)"
        for scheme in ("http://", "https://"):
            s.mount(scheme, adapter := HTTPAdapter(max_retries=retry))
            adapter.poolmanager.pool_classes_by_scheme = _deadline_pools()  # (a proxy gets urllib3's plain pools)
    return sessions[max_tries, backoff_s]


def _timed_out(e: Exception) -> bool:
    """Whether a requests exception is a timeout. Retries used up on read timeouts come as a ConnectionError around
    a ReadTimeoutError; a refused connection is, oddly, a NewConnectionError, a subclass of ConnectTimeoutError."""
    reason = getattr(e.args[0] if e.args else None, "reason", None)
    return isinstance(e, requests.Timeout) and not isinstance(reason, urllib3.exceptions.NewConnectionError) or \
        isinstance(reason, urllib3.exceptions.ReadTimeoutError)


def http_json(method: str, url: str, *, name: str, timeout: float, max_tries: int = 3, backoff_s: float = 0.5,
              secret: str = "", auth_hint: str = "check the key", **kw):
    """One JSON request through `http_session`: (parsed body, tries), or raises WebError(kind, message, tries). Every
    message is cut short and has `secret` scrubbed out (servers echo keys back in their error bodies)."""
    def fail(kind: str, message: str, tries: int = max_tries) -> WebError:
        return WebError(kind, message.replace(secret, "***") if secret else message, tries)

    try:
        r = http_session(max_tries, backoff_s).request(method, url, timeout=timeout, **kw)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        if _timed_out(e):
            raise fail("timeout", f"{name}: no answer within {timeout:g} s, {max_tries} tries") from None
        raise fail("network", f"{name} unreachable ({type(e).__name__}) after {max_tries} tries") from None
    tries = 1 + len(getattr(r.raw.retries, "history", ()) or ())
    if r.status_code in (401, 403):  # retrying a bad key only burns quota and time: say what to check
        raise fail("auth", f"{name} refused access (HTTP {r.status_code}): {auth_hint}", tries)
    if r.status_code in RETRY_STATUS or r.status_code >= 500:
        kind = "rate_limit" if r.status_code == 429 else "server"
        raise fail(kind, f"{name} answered HTTP {r.status_code} after {tries} tries", tries)
    if r.status_code != 200:
        raise fail("http", f"{name} answered HTTP {r.status_code}: {r.text[:200]}", tries)
    try:
        return r.json(), tries
    except ValueError:  # a proxy's HTML error page or a truncated body: say what we got
        raise fail("malformed", f"{name}: the response is not JSON: {r.text[:200]!r}", tries) from None


# The HTTP search APIs. url: a fixed endpoint, else make_backend(url=...) or $url_env (then part of the cache key),
# plus path; the query goes as a JSON body (POST) or URL parameters (GET) with `fixed`, `params` (make_backend's
# options override them) and the top-k under count_key; a key from $key_env goes in an X-API-KEY header; results:
# the response's list of results and each one's URL and snippet keys.
PROVIDERS = {
    "serper": dict(url="https://google.serper.dev/search", method="POST", count_key="num", key_env="SERPER_API_KEY",
                   params={"gl": "us", "hl": "en"}, results=("organic", "link", "snippet"),
                   usd_per_query=SERPER_USD_PER_QUERY,
                   needs="an API key: export SERPER_API_KEY=<your key> (get one at https://serper.dev), or use "
                         "--backend=local / --backend=searxng",
                   auth_hint="the Serper API key in SERPER_API_KEY was rejected or has no credit"),
    "searxng": dict(url_env="SEARXNG_URL", path="/search", method="GET", fixed={"format": "json"},
                    params={"language": "en"}, results=("results", "url", "content"),
                    needs="the instance URL: --searxng_url=http://host:8080 or export SEARXNG_URL=...",
                    auth_hint="the SearXNG instance refused the request; is format=json enabled in its settings.yml?"),
}


class HTTPBackend(Backend):
    """A search API of PROVIDERS over HTTP (`http_json`: timeouts, bounded retries, Retry-After, auth errors at
    once). Options (serper: gl, hl, location; searxng: language, categories, engines) go with every query."""

    def __init__(self, name: str, top_k=10, cache=None, *, url: str | None = None, api_key: str | None = None,
                 n_threads=4, timeout=10.0, max_tries=4, backoff_s=1.0, **options):
        self.name, self.spec = name, PROVIDERS[name]
        super().__init__(top_k, cache, n_threads)
        self.usd_per_query = self.spec.get("usd_per_query", 0.0)
        self.url = (url or self.spec.get("url") or os.environ.get(self.spec["url_env"], "")).rstrip("/")
        self._secret = api_key or os.environ.get(self.spec.get("key_env", "-"), "")
        replay = cache is not None and cache.mode == "replay"  # replay needs no key: no request is made
        if not self.url or "key_env" in self.spec and not self._secret and not replay:
            raise WebError("config", f"the {name} back end needs {self.spec['needs']}")
        self.http = dict(timeout=timeout, max_tries=max_tries, backoff_s=backoff_s)
        self.params = {k: v for k, v in {**self.spec["params"], **options}.items() if v}
        # the cache key: a chosen instance is part of it (different instances give different results)
        self.options = self.params if "url" in self.spec else {**self.params, "url": self.url}

    def _search_one(self, query, st):
        spec = self.spec
        send = {"q": query, **spec.get("fixed", {}), **self.params}
        if "count_key" in spec:
            send[spec["count_key"]] = self.top_k
        try:
            data, tries = http_json(spec["method"], self.url + spec.get("path", ""), name=self.name,
                                    secret=self._secret, auth_hint=spec["auth_hint"], **self.http,
                                    **{"json" if spec["method"] == "POST" else "params": send},
                                    headers={"X-API-KEY": self._secret} if self._secret else {})
        except WebError as e:
            st["api_calls"] += e.tries
            raise
        st["api_calls"] += tries
        key, url_key, snippet_key = spec["results"]
        items = data.get(key) if isinstance(data, dict) else None
        if not isinstance(items, list):
            found = f"keys: {list(data)[:8]}" if isinstance(data, dict) else "not a JSON object"
            raise WebError("malformed", f"{self.name}: no {key!r} list in the response ({found})")
        items = [r for r in items if isinstance(r, dict) and r.get(url_key)][:self.top_k]  # no URL, no result
        return [SearchResult(str(r.get("title", "")), str(r[url_key]), str(r.get(snippet_key, "")), i + 1)
                for i, r in enumerate(items)]


class LocalBackend(Backend):
    """BM25 over a JSONL corpus (data/localweb.py; None = the embedded Wikipedia summaries), one hit per article
    (its best passage). URLs are the canonical http://localweb/wiki/<id>; with `serve`, this process's LocalWeb
    serves them and `aliases` tells the fetcher its real address."""
    name = "local"

    def __init__(self, top_k=10, cache=None, *, corpus: str | None = None, index_dir: str | None = None,
                 serve: bool = True, n_threads: int = 4):
        from data import localweb  # only this back end needs the index (tantivy) and the page server
        super().__init__(top_k, cache, n_threads)
        self.index = localweb.open_index(corpus, **({"index_dir": index_dir} if index_dir else {}))
        self.web = localweb.LocalWeb(index=self.index) if serve else None
        self.aliases = {localweb.HOST: self.web.netloc} if self.web else {}
        self.base_url, self.page_url = f"http://{localweb.HOST}", localweb.page_url
        # the corpus hash keys the cache: another corpus gives other results under the same query
        self.options = {"corpus": self.index.hash}

    def close(self) -> None:
        super().close()
        if self.web is not None:
            self.web.close()

    def _search_one(self, query, st):
        st["api_calls"] += 1
        best: dict[str, dict] = {}  # a few passages per article can rank high: over-fetch, keep each one's best
        for p in self.index.query(query, self.top_k * 3):
            best.setdefault(p["id"], p)
        return [SearchResult(p["title"], self.page_url(i), _cut(p["body"], 300), n + 1)
                for n, (i, p) in enumerate(list(best.items())[:self.top_k])]


def make_backend(name: str, *, top_k: int = 10, corpus: str | None = None, cache: Cache | None = None, **opts):
    """serper | searxng | local -> a back end object (see the module docstring). opts go to the back end."""
    if name in PROVIDERS:
        return HTTPBackend(name, top_k, cache, **opts)
    if name == "local":
        return LocalBackend(top_k, cache, corpus=corpus, **opts)
    raise ValueError(f"unknown search back end {name!r}: use serper, searxng or local")


# -------------------------------------------------------------------------------------------------------------- cache

class CacheMiss(LookupError):
    """Replay mode and the cache has no entry. `.key` is the exact key (kind, key string)."""

    def __init__(self, kind: str, key: str):
        super().__init__(f"cache miss in replay mode: kind={kind!r} key={key}")
        self.kind, self.key = kind, key


def search_key(backend: str, query: str, top_k: int, options: dict) -> str:
    """The exact cache key of one search: JSON of (back end, query, top-k, sorted options), the query NFKC, lowercase,
    single-spaced (search engines ignore case and spacing)."""
    query = " ".join(unicodedata.normalize("NFKC", query).lower().split())
    return json.dumps([backend, query, top_k, sorted(options.items())], ensure_ascii=False)


class Cache:
    """Record/replay store for searches ("search"), pages ("page") and readings ("read") in one SQLite WAL file:
    get(kind, key) -> dict | None (always None in live and record modes; CacheMiss in replay) and put(kind, key,
    value) (a no-op in live and replay), with the time it was recorded (fetched_at). One connection per thread
    and per process (sqlite3 connections cross neither); WAL lets readers run while one process writes."""

    def __init__(self, path: str | os.PathLike | None, mode: str = "replay_or_live"):
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode {mode!r}: use one of {', '.join(CACHE_MODES)}")
        if path is None and mode != "live":
            raise ValueError(f"cache mode {mode!r} needs a cache file (--cache=FILE)")
        self.path, self.mode = (str(path) if path else None), mode
        self._local = threading.local()
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._con().execute("CREATE TABLE IF NOT EXISTS entries (kind TEXT NOT NULL, key TEXT NOT NULL, "
                                "value TEXT NOT NULL, fetched_at REAL NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():  # a connection must not cross a fork
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA busy_timeout=60000")  # before WAL: switching the journal mode takes a lock too
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process crashes, fast
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def get(self, kind: str, key: str) -> dict | None:
        row = None if self.mode in ("live", "record") else self._con().execute(
            "SELECT value FROM entries WHERE kind=? AND key=?", (kind, key)).fetchone()
        if row is None and self.mode == "replay":
            raise CacheMiss(kind, key)
        return json.loads(row[0]) if row else None

    def put(self, kind: str, key: str, value: dict) -> None:
        if self.mode in ("live", "replay"):
            return
        self._con().execute("INSERT OR REPLACE INTO entries (kind, key, value, fetched_at) VALUES (?, ?, ?, ?)",
                            (kind, key, json.dumps(value, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        return self._con().execute("SELECT COUNT(*) FROM entries").fetchone()[0] if self.path else 0

    def close(self) -> None:
        if con := getattr(self._local, "con", None):
            con.close()
            self._local.con = None


# -------------------------- fetching: fetch(url) (one page, never raises), then Fetcher (pool, per-host limit, cache)

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

    @property
    def transient(self) -> bool:
        """A failure of the web, not of the page: a timeout, the network, 429 or 5xx, a replay-cache miss."""
        return not self.ok and (self.kind in ("timeout", "network", "cache_miss") or (self.status or 0) in RETRY_STATUS
                                or (self.status or 0) >= 500)


def check_url(url: str, allow_private: bool = False, allow_hosts=()) -> tuple[str, str] | None:
    """None when `url` may be fetched, else (kind, reason). The URLs come from a model: http(s) only, and a host that
    resolves to a loopback, private, link-local, multicast or reserved address is refused unless allow_private or
    `host:port` (or `host`) is in allow_hosts. Run on every redirect hop."""
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
        ip = ipaddress.ip_address(a.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        if not ip.is_global or ip.is_multicast:  # private, loopback, link-local, reserved, unspecified, shared
            return "blocked", f"{host} resolves to a private or reserved address ({a})"
    return None


@functools.cache
def _deadline_pools() -> dict:
    """urllib3 pool classes whose responses read the socket under the deadline of the fetch() their thread runs. A
    socket timeout restarts at every byte, so a server that trickles its status line, headers or body would hold the
    thread for hours; here each read waits at most the time left, and one deadline covers them all."""
    class Response(http.client.HTTPResponse):
        def __init__(self, sock, *a, **kw):
            super().__init__(sock, *a, **kw)  # (reads nothing yet: the status line comes with begin())
            raw, deadline = self.fp.raw, getattr(_thread, "deadline", None)  # raw: the socket's SocketIO

            def readinto(buf, read=raw.readinto):  # the buffered reader's only way to the socket
                if (left := deadline - time.monotonic()) <= 0:
                    raise TimeoutError("the fetch deadline passed")
                sock.settimeout(left)
                return read(buf)
            if deadline is not None:
                raw.readinto = readinto

    def pool(cls):
        conn = type("Deadline" + cls.ConnectionCls.__name__, (cls.ConnectionCls,), {"response_class": Response})
        return type("Deadline" + cls.__name__, (cls,), {"ConnectionCls": conn})
    return {"http": pool(urllib3.HTTPConnectionPool), "https": pool(urllib3.HTTPSConnectionPool)}


_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_\-:.]+)""", re.I)
_LATIN = {"cp1250", "cp1252", "latin_1", "iso8859_2", "iso8859_15", "iso8859_9", "cp1254", "mac_roman", "cp1257"}


def decode_body(body: bytes, declared: str | None = None, is_html: bool = False) -> str:
    """Bytes -> str: the declared charset (header, then <meta>), then UTF-8, then charset_normalizer's guess (with
    replacement characters). A wrong declaration falls through to the next guess."""
    import charset_normalizer
    meta = _META_CHARSET.search(body[:4096]) if is_html else None
    for enc in filter(None, (declared, meta and meta.group(1).decode("ascii", "ignore"), "utf-8")):
        with contextlib.suppress(LookupError, UnicodeDecodeError):
            return body.decode(enc)
    best = charset_normalizer.from_bytes(body[:500_000]).best()
    enc = best.encoding if best is not None else "utf-8"
    if enc in _LATIN:  # a short Western text is ambiguous among the Latin code pages; cp1252 is the web's usual one
        with contextlib.suppress(UnicodeDecodeError):
            return body.decode("cp1252")
    return body.decode(enc, errors="replace")


def _squeeze(text: str) -> str:
    lines = (" ".join(ln.split()) for ln in text.splitlines())
    return "\n".join(ln for ln in lines if ln)


def html_to_text(page: str) -> tuple[str, str]:
    """(title, main text) of an HTML page: trafilatura's main content (boilerplate, navigation, scripts out; headings,
    paragraphs, lists and tables kept; its fallbacks, readability and jusText, when it finds little)."""
    m = re.search(r"<title[^>]*>(.*?)</title>", page[:20000], re.I | re.S)
    title = " ".join(html.unescape(m.group(1)).split()) if m else ""
    try:
        import trafilatura
        return title, _squeeze(trafilatura.extract(page, include_comments=False, include_tables=True) or "")
    except Exception:  # noqa: BLE001  trafilatura can choke on hostile markup: no text, an "empty" page
        return title, ""


# HTML/PDF -> text is CPU work under the GIL: threads running it at once only take turns, and with 32 of them the
# switching cost more than the work (bench/browse.py: 7.6 -> 4.0 ms of CPU per page, 15x -> 21-25x speedup, with
# 1-2 slots). Two slots, so that one pathological page cannot stall every other page's extraction.
EXTRACT_SLOTS = 2
_extracting = threading.BoundedSemaphore(EXTRACT_SLOTS)
# a forked child may inherit the semaphore held by a thread that did not come along
os.register_at_fork(after_in_child=lambda: globals().update(_extracting=threading.BoundedSemaphore(EXTRACT_SLOTS)))


def page_text(body: bytes, ctype_header: str) -> tuple[str, str, str | None]:
    """(title, text, error) from a response body and its Content-Type header: HTML through html_to_text, text as
    is, PDF through pypdf; anything else is an error ("unsupported content type ...")."""
    ctype, _, params = ctype_header.partition(";")
    ctype = ctype.strip().lower()
    m = re.search(r"charset=[\"']?([^;\"'\s]+)", params, re.I)
    head = body[:2048]
    if not ctype:  # no header: sniff
        low = head.lstrip().lower()
        ctype = ("application/pdf" if head.startswith(b"%PDF") else
                 "text/html" if low.startswith((b"<!doctype html", b"<html")) else "text/plain")
    if ctype == "application/pdf":
        from pypdf import PdfReader
        try:
            return "", _squeeze("\n".join(p.extract_text() or "" for p in PdfReader(io.BytesIO(body)).pages)), None
        except Exception as e:  # pypdf raises many types on broken files
            return "", "", f"unreadable PDF ({type(e).__name__})"
    if ctype not in HTML_TYPES and not ctype.startswith("text/") and ctype not in TEXT_TYPES:
        return "", "", f"unsupported content type {ctype}"
    if b"\x00" in head:
        return "", "", f"binary content served as {ctype}"
    text = decode_body(body, m and m.group(1), ctype in HTML_TYPES)
    return (*html_to_text(text), None) if ctype in HTML_TYPES else ("", _squeeze(text), None)


def _fail(url: str, kind: str, error: str, status: int | None = None, **kw) -> FetchResult:
    return FetchResult(False, status, url, error=error, kind=kind, **kw)


def fetch(url: str, *, timeout: float = 10.0, max_bytes: int = MAX_BYTES, allow_private: bool = False,
          allow_hosts=(), max_redirects: int = 5, max_tries: int = 3, backoff_s: float = 0.5) -> FetchResult:
    """Fetch one URL and return its readable text; never raises. Redirects are followed by hand, each hop checked.
    The whole call, retries included, ends within `timeout` seconds: connection errors, 429 and 5xx are retried
    with jittered exponential backoff, honouring Retry-After, at most `max_tries` tries and never past the deadline."""
    t0, late = time.monotonic(), f"timeout after {timeout:g} s"
    _thread.deadline = deadline = t0 + timeout

    def done(res: FetchResult) -> FetchResult:
        res.elapsed_s = time.monotonic() - t0
        return res

    try:
        for attempt in range(max_tries):
            hop, retry = url, 0.0  # retry: the seconds to wait before another try (0 = the backoff)
            for _ in range(max_redirects + 1):
                if bad := check_url(hop, allow_private, allow_hosts):
                    return done(_fail(hop, *bad))
                if (left := deadline - time.monotonic()) <= 0:
                    return done(_fail(hop, "timeout", late))
                try:
                    resp = http_session().get(hop, stream=True, allow_redirects=False, timeout=left)
                except (requests.RequestException, ValueError, UnicodeError) as e:
                    if _timed_out(e):
                        return done(_fail(hop, "timeout", late))
                    if not isinstance(e, requests.ConnectionError):
                        return done(_fail(hop, "bad_url", f"not a fetchable URL ({type(e).__name__})"))
                    res = _fail(hop, "network", "connection refused" if "refused" in str(e).lower() else
                                "connection failed")
                    break
                with resp:
                    code, ctype = resp.status_code, resp.headers.get("content-type", "")
                    if resp.is_redirect:
                        hop = requests.compat.urljoin(hop, resp.headers["location"])
                        continue
                    if code >= 400:  # 429 and 5xx are worth another try, after Retry-After when the server says
                        res = _fail(hop, "http", f"HTTP {code} {resp.reason or ''}".strip(), code)
                        if code not in RETRY_STATUS and code < 500:
                            return done(res)
                        # a number of seconds or an HTTP date
                        with contextlib.suppress(urllib3.exceptions.HTTPError, TypeError, ValueError, OverflowError):
                            retry = Retry().parse_retry_after(resp.headers.get("retry-after") or "0") or 0.0
                        break
                    buf = bytearray()
                    try:  # as bytes arrive; the deadline is in the socket reads (_deadline_pools)
                        while len(buf) < max_bytes and (chunk := resp.raw.read1(65536, decode_content=True)):
                            buf += chunk
                    except (TimeoutError, urllib3.exceptions.ReadTimeoutError):
                        return done(_fail(hop, "timeout", late, code))
                    except (urllib3.exceptions.HTTPError, OSError):
                        res = _fail(hop, "network", "connection lost while reading the page", code)
                        break
                body, truncated = bytes(buf[:max_bytes]), len(buf) >= max_bytes
                if not body.strip():
                    return done(_fail(hop, "empty", "empty page", code, content_type=ctype))
                with _extracting:
                    title, text, why = page_text(body, ctype)
                if why or not text:
                    return done(_fail(hop, "unsupported" if why else "empty", why or "no readable text on the page",
                                      code, content_type=ctype, n_bytes=len(body)))
                return done(FetchResult(True, code, hop, text, None, 0.0, ctype, len(body), title, "", truncated))
            else:
                return done(_fail(hop, "redirects", f"more than {max_redirects} redirects"))
            wait = retry or backoff_s * 2 ** attempt * random.uniform(0.5, 1.5)
            if attempt == max_tries - 1 or time.monotonic() + wait >= deadline:
                if retry and attempt < max_tries - 1:  # Retry-After asks for more time than is left
                    res.error += f" (retry after {retry:g} s exceeds the {timeout:g} s timeout)"
                return done(res)
            time.sleep(wait)
    except Exception as e:  # a bug or a library surprise must not take a rollout down: report it as a result
        return done(_fail(url, "network", f"fetch failed ({type(e).__name__}: {str(e)[:100]})"))
    finally:
        _thread.deadline = None


class Fetcher:
    """fetch() behind a thread pool, a per-host limit, the Cache (kind "page") and `stats` (a Counter: pages, ok,
    cache_hits, bytes, latency_s, "failed:<kind>"); thread-safe, one per Browser. `aliases` maps a canonical host
    (the embedded web's "localweb") to the host:port serving it in this process: URLs, cache keys and results keep
    the canonical form, so they do not depend on the port."""

    def __init__(self, *, cache: Cache | None = None, aliases: dict | None = None, n_threads: int = 32,
                 per_host: int = 8, **fetch_kw):
        self.cache, self.aliases, self.per_host, self.fetch_kw = cache, dict(aliases or {}), per_host, fetch_kw
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="fetch")

    def fetch(self, url: str) -> FetchResult:
        t0 = time.monotonic()
        key = str(url).split("#", 1)[0].strip()  # the cache key: the URL without its #fragment
        try:
            hit = self.cache.get("page", key) if self.cache is not None else None
            res = FetchResult(**{**hit, "cached": True}) if hit else self._fetch_live(key)
        except CacheMiss:
            res = _fail(key, "cache_miss", "page not in the replay cache (record it first, or use "
                                           "cache_mode=replay_or_live)")
        res.elapsed_s = time.monotonic() - t0
        st = Counter(pages=1, ok=int(res.ok), cache_hits=int(res.cached), bytes=res.n_bytes, latency_s=res.elapsed_s)
        if not res.ok:
            st[f"failed:{res.kind}"] = 1
        with self._lock:
            self.stats.update(st)
        return res

    def _fetch_live(self, key: str) -> FetchResult:
        """fetch() at the address serving `key` (aliases), at most per_host at once per host; recorded in the cache."""
        try:
            parts = urlsplit(key)
            parts = parts._replace(netloc=self.aliases.get(parts.netloc, parts.netloc))
            live, host = parts.geturl(), parts.netloc.lower()
        except ValueError:
            live, host = key, ""
        with self._lock:
            slot = self._hosts.setdefault(host, threading.BoundedSemaphore(self.per_host))
        with slot:
            res = fetch(live, **self.fetch_kw)
        if res.url == live:
            res.url = key  # the canonical URL, never this run's port
        # keep what another run would see again: pages and permanent failures, not timeouts or outages
        if self.cache is not None and (res.ok or res.kind in ("http", "unsupported", "empty") and not res.transient):
            self.cache.put("page", key, asdict(res))
        return res

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        return list(self._pool.map(self.fetch, urls))  # (input order)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# --------------------------------------------------------- reading: chunk by chunk, only new and relevant information

@dataclass
class PageState:
    """One trajectory's reading of one page: where reading stopped, what was already returned, and the reader's
    short memory per search (the queries that led here)."""
    url: str
    title: str                                    # (for a custom reader: the seam in Browser.__init__)
    chunks: list[str]
    pos: int = 0                                  # the chunk reading resumes at
    returned: set = field(default_factory=set)    # passages already shown (extract reader)
    memory: dict = field(default_factory=dict)    # queries -> summary so far (llm reader)


def chunk_text(text: str, max_chars: int, pack: bool = True) -> list[str]:
    """Pieces of at most max_chars, split at paragraphs; a longer paragraph is cut at a sentence end when one falls
    past a third of the limit, else hard. pack: consecutive paragraphs share a piece while they fit (a reader's
    chunks); without: one piece per paragraph (the extract reader's passages)."""
    out: list[str] = []
    for para in text.split("\n"):
        para = para.strip()
        while len(para) > max_chars:
            cut = para.rfind(". ", 0, max_chars)
            cut = cut + 1 if cut > max_chars // 3 else max_chars
            out.append(para[:cut].strip())
            para = para[cut:].strip()
        if para and pack and out and len(out[-1]) + 1 + len(para) <= max_chars:
            out[-1] += "\n" + para
        elif para:
            out.append(para)
    return out


_STOP = frozenset("a an and are as at be by for from has have he her his how in is it its of on or she that the "
                  "their there this to was were what when where which who whom whose why with".split())


def _terms(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in _STOP]


def bm25_scores(query_terms: list[str], docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each doc (a list of terms) against the distinct query terms, IDF over these docs."""
    q, n = set(query_terms), len(docs)
    avg = sum(map(len, docs)) / max(n, 1) or 1.0
    df = Counter(t for d in docs for t in q.intersection(d))
    idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in df}
    return [sum(idf[t] * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * len(d) / avg)) for t in q if t in tf)
            for d, tf in zip(docs, map(Counter, docs))]


class ExtractReader:
    """No model: the chunk's best new passages by BM25 against the question and the queries, in page order, up to
    `page_chars`; a chunk with nothing new and relevant is skipped. On a first visit where nothing matches, the
    page's opening passage (it usually says what the page is about)."""

    def __init__(self, cfg: "BrowseConfig", cache: Cache | None = None):
        self.cfg = cfg

    def read(self, page: PageState, question: str, queries: list[str]) -> str:
        q = _terms(" ".join([question, *queries]))
        first_visit = not page.returned
        for _ in range(min(self.cfg.max_chunks, len(page.chunks) - page.pos)):  # from page.pos on
            ps = chunk_text(page.chunks[page.pos], 600, pack=False)  # passages
            fresh = [i for i, p in enumerate(ps) if p not in page.returned]
            scores = bm25_scores(q, [_terms(ps[i]) for i in fresh])
            ranked = [i for s, i in sorted(zip(scores, fresh), key=lambda x: -x[0]) if s > 0]
            if first_visit and not ranked and fresh and page.pos == 0:
                ranked = fresh[:1]
            keep, budget = [], self.cfg.page_chars
            for i in ranked:
                if len(ps[i]) <= budget or not keep:
                    keep.append(i)
                    budget -= len(ps[i])
                if budget <= 0:
                    break
            if keep:
                page.returned.update(ps[i] for i in keep)
                return "\n".join(ps[i][:self.cfg.page_chars] for i in sorted(keep))
            page.pos += 1  # nothing new and relevant here: read on
        return ""


READER_PROMPT = """You read one part of a web page for a research assistant and extract what helps answer its question.

Question: {question}
Search queries that led to this page: {queries}
What you noted on this page so far: {memory}

Page part {part} of {parts} ({url}):
<page>
{chunk}
</page>

Reply with JSON only, no other text:
{{"extracted_info": "facts from this part that help answer the question, quoted or closely paraphrased, with numbers and names exact; empty string if none",
 "read_more": true or false (whether the next part of the page is likely to help),
 "summary": "a one or two sentence note of what this page has said so far that matters for the question"}}"""


def chat_completion(base_url: str, model: str, messages: list[dict], *, api_key: str | None = None,
                    timeout: float = 60.0, max_tries: int = 3, backoff_s: float = 0.5, max_tokens: int = 1024,
                    who: str = "reader endpoint") -> str:
    """The reply's text from one temperature-0 call to an OpenAI-compatible /chat/completions endpoint (the reading
    model's and eval.py's judge's), through `http_json`; raises WebError with a reason that never holds the key."""
    data, _ = http_json("POST", base_url.rstrip("/") + "/chat/completions", name=f"{who} {base_url}",
                        timeout=timeout, max_tries=max_tries, backoff_s=backoff_s, secret=api_key or "",
                        auth_hint="check the API key variable",
                        json={"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens},
                        headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise WebError("malformed", f"{who} {base_url} sent a reply that is not a chat completion") from None


class LLMReader:
    """A reading model behind any OpenAI-compatible endpoint (a local vLLM/SGLang server or a hosted model). Replies
    are cached (Cache kind "read", keyed by model and prompt), so a replayed run reads the same way."""

    def __init__(self, cfg: "BrowseConfig", cache: Cache | None = None):
        if not cfg.llm_base_url or not cfg.llm_model:
            raise ValueError("reader=llm needs llm_base_url and llm_model (an OpenAI-compatible endpoint, e.g. "
                             "--llm_base_url=http://localhost:8000/v1 --llm_model=Qwen/Qwen2.5-7B-Instruct); "
                             "or use reader=extract, which needs no model")
        self.cfg, self.cache = cfg, cache
        self.api_key = os.environ.get(cfg.llm_api_key_env) if cfg.llm_api_key_env else None
        self.calls = self.failures = 0

    def _ask(self, prompt: str) -> dict:
        """{"extracted_info": str, "read_more": bool, "summary": str} for one prompt, from the cache or the model."""
        key = hashlib.sha256(json.dumps([self.cfg.llm_model, prompt]).encode()).hexdigest()
        try:
            hit = self.cache.get("read", key) if self.cache is not None else None
        except CacheMiss:
            raise WebError("cache_miss", "reading not in the replay cache") from None
        if hit is not None:
            return hit
        self.calls += 1
        text = chat_completion(self.cfg.llm_base_url, self.cfg.llm_model, [{"role": "user", "content": prompt}],
                               api_key=self.api_key, timeout=self.cfg.llm_timeout)
        d = None
        with contextlib.suppress(AttributeError, ValueError):  # the JSON object, wherever the model put it (fences)
            d = json.loads(re.search(r"\{.*\}", text, re.S).group(0))
        if not isinstance(d, dict) or "extracted_info" not in d:
            raise WebError("malformed", "the reading model's reply was not the JSON asked for")
        reply = {"extracted_info": str(d.get("extracted_info") or "").strip(),  # read_more: true, "yes", "true"
                 "read_more": str(d.get("read_more", False)).strip().lower() in ("yes", "true", "1"),
                 "summary": str(d.get("summary") or "").strip()}
        if self.cache is not None:
            self.cache.put("read", key, reply)
        return reply

    def read(self, page: PageState, question: str, queries: list[str]) -> str:
        mem_key = " | ".join(queries)
        memory = page.memory.get(mem_key, "")
        infos = []
        # at most max_chunks from where the last call stopped: the reference could loop on a page forever
        for _ in range(min(self.cfg.max_chunks, len(page.chunks) - page.pos)):
            prompt = READER_PROMPT.format(question=question, queries="; ".join(queries) or "(none)",
                                          memory=memory or "(nothing yet)", part=page.pos + 1,
                                          parts=len(page.chunks), url=page.url, chunk=page.chunks[page.pos])
            try:
                reply = self._ask(prompt)
            except WebError:
                self.failures += 1
                if infos:  # keep what was read; the next browse resumes at this chunk
                    break
                raise
            page.pos += 1
            if reply["extracted_info"] and reply["extracted_info"] not in infos:
                infos.append(reply["extracted_info"])
            memory = reply["summary"] or memory
            if not reply["read_more"]:
                break
        page.memory[mem_key] = memory
        return "\n".join(infos)[:self.cfg.page_chars]


# -------------------------------------------------- CLI: a Browser from --key=value flags, its search, JSON on stdout

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(BrowseConfig, [a for a in argv if a.startswith("-")])  # (--help lists the keys)
    queries = [a for a in argv[1:] if not a.startswith("-")]
    if argv[:1] != ["search"] or not queries:
        print("usage: python browse.py search QUERY... [--key=value ...]", file=sys.stderr)
        return 2
    try:
        with contextlib.closing(Browser(cfg)) as browser:
            res = dict(zip(queries, browser.backend.search(queries)))
    except (CacheMiss, WebError, ValueError) as e:  # a set-up problem: say what to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = {q: str(r) for q, r in res.items() if isinstance(r, WebError)}
    print(json.dumps({"results": {q: [asdict(x) for x in r] for q, r in res.items() if q not in errors},
                      "errors": errors, "stats": browser.backend.stats}, indent=2, ensure_ascii=False))
    return int(bool(errors))


if __name__ == "__main__":
    sys.exit(main())
