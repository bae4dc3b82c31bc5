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
  `extract` (no model: BM25 over the chunk's passages) or `llm` (an OpenAI-compatible endpoint, the reference's,
  which remembers the facts already found under the current search). Every fact a reader returns reaches the policy:
  what does not fit a page's share of the observation waits for the next browse of that page.
No dense retrieval, JavaScript, cookies or torch; nothing of a page but its readable text reaches the policy.

How to run (flags: BrowseConfig's fields)
    python browse.py search "highest mountain on Earth" --backend=local --top_k=5
    SERPER_API_KEY=... python browse.py search "who wrote hamlet" --backend=serper --cache=runs/web.sqlite
    python browse.py search "who wrote hamlet" --backend=serper --cache=runs/web.sqlite --cache_mode=replay
                                   # (the second command replays what the first recorded, without the key)
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
    """The web's settings. Defaults: the embedded offline run (train.py's default, whose configs inherit these
    fields); the paper's values are train.py's DEEPRESEARCHER_AGENT."""
    backend: str = "local"              # local | serper | searxng
    top_k: int = 3                      # results per query (the reference: 10)
    corpus: str = ""                    # local back end's JSONL corpus ("" = the embedded Wikipedia summaries)
    searxng_url: str = ""               # searxng: the instance ("" = $SEARXNG_URL)
    cache: str = ""                     # SQLite record/replay file for searches, pages and readings ("" = none)
    cache_mode: str = "replay_or_live"
    reader: str = "extract"             # extract | llm
    max_queries: int = 3                # queries per web_search call (the reference: 3)
    max_urls: int = 0                   # URLs per browse_webpage call (0 = no cap, the reference: every URL of the
    #                                     most recent search may be read at once; the pages are read in parallel)
    chunk_chars: int = 40_000           # page chunk a reader takes at once (the reference: ~40k characters)
    max_chunks: int = 0                 # chunks read per page per call (0 = no cap, the reference: read on while
    #                                     the reader asks, to the page's end; a cap bounds one call's reading time)
    page_chars: int = 1500              # the extract reader's selection per page per call (the llm reader has none)
    snippet_chars: int = 200            # characters of each result's snippet the policy sees (the reference: 300)
    obs_chars: int = 1000               # the whole observation; a page's text past its share waits for the next call
    llm_base_url: str = ""              # reader=llm: OpenAI-compatible endpoint
    llm_model: str = ""
    llm_api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never logged; "" for local servers
    llm_timeout: float = 60.0
    n_threads: int = 32                 # fetch pool (and the pool that reads a call's pages in parallel)
    per_host: int = 8                   # concurrent requests to one host
    timeout: float = 10.0               # per page, retries included
    max_bytes: int = MAX_BYTES
    allow_private: bool = False         # fetch private/loopback addresses (the embedded web is always allowed)
    allow_hosts: str = ""               # comma-separated host or host:port admitted past the private-address guard


# ------------------------------------- the two tools the policy calls: Session (one per trajectory), Browser (shared)

class Observation(str):
    """A tool's text and `failed` (see the module docstring). No results, a 404, a URL not from the last search, a
    reading model's reply that could not be parsed, or a call where only some queries or pages failed are answers,
    not failures."""
    failed: bool = False

    def __new__(cls, text: str, failed: bool = False):
        obs = super().__new__(cls, text)
        obs.failed = failed
        return obs


def clean_args(items, limit: int) -> tuple[list[str], int]:
    """The policy's arguments as distinct non-empty single-spaced strings, at most `limit` (0 = no limit), and how
    many were dropped. A single string is one argument; anything but a list or tuple of them is none."""
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, (list, tuple)):
        items = []
    distinct: list[str] = []
    for item in items:
        text = " ".join(str(item).split())
        if text and text not in distinct:
            distinct.append(text)
    if limit <= 0 or len(distinct) <= limit:
        return distinct, 0
    return distinct[:limit], len(distinct) - limit


MORE_ON_PAGE = "({n} more characters from this page: browse it again to read them)"


@dataclass
class PageBlock:
    """One page's part of a browse_webpage observation, and whether the web (not the page or the policy) lost it."""
    text: str
    web_failed: bool = False
    new_info: str = ""  # what the reader returned this time (the reading model's memory for later pages)


class Session:
    """One trajectory's tools (see the module docstring). Re-browsing a page first shows what did not fit its share
    of the last observation, then resumes reading where the reader stopped."""

    def __init__(self, browser: "Browser", question: str):
        self.browser = browser
        self.question = question
        self.queries: list[str] = []
        self.urls: dict[str, SearchResult] = {}  # url -> result, from the most recent search
        self.pages: dict[str, PageState] = {}
        # what the readers returned since the most recent search: the reading model's memory (the reference's
        # "context so far" of a sub-question), so that it returns only facts not found on another page already
        self.found = ""

    def web_search(self, queries) -> Observation:
        cfg = self.browser.cfg
        queries, dropped = clean_args(queries, cfg.max_queries)
        if not queries:
            return Observation("web_search needs at least one non-empty query.")
        try:
            results = self.browser.backend.search(queries)
        except CacheMiss as e:  # a set-up problem of the run, but the policy still gets an observation
            results = [WebError("cache_miss", f"not in the replay cache ({e.kind})")] * len(queries)
        self.queries = queries
        self.found = ""
        self.urls = {}
        for query_results in results:
            if not isinstance(query_results, Exception):
                for result in query_results:
                    self.urls[result.url] = result
        note = f"(only the first {cfg.max_queries} queries were run)" if dropped else None
        text = render_search(queries, results, cfg.snippet_chars, cfg.obs_chars, note)
        # every query's back-end call failed (timeout, 5xx, quota, network, auth, replay miss): nothing the policy did
        every_query_failed = all(isinstance(query_results, Exception) for query_results in results)
        return Observation(text, failed=every_query_failed)

    def browse_webpage(self, urls) -> Observation:
        cfg = self.browser.cfg
        urls, dropped = clean_args(urls, cfg.max_urls)
        if not urls:
            return Observation("browse_webpage needs at least one URL from your most recent web_search.")
        if not self.urls:
            return Observation("Search first: browse_webpage reads URLs from your most recent web_search results.")
        readable = [url for url in urls if url in self.urls]
        fetched = dict(zip(readable, self.browser.fetcher.fetch_many(readable)))
        for url in readable:
            result = fetched[url]
            if result.ok and url not in self.pages:
                self.pages[url] = PageState(url, result.title, chunk_text(result.text, cfg.chunk_chars))
        share = cfg.obs_chars // len(urls)  # each page gets an equal share of the observation
        # the pages are read in parallel, each with the facts found before this call (not each other's), so the
        # readings (and their cache keys) do not depend on which page finishes first
        found_before = self.found
        readings = [self.browser.read_pool.submit(self._page_block, url, fetched.get(url), share, found_before)
                    for url in urls]
        blocks = [reading.result() for reading in readings]
        for block in blocks:  # in URL order, whatever order the readings finished in
            if block.new_info:
                self.found = f"{self.found}\n{block.new_info}".strip()
        parts = [block.text for block in blocks]
        if dropped:
            parts.append(f"(only the first {cfg.max_urls} URLs were read)")
        # every readable page was lost to the web (an outage, not the page's own refusal): nothing the policy did
        n_lost = sum(block.web_failed for block in blocks)
        return Observation("\n\n".join(parts), failed=bool(readable) and n_lost == len(readable))

    def _page_block(self, url: str, result: FetchResult | None, share: int, found_before: str) -> PageBlock:
        """One URL's block of the observation, within `share` characters."""
        if result is None:
            return PageBlock(_cut(f"Page {url}: not in your most recent search results; browse one of their URLs.",
                                  share))
        if not result.ok:
            return PageBlock(_cut(f"Page {url}: could not be fetched: {result.error}.", share), result.transient)
        page = self.pages[url]
        if page.pending:  # the rest of what the last browse could not show comes first
            return PageBlock(fit_page_text(page, page.pending, share))
        page.memory = found_before
        try:
            info = self.browser.reader.read(page, self.question, self.queries)
        except WebError as e:  # the reading model's endpoint, not the policy, failed
            return PageBlock(_cut(f"Page {url}: fetched, but the reading model failed: {e}.", share), True)
        if not info:
            return PageBlock(_cut(f"Page {url}: nothing new on this page about the question.", share))
        return PageBlock(fit_page_text(page, info, share), new_info=info)


def fit_page_text(page: PageState, info: str, share: int) -> str:
    """`Page <url>:` and the reader's information within `share` characters, ending at a line (else a word) when it
    must be cut; what does not fit waits in page.pending for the next browse of the page, which the block says."""
    header = f"Page {page.url}:\n"
    if len(header) + len(info) <= share:
        page.pending = ""
        return header + info
    room = share - len(header) - len(MORE_ON_PAGE.format(n=len(info))) - 1
    room = max(room, 1)  # a tiny share still shows something, so that browsing again always moves on
    cut = info.rfind("\n", 0, room + 1)
    if cut <= 0:
        cut = info.rfind(" ", 0, room + 1)
    if cut <= 0:
        cut = room
    page.pending = info[cut:].strip()
    return header + info[:cut].rstrip() + "\n" + MORE_ON_PAGE.format(n=len(page.pending))


def render_search(queries: list[str], results: list, snippet_chars: int, obs_chars: int, note: str | None = None):
    """The web_search observation: per query its numbered results (title, URL, snippet) or its error."""
    blocks = []
    for query, query_results in zip(queries, results):
        if isinstance(query_results, Exception):
            blocks.append(f'Search "{query}" failed: {query_results}.')
            continue
        if not query_results:
            blocks.append(f'Search "{query}": no results.')
            continue
        lines = [f'Search "{query}":']
        for result in query_results:
            lines.append(f"{result.rank}. {result.title}\n{result.url}\n{_cut(result.snippet, snippet_chars)}")
        blocks.append("\n".join(lines))
    return _render(blocks, obs_chars, note)


# "2. Apple Inc.\nhttp://..." : a result's rank and title as render_search writes them, followed by its URL
RESULT_TITLE = re.compile(r"^\d+\. (.+)\n(?:https?://)", re.MULTILINE)


def shown_titles(observation: str | None) -> list[str]:
    """The titles of the search results render_search put in an observation, in order (none in other text)."""
    return RESULT_TITLE.findall(observation or "")


def _cut(text: str, n_chars: int) -> str:
    """`text` within n_chars, ending with " ..." when it was cut."""
    if len(text) <= n_chars:
        return text
    return text[:max(n_chars - 4, 0)].rstrip() + " ..."


def _render(blocks: list[str], budget: int, note: str | None) -> str:
    """One observation: the blocks (one per query), each cut to an equal share of the budget, and a note."""
    share = budget // max(len(blocks), 1)
    parts = [_cut(block, share) for block in blocks]
    if note:
        parts.append(note)
    return "\n\n".join(parts)


class Browser:
    """The web of a run, shared by every trajectory of a process (thread-safe): a search back end, a page fetcher
    with its pool, a reader with its pool, and one record/replay Cache under all three. `session(question)` per
    trajectory."""

    def __init__(self, cfg: BrowseConfig | None = None, *, reader=None, backend=None):
        cfg = cfg or BrowseConfig()
        self.cfg = cfg
        readers = {"extract": ExtractReader, "llm": LLMReader}
        if reader is None and cfg.reader not in readers:
            raise ValueError(f"unknown reader {cfg.reader!r}: use extract or llm (or pass a reader object)")
        self.cache = Cache(cfg.cache, cfg.cache_mode) if cfg.cache else None
        # the reader: extract | llm, or any object with `read(page: PageState, question, queries) -> str` (the seam
        # for a `policy` reader: the trained model reading through our engine); it may be called from several threads
        # at once, each time for a different page
        if reader is None:
            reader = readers[cfg.reader](cfg, self.cache)
        self.reader = reader
        self.read_pool = ThreadPoolExecutor(max_workers=cfg.n_threads, thread_name_prefix="read")
        if backend is None:
            options = {}
            if cfg.backend == "searxng" and cfg.searxng_url:
                options["url"] = cfg.searxng_url
            backend = make_backend(cfg.backend, top_k=cfg.top_k, corpus=cfg.corpus or None, cache=self.cache,
                                   **options)
        self.backend = backend
        # the embedded web: its canonical host maps to this process's server, the one private host allowed
        aliases = dict(getattr(self.backend, "aliases", {}))
        allow_hosts = [host for host in cfg.allow_hosts.split(",") if host] + list(aliases.values())
        self.fetcher = Fetcher(cache=self.cache, aliases=aliases, n_threads=cfg.n_threads, per_host=cfg.per_host,
                               timeout=cfg.timeout, max_bytes=cfg.max_bytes, allow_private=cfg.allow_private,
                               allow_hosts=tuple(allow_hosts))

    def session(self, question: str) -> Session:
        return Session(self, question)

    def close(self) -> None:
        self.fetcher.close()
        self.read_pool.shutdown(wait=False)
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
        self.kind = kind
        self.tries = tries

    def __str__(self) -> str:
        return f"{self.kind}: {super().__str__()}"


class Backend:
    """What every back end shares: the cache, a small pool and `stats` (a Counter: queries, api_calls, cache_hits,
    cost_usd, latency_s and "failed:<kind>") around each one's `_search_one(query, stats)`, which returns one query's
    results, raises WebError and counts its requests in stats["api_calls"]."""
    name = "?"
    usd_per_query = 0.0

    def __init__(self, top_k: int = 10, cache: Cache | None = None, n_threads: int = 4):
        self.top_k = int(top_k)
        self.cache = cache
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix=f"search-{self.name}")
        self.options: dict = {}  # whatever changes the results; part of the cache key

    def _one(self, query: str) -> list[SearchResult] | WebError:
        """One query's results or its WebError, from the cache or the back end; counted in `stats`."""
        query_stats = Counter(queries=1)
        started = time.perf_counter()
        key = search_key(self.name, query, self.top_k, self.options)
        try:
            hit = None
            if self.cache is not None:
                hit = self.cache.get("search", key)  # (CacheMiss propagates: see search())
            if hit is not None:
                query_stats["cache_hits"] = 1
                outcome = [SearchResult(**result) for result in hit["results"]]
            else:
                outcome = self._search_one(query, query_stats)
                query_stats["cost_usd"] = self.usd_per_query
                if self.cache is not None:
                    recorded = {"query": query, "results": [asdict(result) for result in outcome]}
                    self.cache.put("search", key, recorded)
        except WebError as e:
            query_stats[f"failed:{e.kind}"] = 1
            outcome = e
        query_stats["latency_s"] = time.perf_counter() - started
        with self._lock:
            self.stats.update(query_stats)
        return outcome

    def search(self, queries: list[str]) -> list[list[SearchResult] | WebError]:
        """Results or a WebError per query, run concurrently. CacheMiss (replay) is raised: it is a set-up
        problem (wrong cache file or mode), not a web failure the policy should see."""
        if isinstance(queries, str):
            queries = [queries]
        return list(self._pool.map(self._one, queries))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


_thread = threading.local()  # per thread: its requests.Sessions (not thread-safe), and the deadline of its fetch()


def http_session(max_tries: int = 1, backoff_s: float = 0.5) -> requests.Session:
    """This thread's requests.Session for one retry policy: urllib3's Retry retries any method (ours are idempotent)
    after backoff_s * 2**n plus jitter, or Retry-After, up to MAX_BACKOFF_S, and returns the last 429/5xx response
    instead of raising. fetch() uses max_tries=1 and retries itself, within its deadline."""
    sessions = _thread.__dict__.setdefault("sessions", {})
    policy = (max_tries, backoff_s)
    if policy in sessions:
        return sessions[policy]
    retry = Retry(total=max_tries - 1, status_forcelist=RETRY_STATUS, allowed_methods=None,
                  backoff_factor=backoff_s, backoff_jitter=backoff_s, backoff_max=MAX_BACKOFF_S,
                  retry_after_max=MAX_BACKOFF_S, raise_on_status=False)
    session = requests.Session()
    session.headers["User-Agent"] = "Mozilla/5.0 (compatible; deepresearch-agent/0.1)"
    for scheme in ("http://", "https://"):
        adapter = HTTPAdapter(max_retries=retry)
        adapter.poolmanager.pool_classes_by_scheme = _deadline_pools()  # (a proxy gets urllib3's plain pools)
        session.mount(scheme, adapter)
    sessions[policy] = session
    return session


def _timed_out(error: Exception) -> bool:
    """Whether a requests exception is a timeout. Retries used up on read timeouts come as a ConnectionError around
    a ReadTimeoutError; a refused connection is, oddly, a NewConnectionError, a subclass of ConnectTimeoutError."""
    wrapped = error.args[0] if error.args else None  # (requests wraps urllib3's error, whose reason says more)
    reason = getattr(wrapped, "reason", None)
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
        return True
    refused = isinstance(reason, urllib3.exceptions.NewConnectionError)
    return isinstance(error, requests.Timeout) and not refused


def _scrubbed(kind: str, message: str, tries: int, secret: str) -> WebError:
    """A WebError whose message has `secret` replaced by *** (servers echo keys back in their error bodies)."""
    if secret:
        message = message.replace(secret, "***")
    return WebError(kind, message, tries)


def http_json(method: str, url: str, *, name: str, timeout: float, max_tries: int = 3, backoff_s: float = 0.5,
              secret: str = "", auth_hint: str = "check the key", **request_kw):
    """One JSON request through `http_session`: (parsed body, tries), or raises WebError(kind, message, tries). Every
    message is cut short and has `secret` scrubbed out."""
    try:
        response = http_session(max_tries, backoff_s).request(method, url, timeout=timeout, **request_kw)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        if _timed_out(e):
            raise _scrubbed("timeout", f"{name}: no answer within {timeout:g} s, {max_tries} tries", max_tries,
                            secret) from None
        raise _scrubbed("network", f"{name} unreachable ({type(e).__name__}) after {max_tries} tries", max_tries,
                        secret) from None
    tries = 1 + len(getattr(response.raw.retries, "history", ()) or ())
    status = response.status_code
    if status in (401, 403):  # retrying a bad key only burns quota and time: say what to check
        raise _scrubbed("auth", f"{name} refused access (HTTP {status}): {auth_hint}", tries, secret)
    if status in RETRY_STATUS or status >= 500:
        kind = "rate_limit" if status == 429 else "server"
        raise _scrubbed(kind, f"{name} answered HTTP {status} after {tries} tries", tries, secret)
    if status != 200:
        raise _scrubbed("http", f"{name} answered HTTP {status}: {response.text[:200]}", tries, secret)
    try:
        return response.json(), tries
    except ValueError:  # a proxy's HTML error page or a truncated body: say what we got
        raise _scrubbed("malformed", f"{name}: the response is not JSON: {response.text[:200]!r}", tries,
                        secret) from None


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
        self.name = name
        self.spec = PROVIDERS[name]
        super().__init__(top_k, cache, n_threads)
        self.usd_per_query = self.spec.get("usd_per_query", 0.0)
        url = url or self.spec.get("url") or os.environ.get(self.spec["url_env"], "")
        self.url = url.rstrip("/")
        self._secret = api_key or os.environ.get(self.spec.get("key_env", "-"), "")
        replay = cache is not None and cache.mode == "replay"  # replay needs no key: no request is made
        missing_key = "key_env" in self.spec and not self._secret and not replay
        if not self.url or missing_key:
            raise WebError("config", f"the {name} back end needs {self.spec['needs']}")
        self.http = dict(timeout=timeout, max_tries=max_tries, backoff_s=backoff_s)
        self.params = {key: value for key, value in {**self.spec["params"], **options}.items() if value}
        # the cache key: a chosen instance is part of it (different instances give different results)
        if "url" in self.spec:
            self.options = self.params
        else:
            self.options = {**self.params, "url": self.url}

    def _search_one(self, query, stats):
        spec = self.spec
        send = {"q": query, **spec.get("fixed", {}), **self.params}
        if "count_key" in spec:
            send[spec["count_key"]] = self.top_k
        request_kw = dict(self.http)
        if spec["method"] == "POST":
            request_kw["json"] = send
        else:
            request_kw["params"] = send
        if self._secret:
            request_kw["headers"] = {"X-API-KEY": self._secret}
        else:
            request_kw["headers"] = {}
        try:
            data, tries = http_json(spec["method"], self.url + spec.get("path", ""), name=self.name,
                                    secret=self._secret, auth_hint=spec["auth_hint"], **request_kw)
        except WebError as e:
            stats["api_calls"] += e.tries
            raise
        stats["api_calls"] += tries
        list_key, url_key, snippet_key = spec["results"]
        items = data.get(list_key) if isinstance(data, dict) else None
        if not isinstance(items, list):
            found = f"keys: {list(data)[:8]}" if isinstance(data, dict) else "not a JSON object"
            raise WebError("malformed", f"{self.name}: no {list_key!r} list in the response ({found})")
        items = [item for item in items if isinstance(item, dict) and item.get(url_key)]  # no URL, no result
        results = []
        for rank, item in enumerate(items[:self.top_k], start=1):
            title = str(item.get("title", ""))
            snippet = str(item.get(snippet_key, ""))
            results.append(SearchResult(title, str(item[url_key]), snippet, rank))
        return results


class LocalBackend(Backend):
    """BM25 over a JSONL corpus (data/localweb.py; None = the embedded Wikipedia summaries), one hit per article
    (its best passage). URLs are the canonical http://localweb/wiki/<id>; with `serve`, this process's LocalWeb
    serves them and `aliases` tells the fetcher its real address."""
    name = "local"

    def __init__(self, top_k=10, cache=None, *, corpus: str | None = None, index_dir: str | None = None,
                 serve: bool = True, n_threads: int = 4):
        from data import localweb  # only this back end needs the index (tantivy) and the page server
        super().__init__(top_k, cache, n_threads)
        index_kw = {"index_dir": index_dir} if index_dir else {}
        self.index = localweb.open_index(corpus, **index_kw)
        self.web = localweb.LocalWeb(index=self.index) if serve else None
        self.aliases = {localweb.HOST: self.web.netloc} if self.web else {}
        self.base_url = f"http://{localweb.HOST}"
        self.page_url = localweb.page_url
        # the corpus hash keys the cache: another corpus gives other results under the same query
        self.options = {"corpus": self.index.hash}

    def close(self) -> None:
        super().close()
        if self.web is not None:
            self.web.close()

    def _search_one(self, query, stats):
        stats["api_calls"] += 1
        best: dict[str, dict] = {}  # a few passages per article can rank high: over-fetch, keep each one's best
        for passage in self.index.query(query, self.top_k * 3):
            best.setdefault(passage["id"], passage)
        results = []
        for rank, (article_id, passage) in enumerate(list(best.items())[:self.top_k], start=1):
            results.append(SearchResult(passage["title"], self.page_url(article_id), _cut(passage["body"], 300), rank))
        return results


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
        self.kind = kind
        self.key = key


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
        self.path = str(path) if path else None
        self.mode = mode
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
            # two processes switching a new file to WAL at once both hold a read lock and both want the write lock:
            # SQLite answers one of them "database is locked" at once, without waiting (a deadlock, to it). The other
            # finishes the switch in milliseconds and WAL stays set in the file, so trying again succeeds.
            for attempt in range(600):
                try:
                    con.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as error:
                    if "locked" not in str(error) or attempt == 599:
                        raise
                    time.sleep(0.1)
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process crashes, fast
            self._local.con = con
            self._local.pid = os.getpid()
        return con

    def get(self, kind: str, key: str) -> dict | None:
        if self.mode in ("live", "record"):
            return None
        row = self._con().execute("SELECT value FROM entries WHERE kind=? AND key=?", (kind, key)).fetchone()
        if row is None and self.mode == "replay":
            raise CacheMiss(kind, key)
        if row is None:
            return None
        return json.loads(row[0])

    def put(self, kind: str, key: str, value: dict) -> None:
        if self.mode in ("live", "replay"):
            return
        self._con().execute("INSERT OR REPLACE INTO entries (kind, key, value, fetched_at) VALUES (?, ?, ?, ?)",
                            (kind, key, json.dumps(value, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        if not self.path:
            return 0
        return self._con().execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
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
        if self.ok:
            return False
        status = self.status or 0
        return self.kind in ("timeout", "network", "cache_miss") or status in RETRY_STATUS or status >= 500


def check_url(url: str, allow_private: bool = False, allow_hosts=()) -> tuple[str, str] | None:
    """None when `url` may be fetched, else (kind, reason). The URLs come from a model: http(s) only, and a host that
    resolves to a loopback, private, link-local, multicast or reserved address is refused unless allow_private or
    `host:port` (or `host`) is in allow_hosts. Run on every redirect hop."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except (ValueError, AttributeError):
        return "bad_url", "not a valid URL"
    if not parts.scheme:
        return "bad_url", "not a URL (no http:// or https://)"
    if parts.scheme not in ("http", "https"):
        return "blocked", f"scheme {parts.scheme!r} is not allowed, only http and https"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "bad_url", "the URL has no host"
    if allow_private or f"{host}:{port}" in allow_hosts or host in allow_hosts:
        return None
    try:
        address_infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError):
        return "dns", f"could not resolve host {host}"
    addresses = {info[4][0] for info in address_infos}  # (family, type, proto, canonname, (address, port, ...))
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        if not ip.is_global or ip.is_multicast:  # private, loopback, link-local, reserved, unspecified, shared
            return "blocked", f"{host} resolves to a private or reserved address ({address})"
    return None


@functools.cache
def _deadline_pools() -> dict:
    """urllib3 pool classes whose responses read the socket under the deadline of the fetch() their thread runs. A
    socket timeout restarts at every byte, so a server that trickles its status line, headers or body would hold the
    thread for hours; here each read waits at most the time left, and one deadline covers them all."""

    class DeadlineResponse(http.client.HTTPResponse):
        def __init__(self, sock, *args, **kwargs):
            super().__init__(sock, *args, **kwargs)  # (reads nothing yet: the status line comes with begin())
            deadline = getattr(_thread, "deadline", None)
            if deadline is None:
                return
            socket_io = self.fp.raw  # the socket's SocketIO: the buffered reader's only way to the socket
            read_socket = socket_io.readinto

            def readinto_before_deadline(buffer):
                time_left = deadline - time.monotonic()
                if time_left <= 0:
                    raise TimeoutError("the fetch deadline passed")
                sock.settimeout(time_left)
                return read_socket(buffer)

            socket_io.readinto = readinto_before_deadline

    def with_deadline(pool_class):
        connection_class = type("Deadline" + pool_class.ConnectionCls.__name__, (pool_class.ConnectionCls,),
                                {"response_class": DeadlineResponse})
        return type("Deadline" + pool_class.__name__, (pool_class,), {"ConnectionCls": connection_class})

    return {"http": with_deadline(urllib3.HTTPConnectionPool), "https": with_deadline(urllib3.HTTPSConnectionPool)}


_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_\-:.]+)""", re.I)
_LATIN = {"cp1250", "cp1252", "latin_1", "iso8859_2", "iso8859_15", "iso8859_9", "cp1254", "mac_roman", "cp1257"}


def decode_body(body: bytes, declared: str | None = None, is_html: bool = False) -> str:
    """Bytes -> str: the declared charset (header, then <meta>), then UTF-8, then charset_normalizer's guess (with
    replacement characters). A wrong declaration falls through to the next guess."""
    import charset_normalizer
    candidates = [declared]
    if is_html:
        meta = _META_CHARSET.search(body[:4096])
        if meta:
            candidates.append(meta.group(1).decode("ascii", "ignore"))
    candidates.append("utf-8")
    for encoding in candidates:
        if not encoding:
            continue
        with contextlib.suppress(LookupError, UnicodeDecodeError):
            return body.decode(encoding)
    best = charset_normalizer.from_bytes(body[:500_000]).best()
    encoding = best.encoding if best is not None else "utf-8"
    if encoding in _LATIN:  # a short Western text is ambiguous among the Latin code pages; cp1252 is the web's usual
        with contextlib.suppress(UnicodeDecodeError):
            return body.decode("cp1252")
    return body.decode(encoding, errors="replace")


def _squeeze(text: str) -> str:
    """Each line single-spaced, empty lines dropped."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def html_to_text(page: str) -> tuple[str, str]:
    """(title, main text) of an HTML page: trafilatura's main content (boilerplate, navigation, scripts out; headings,
    paragraphs, lists and tables kept; its fallbacks, readability and jusText, when it finds little)."""
    title_match = re.search(r"<title[^>]*>(.*?)</title>", page[:20000], re.I | re.S)
    title = " ".join(html.unescape(title_match.group(1)).split()) if title_match else ""
    try:
        import trafilatura
        main_text = trafilatura.extract(page, include_comments=False, include_tables=True) or ""
        return title, _squeeze(main_text)
    except Exception:  # noqa: BLE001  trafilatura can choke on hostile markup: no text, an "empty" page
        return title, ""


# HTML/PDF -> text is CPU work under the GIL: threads running it at once only take turns, and with 32 of them the
# switching cost more than the work (bench/browse.py: 7.6 -> 4.0 ms of CPU per page, 15x -> 21-25x speedup, with
# 1-2 slots). Two slots, so that one pathological page cannot stall every other page's extraction.
EXTRACT_SLOTS = 2
_extracting = threading.BoundedSemaphore(EXTRACT_SLOTS)


def _new_extract_slots_in_child() -> None:
    """A forked child may inherit the semaphore held by a thread that did not come along: it gets fresh slots."""
    global _extracting
    _extracting = threading.BoundedSemaphore(EXTRACT_SLOTS)


os.register_at_fork(after_in_child=_new_extract_slots_in_child)


def page_text(body: bytes, content_type_header: str) -> tuple[str, str, str | None]:
    """(title, text, error) from a response body and its Content-Type header: HTML through html_to_text, text as
    is, PDF through pypdf; anything else is an error ("unsupported content type ...")."""
    content_type, _, params = content_type_header.partition(";")
    content_type = content_type.strip().lower()
    charset_match = re.search(r"charset=[\"']?([^;\"'\s]+)", params, re.I)
    head = body[:2048]
    if not content_type:  # no header: sniff
        if head.startswith(b"%PDF"):
            content_type = "application/pdf"
        elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
            content_type = "text/html"
        else:
            content_type = "text/plain"
    if content_type == "application/pdf":
        from pypdf import PdfReader
        try:
            pdf_pages = PdfReader(io.BytesIO(body)).pages
            return "", _squeeze("\n".join(pdf_page.extract_text() or "" for pdf_page in pdf_pages)), None
        except Exception as e:  # pypdf raises many types on broken files
            return "", "", f"unreadable PDF ({type(e).__name__})"
    is_text = content_type.startswith("text/") or content_type in TEXT_TYPES
    if content_type not in HTML_TYPES and not is_text:
        return "", "", f"unsupported content type {content_type}"
    if b"\x00" in head:
        return "", "", f"binary content served as {content_type}"
    declared = charset_match.group(1) if charset_match else None
    text = decode_body(body, declared, content_type in HTML_TYPES)
    if content_type in HTML_TYPES:
        title, main_text = html_to_text(text)
        return title, main_text, None
    return "", _squeeze(text), None


def _fail(url: str, kind: str, error: str, status: int | None = None, **kw) -> FetchResult:
    return FetchResult(False, status, url, error=error, kind=kind, **kw)


def fetch(url: str, *, timeout: float = 10.0, max_bytes: int = MAX_BYTES, allow_private: bool = False,
          allow_hosts=(), max_redirects: int = 5, max_tries: int = 3, backoff_s: float = 0.5) -> FetchResult:
    """Fetch one URL and return its readable text; never raises. Redirects are followed by hand, each hop checked.
    The whole call, retries included, ends within `timeout` seconds: connection errors, 429 and 5xx are retried
    with jittered exponential backoff, honouring Retry-After, at most `max_tries` tries and never past the deadline."""
    started = time.monotonic()
    deadline = started + timeout
    _thread.deadline = deadline  # this thread's socket reads wait at most until then (_deadline_pools)
    try:
        for attempt in range(max(max_tries, 1)):
            result, retry_after = _fetch_once(url, deadline, timeout, max_bytes, allow_private, allow_hosts,
                                              max_redirects)
            if retry_after is None:  # the answer, good or bad
                break
            last_try = attempt >= max_tries - 1
            wait = retry_after or backoff_s * 2 ** attempt * random.uniform(0.5, 1.5)
            if last_try or time.monotonic() + wait >= deadline:
                if retry_after and not last_try:  # Retry-After asks for more time than is left
                    result.error += f" (retry after {retry_after:g} s exceeds the {timeout:g} s timeout)"
                break
            time.sleep(wait)
    except Exception as e:  # a bug or a library surprise must not take a rollout down: report it as a result
        result = _fail(url, "network", f"fetch failed ({type(e).__name__}: {str(e)[:100]})")
    finally:
        _thread.deadline = None
    result.elapsed_s = time.monotonic() - started
    return result


def _fetch_once(url: str, deadline: float, timeout: float, max_bytes: int, allow_private: bool, allow_hosts,
                max_redirects: int) -> tuple[FetchResult, float | None]:
    """One try of fetch(): (result, None) when it is the answer, or (failure, seconds) when another try may do
    better after that many seconds (0: fetch's backoff)."""
    timed_out = f"timeout after {timeout:g} s"
    hop = url
    for _ in range(max_redirects + 1):
        refusal = check_url(hop, allow_private, allow_hosts)
        if refusal:
            return _fail(hop, *refusal), None
        time_left = deadline - time.monotonic()
        if time_left <= 0:
            return _fail(hop, "timeout", timed_out), None
        try:
            response = http_session().get(hop, stream=True, allow_redirects=False, timeout=time_left)
        except (requests.RequestException, ValueError, UnicodeError) as e:
            if _timed_out(e):
                return _fail(hop, "timeout", timed_out), None
            if not isinstance(e, requests.ConnectionError):
                return _fail(hop, "bad_url", f"not a fetchable URL ({type(e).__name__})"), None
            if "refused" in str(e).lower():
                return _fail(hop, "network", "connection refused"), 0.0
            return _fail(hop, "network", "connection failed"), 0.0
        with response:
            if response.is_redirect:
                hop = requests.compat.urljoin(hop, response.headers["location"])
                continue
            status = response.status_code
            content_type = response.headers.get("content-type", "")
            if status >= 400:  # 429 and 5xx are worth another try, after Retry-After when the server says
                failure = _fail(hop, "http", f"HTTP {status} {response.reason or ''}".strip(), status)
                if status not in RETRY_STATUS and status < 500:
                    return failure, None
                return failure, _retry_after_s(response)
            try:
                data = _read_body(response, max_bytes)
            except (TimeoutError, urllib3.exceptions.ReadTimeoutError):
                return _fail(hop, "timeout", timed_out, status), None
            except (urllib3.exceptions.HTTPError, OSError):
                return _fail(hop, "network", "connection lost while reading the page", status), 0.0
        return _page_result(hop, status, content_type, data, max_bytes), None
    return _fail(hop, "redirects", f"more than {max_redirects} redirects"), None


def _read_body(response, max_bytes: int) -> bytearray:
    """A streamed response's body, decompressed, as bytes arrive, up to max_bytes and a little past (so that the cut
    shows). The deadline is in the socket reads (_deadline_pools): a late server raises TimeoutError here."""
    data = bytearray()
    while len(data) < max_bytes:
        piece = response.raw.read1(65536, decode_content=True)
        if not piece:
            break
        data += piece
    return data


def _retry_after_s(response) -> float:
    """The seconds a response's Retry-After asks for (a number or an HTTP date); 0 when it asks for none."""
    with contextlib.suppress(urllib3.exceptions.HTTPError, TypeError, ValueError, OverflowError):
        return Retry().parse_retry_after(response.headers.get("retry-after") or "0") or 0.0
    return 0.0


def _page_result(url: str, status: int, content_type: str, data: bytearray, max_bytes: int) -> FetchResult:
    """A fetched body (read up to max_bytes and a little past) as a FetchResult with its readable text."""
    body = bytes(data[:max_bytes])
    truncated = len(data) >= max_bytes
    if not body.strip():
        return _fail(url, "empty", "empty page", status, content_type=content_type)
    with _extracting:
        title, text, why = page_text(body, content_type)
    if why:
        return _fail(url, "unsupported", why, status, content_type=content_type, n_bytes=len(body))
    if not text:
        return _fail(url, "empty", "no readable text on the page", status, content_type=content_type,
                     n_bytes=len(body))
    return FetchResult(True, status, url, text, None, 0.0, content_type, len(body), title, "", truncated)


class Fetcher:
    """fetch() behind a thread pool, a per-host limit, the Cache (kind "page") and `stats` (a Counter: pages, ok,
    cache_hits, bytes, latency_s, "failed:<kind>"); thread-safe, one per Browser. `aliases` maps a canonical host
    (the embedded web's "localweb") to the host:port serving it in this process: URLs, cache keys and results keep
    the canonical form, so they do not depend on the port."""

    def __init__(self, *, cache: Cache | None = None, aliases: dict | None = None, n_threads: int = 32,
                 per_host: int = 8, **fetch_kw):
        self.cache = cache
        self.aliases = dict(aliases or {})
        self.per_host = per_host
        self.fetch_kw = fetch_kw
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="fetch")

    def fetch(self, url: str) -> FetchResult:
        started = time.monotonic()
        key = str(url).split("#", 1)[0].strip()  # the cache key: the URL without its #fragment
        try:
            hit = None
            if self.cache is not None:
                hit = self.cache.get("page", key)
            if hit:
                result = FetchResult(**{**hit, "cached": True})
            else:
                result = self._fetch_live(key)
        except CacheMiss:
            result = _fail(key, "cache_miss", "page not in the replay cache (record it first, or use "
                                              "cache_mode=replay_or_live)")
        result.elapsed_s = time.monotonic() - started
        page_stats = Counter(pages=1, ok=int(result.ok), cache_hits=int(result.cached), bytes=result.n_bytes,
                             latency_s=result.elapsed_s)
        if not result.ok:
            page_stats[f"failed:{result.kind}"] = 1
        with self._lock:
            self.stats.update(page_stats)
        return result

    def _fetch_live(self, key: str) -> FetchResult:
        """fetch() at the address serving `key` (aliases), at most per_host at once per host; recorded in the cache."""
        try:
            parts = urlsplit(key)
            parts = parts._replace(netloc=self.aliases.get(parts.netloc, parts.netloc))
            live_url = parts.geturl()
            host = parts.netloc.lower()
        except ValueError:
            live_url = key
            host = ""
        with self._lock:
            slot = self._hosts.setdefault(host, threading.BoundedSemaphore(self.per_host))
        with slot:
            result = fetch(live_url, **self.fetch_kw)
        if result.url == live_url:
            result.url = key  # the canonical URL, never this run's port
        # keep what another run would see again: pages and permanent failures, not timeouts or outages
        permanent_failure = result.kind in ("http", "unsupported", "empty") and not result.transient
        if self.cache is not None and (result.ok or permanent_failure):
            self.cache.put("page", key, asdict(result))
        return result

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        return list(self._pool.map(self.fetch, urls))  # (input order)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# --------------------------------------------------------- reading: chunk by chunk, only new and relevant information

@dataclass
class PageState:
    """One trajectory's reading of one page: where reading stopped, what was already returned or is still to be
    shown, and the reading model's memory."""
    url: str
    title: str                                    # (for a custom reader: the seam in Browser.__init__)
    chunks: list[str]
    pos: int = 0                                  # the chunk reading resumes at
    returned: set = field(default_factory=set)    # passages already shown (extract reader)
    # the facts found on any page since the trajectory's most recent search, before this reading (set by Session):
    # the llm reader's memory, so that it returns only new facts (the reference's "context so far")
    memory: str = ""
    pending: str = ""                             # read but not shown yet: it did not fit the last observation


def chunk_text(text: str, max_chars: int, pack: bool = True) -> list[str]:
    """Pieces of at most max_chars, split at paragraphs; a longer paragraph is cut at a sentence end when one falls
    past a third of the limit, else hard. pack: consecutive paragraphs share a piece while they fit (a reader's
    chunks); without: one piece per paragraph (the extract reader's passages)."""
    pieces: list[str] = []
    for paragraph in text.split("\n"):
        paragraph = paragraph.strip()
        while len(paragraph) > max_chars:
            sentence_end = paragraph.rfind(". ", 0, max_chars)
            cut = sentence_end + 1 if sentence_end > max_chars // 3 else max_chars
            pieces.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if not paragraph:
            continue
        if pack and pieces and len(pieces[-1]) + 1 + len(paragraph) <= max_chars:
            pieces[-1] += "\n" + paragraph
        else:
            pieces.append(paragraph)
    return pieces


def chunks_to_read(page: PageState, max_chunks: int) -> int:
    """How many chunks one reading may take from page.pos on: to the page's end, or max_chunks (0 = no cap)."""
    remaining = len(page.chunks) - page.pos
    if max_chunks <= 0:
        return remaining
    return min(max_chunks, remaining)


_STOP = frozenset("a an and are as at be by for from has have he her his how in is it its of on or she that the "
                  "their there this to was were what when where which who whom whose why with".split())


def _terms(text: str) -> list[str]:
    return [word for word in re.findall(r"\w+", text.lower()) if word not in _STOP]


def bm25_scores(query_terms: list[str], docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each doc (a list of terms) against the distinct query terms, IDF over these docs."""
    query = set(query_terms)
    n_docs = len(docs)
    avg_len = sum(len(doc) for doc in docs) / max(n_docs, 1) or 1.0
    doc_freq = Counter(term for doc in docs for term in query.intersection(doc))
    idf = {term: math.log(1 + (n_docs - count + 0.5) / (count + 0.5)) for term, count in doc_freq.items()}
    scores = []
    for doc in docs:
        term_freq = Counter(doc)
        length_norm = 1 - b + b * len(doc) / avg_len
        score = 0.0
        for term in query:
            if term in term_freq:
                score += idf[term] * term_freq[term] * (k1 + 1) / (term_freq[term] + k1 * length_norm)
        scores.append(score)
    return scores


class ExtractReader:
    """No model: the chunk's best new passages by BM25 against the question and the queries, in page order, up to
    `page_chars` (a passage is never cut); a chunk with nothing new and relevant is skipped. On a first visit where
    nothing matches, the page's opening passage (it usually says what the page is about)."""

    def __init__(self, cfg: "BrowseConfig", cache: Cache | None = None):
        self.cfg = cfg

    def read(self, page: PageState, question: str, queries: list[str]) -> str:
        query_terms = _terms(" ".join([question, *queries]))
        first_visit = not page.returned
        for _ in range(chunks_to_read(page, self.cfg.max_chunks)):  # from page.pos on
            passages = chunk_text(page.chunks[page.pos], 600, pack=False)
            fresh = [i for i, passage in enumerate(passages) if passage not in page.returned]
            scores = bm25_scores(query_terms, [_terms(passages[i]) for i in fresh])
            ranked = sorted(zip(scores, fresh), key=lambda score_and_index: score_and_index[0], reverse=True)
            relevant = [i for score, i in ranked if score > 0]  # best first (ties in page order)
            if first_visit and not relevant and fresh and page.pos == 0:
                relevant = fresh[:1]
            keep = []
            budget = self.cfg.page_chars
            for i in relevant:
                if len(passages[i]) <= budget or not keep:
                    keep.append(i)
                    budget -= len(passages[i])
                if budget <= 0:
                    break
            if keep:
                page.returned.update(passages[i] for i in keep)
                return "\n".join(passages[i] for i in sorted(keep))
            page.pos += 1  # nothing new and relevant here: read on
        return ""


READER_PROMPT = """You read one part of a web page for a research assistant and extract what helps answer its question.

Question: {question}
Search queries that led to this page: {queries}
Facts already found for these searches (do not repeat them):
{memory}

Page part {part} of {parts} ({url}):
<page>
{chunk}
</page>

Reply with JSON only, no other text:
{{"extracted_info": "every new fact from this part that helps answer the question, quoted or closely paraphrased,
 with numbers and names exact, at most about 1,500 words; empty string if none",
 "read_more": true or false (whether the next part of the page is likely to help)}}"""

# The reading model's reply limit, in tokens: the ~1,500 words the prompt allows are ~2,000 tokens, and JSON escapes
# and the read_more field fit well within; a longer reply, cut here, could not be parsed (the reference sets none).
READER_MAX_TOKENS = 4096


def chat_completion(base_url: str, model: str, messages: list[dict], *, api_key: str | None = None,
                    timeout: float = 60.0, max_tries: int = 3, backoff_s: float = 0.5, max_tokens: int = 1024,
                    who: str = "reader endpoint") -> str:
    """The reply's text from one temperature-0 call to an OpenAI-compatible /chat/completions endpoint (the reading
    model's and eval.py's judge's), through `http_json`; raises WebError with a reason that never holds the key."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    data, _ = http_json("POST", base_url.rstrip("/") + "/chat/completions", name=f"{who} {base_url}",
                        timeout=timeout, max_tries=max_tries, backoff_s=backoff_s, secret=api_key or "",
                        auth_hint="check the API key variable", json=body, headers=headers)
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise WebError("malformed", f"{who} {base_url} sent a reply that is not a chat completion") from None


def parse_reader_reply(text: str) -> dict | None:
    """{"extracted_info": str, "read_more": bool} from the reading model's reply, the JSON object wherever the model
    put it (code fences, prose around it), read_more from true, "yes", "true" or 1, a null as empty; None when the
    reply holds no such object (not JSON, stray text, cut at the reply limit)."""
    match = re.search(r"\{.*\}", text, re.S)
    if match is None:
        return None
    try:
        parsed = json.loads(match.group(0))
    except ValueError:
        return None
    if not isinstance(parsed, dict) or "extracted_info" not in parsed:
        return None
    read_more = str(parsed.get("read_more", False)).strip().lower() in ("yes", "true", "1")
    return {"extracted_info": str(parsed.get("extracted_info") or "").strip(), "read_more": read_more}


def _newest(text: str, max_chars: int) -> str:
    """The last max_chars characters of text, from a line start when one falls inside."""
    if len(text) <= max_chars:
        return text
    line_start = text.find("\n", len(text) - max_chars)
    if line_start < 0:
        return text[-max_chars:]
    return text[line_start + 1:]


class LLMReader:
    """A reading model behind any OpenAI-compatible endpoint (a local vLLM/SGLang server or a hosted model): it reads
    a page part by part while it says the next part may help, remembers the facts found since the last search and
    returns all the new ones. Replies are cached (Cache kind "read", keyed by model and prompt), so a replayed run
    reads the same way. A reply that cannot be parsed is not the web failing: its part is skipped and the page's
    text says so. Thread-safe (Session reads a call's pages in parallel)."""

    def __init__(self, cfg: "BrowseConfig", cache: Cache | None = None):
        if not cfg.llm_base_url or not cfg.llm_model:
            raise ValueError("reader=llm needs llm_base_url and llm_model (an OpenAI-compatible endpoint, e.g. "
                             "--llm_base_url=http://localhost:8000/v1 --llm_model=Qwen/Qwen2.5-7B-Instruct); "
                             "or use reader=extract, which needs no model")
        self.cfg = cfg
        self.cache = cache
        self.api_key = os.environ.get(cfg.llm_api_key_env) if cfg.llm_api_key_env else None
        self.calls = 0      # requests to the endpoint (cache hits are not calls)
        self.failures = 0   # calls the endpoint failed (transport, HTTP, not a chat completion)
        self.unparsed = 0   # replies that could not be parsed
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _ask(self, prompt: str) -> dict:
        """{"extracted_info": str, "read_more": bool, "parsed": bool} for one prompt, from the cache or the model.
        An unparsable reply is cached too: at temperature 0 the model would write it again, and a replay must see
        what the recording saw."""
        key = hashlib.sha256(json.dumps([self.cfg.llm_model, prompt]).encode()).hexdigest()
        try:
            hit = self.cache.get("read", key) if self.cache is not None else None
        except CacheMiss:
            raise WebError("cache_miss", "reading not in the replay cache") from None
        if hit is not None:
            return hit
        self._count("calls")
        text = chat_completion(self.cfg.llm_base_url, self.cfg.llm_model, [{"role": "user", "content": prompt}],
                               api_key=self.api_key, timeout=self.cfg.llm_timeout, max_tokens=READER_MAX_TOKENS)
        parsed = parse_reader_reply(text)
        if parsed is None:
            reply = {"extracted_info": "", "read_more": False, "parsed": False}
        else:
            reply = {**parsed, "parsed": True}
        if self.cache is not None:
            self.cache.put("read", key, reply)
        return reply

    def read(self, page: PageState, question: str, queries: list[str]) -> str:
        facts: list[str] = []
        # to the page's end at most: the reference looped forever when told to read on at the last part
        for _ in range(chunks_to_read(page, self.cfg.max_chunks)):
            part = page.pos + 1
            memory = "\n".join([page.memory, *facts]).strip()
            prompt = READER_PROMPT.format(question=question, queries="; ".join(queries) or "(none)",
                                          memory=_newest(memory, self.cfg.chunk_chars) or "(nothing yet)",
                                          part=part, parts=len(page.chunks), url=page.url,
                                          chunk=page.chunks[page.pos])
            try:
                reply = self._ask(prompt)
            except WebError:  # the endpoint failed (after its bounded retries): the next browse reads this part again
                self._count("failures")
                if facts:  # keep what was read
                    break
                raise
            page.pos += 1
            if not reply.get("parsed", True):
                self._count("unparsed")
                facts.append(unparsed_note(part, len(page.chunks)))
                break
            info = reply["extracted_info"]
            if info and info not in facts:
                facts.append(info)
            if not reply["read_more"]:
                break
        return "\n".join(facts)


def unparsed_note(part: int, n_parts: int) -> str:
    """What the policy reads for a part of a page whose reading model reply could not be parsed."""
    note = f"(part {part} of {n_parts}: the reading model's reply could not be parsed, so this part was skipped"
    if part < n_parts:
        return note + "; browse the page again to read on)"
    return note + ")"


# -------------------------------------------------- CLI: a Browser from --key=value flags, its search, JSON on stdout

def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    cfg = parse_config(BrowseConfig, [arg for arg in argv if arg.startswith("-")])  # (--help lists the keys)
    queries = [arg for arg in argv[1:] if not arg.startswith("-")]
    if argv[:1] != ["search"] or not queries:
        print("usage: python browse.py search QUERY... [--key=value ...]", file=sys.stderr)
        return 2
    try:
        with contextlib.closing(Browser(cfg)) as browser:
            outcomes = dict(zip(queries, browser.backend.search(queries)))
    except (CacheMiss, WebError, ValueError) as e:  # a set-up problem: say what to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = {query: str(outcome) for query, outcome in outcomes.items() if isinstance(outcome, WebError)}
    results = {query: [asdict(result) for result in outcome]
               for query, outcome in outcomes.items() if query not in errors}
    report = {"results": results, "errors": errors, "stats": browser.backend.stats}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return int(bool(errors))


if __name__ == "__main__":
    sys.exit(main())
