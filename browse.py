"""The agent's web: search back ends, a record/replay cache, an embedded offline web, page fetching and reading.

What it does
- `SearchResult(title, url, snippet, rank)`: what every back end returns, rank 1 first.
- `make_backend(name, *, top_k=10, corpus=None, cache=None, **opts)` -> a back end with
  `search(queries) -> list[list[SearchResult]]` (raises `SearchError` with a `.kind`) and
  `search_or_error(queries) -> list[list[SearchResult] | SearchError]` (errors as values, one per query):
  - `serper`: Google through the Serper API (key from $SERPER_API_KEY; options gl, hl, location). A missing key fails
    at construction; 401/403 stop at once (kind "auth"); 429 and 5xx back off with full jitter, honouring
    Retry-After, for at most `max_tries` tries; every request has a timeout. The key never appears in a message,
    an exception or a repr.
  - `searxng`: a SearXNG instance's JSON API (`url=` or $SEARXNG_URL; the instance must allow `format=json`).
  - `local`: BM25 over a JSONL corpus (`id, title, url, text` a line; default: the embedded ~10k Wikipedia summaries
    from data/wiki_corpus.py), chunked into ~100-word passages. The index is tantivy (Rust, on disk, memory-mapped:
    chosen by measurement over bm25s and SQLite FTS5, see bench/RESULTS.md), built once per corpus hash in
    $DR_CACHE_DIR/bm25/ and shared by processes. Results carry LocalWeb URLs, one hit per article.
- `LocalWeb(corpus)`: serves each corpus record as a real HTML page at http://127.0.0.1:PORT/wiki/<id>, in a daemon
  thread. The port is derived from the corpus hash and bound with SO_REUSEPORT, so every torchrun rank serves the
  same URLs (and a recorded cache replays on another run or machine); the local back end starts it itself.
- `Cache(path, mode, max_age_s)`: one SQLite (WAL) file for search results and pages, `get(kind, key)` /
  `put(kind, key, value)`, safe across threads and processes. Modes: live (no cache), record (live, write all),
  replay (cache only; a miss raises `CacheMiss` with the exact key), replay_or_live. Entries keep their fetch time.
- `Stats`: queries, cache hits, API calls, failures by kind, latency, estimated dollars; per back end (`.stats`),
  per call (`search_detailed`), and per step (`stats.snapshot()` differences).

- `fetch(url)` -> `FetchResult(ok, status, url, text, error, elapsed_s, ...)`, never raises: http(s) only, hosts that
  resolve to private/loopback/link-local/reserved addresses refused (checked on every redirect hop; the embedded web
  is allow-listed), one wall-clock deadline over connect, trickling bodies and retries (429/5xx/connection errors,
  jittered backoff, Retry-After), a byte cap, charset fallbacks, gzip; HTML through trafilatura (BeautifulSoup
  fallback), text as is, PDF through pypdf, anything else "unsupported content type".
- `Fetcher` / `fetch_many(urls)`: a thread pool, results in input order, at most `per_host` requests per host,
  pages recorded/replayed in the Cache, stats (pages, bytes, latency, failures by kind).
- Readers (what browse_webpage returns): a page is split into `chunk_chars` chunks and read chunk by chunk, at most
  `max_chunks` per call, resuming where the last call stopped; only new information is returned.
  `extract` (default, no model): BM25 over the chunk's passages vs the question and the search queries, the best
  new ones up to `page_chars`. `llm`: any OpenAI-compatible endpoint extracts info, decides whether to read on and
  keeps a short summary per search (replies cached). Any object with `read(page, question, queries)` can be
  passed as `Browser(cfg, reader=...)` (the seam for a policy-as-reader).
- `Browser(BrowseConfig)` (one per process, thread-safe) and `Browser.session(question)` (one per trajectory):
  `Session.web_search(queries)` / `Session.browse_webpage(urls)` return the observation text and never raise.
  Only URLs from the trajectory's most recent search are readable (the reference rule).

What it does not do
- No dense retrieval; no JavaScript rendering; no torch. A DNS answer that changes between the address check and
  the connection (DNS rebinding) is not caught: fetch untrusted policies' URLs where the private network holds
  nothing to steal.

How to run
    python browse.py search "highest mountain on Earth" --backend=local --top_k=5
    SERPER_API_KEY=... python browse.py search "who wrote hamlet" "capital of peru" --backend=serper \\
        --cache=runs/web.sqlite --cache_mode=record
    python browse.py search "who wrote hamlet" --backend=serper --cache=runs/web.sqlite --cache_mode=replay
    python browse.py serve [--corpus=FILE] [--port=N]         # browse the embedded web at the printed URL
    python browse.py fetch https://example.org/ [--allow_private=1]   # one page's readable text, as JSON
"""

from __future__ import annotations

import email.utils
import fcntl
import hashlib
import heapq
import html
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

SERPER_URL = "https://google.serper.dev/search"
SERPER_USD_PER_QUERY = 0.001  # Serper's list price at volume, ~$1 per 1k queries (Nov 2026); an estimate, not a bill
CACHE_MODES = ("live", "record", "replay", "replay_or_live")
INDEX_VERSION = 2  # bump when the index schema or chunking changes: old indexes are then rebuilt, not misread


def cache_dir() -> Path:
    """$DR_CACHE_DIR, else ~/.cache/deepresearch (shared with model.py and data/wiki_corpus.py)."""
    return Path(os.environ.get("DR_CACHE_DIR", Path.home() / ".cache" / "deepresearch"))


# ---------------------------------------------------------------------------------------------------------------------
# Records and errors

@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str
    rank: int  # 1-based position in the back end's list


class SearchError(RuntimeError):
    """A failed search. kind: auth | rate_limit | server | timeout | network | malformed | http | config."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class CacheMiss(LookupError):
    """Replay mode and the cache has no (fresh) entry. `.key` is the exact key (kind, key string)."""

    def __init__(self, kind: str, key: str):
        super().__init__(f"cache miss in replay mode: kind={kind!r} key={key}")
        self.kind, self.key = kind, key


@dataclass
class Stats:
    """Counters of one back end (cumulative) or of one call/step (a difference of snapshots)."""
    queries: int = 0
    cache_hits: int = 0
    api_calls: int = 0          # HTTP requests sent (retries included) or local index lookups
    failures: dict = field(default_factory=dict)  # kind -> count, counted per failed query
    latency_s: float = 0.0      # wall time spent answering queries (cache hits included)
    cost_usd: float = 0.0       # estimated API spend

    def add(self, other: "Stats") -> None:
        self.queries += other.queries
        self.cache_hits += other.cache_hits
        self.api_calls += other.api_calls
        self.latency_s += other.latency_s
        self.cost_usd += other.cost_usd
        for k, v in other.failures.items():
            self.failures[k] = self.failures.get(k, 0) + v

    def snapshot(self) -> dict:
        d = asdict(self)
        d["failures"] = dict(self.failures)
        return d

    @staticmethod
    def diff(after: dict, before: dict) -> dict:
        """Per-step numbers from two snapshots."""
        out = {k: after[k] - before.get(k, 0) for k in after if k != "failures"}
        fails = {k: v - before.get("failures", {}).get(k, 0) for k, v in after["failures"].items()}
        out["failures"] = {k: v for k, v in fails.items() if v}
        return out


def normalize_query(q: str) -> str:
    """Cache-key form of a query: NFKC, lowercase, single spaces (search engines ignore case and spacing)."""
    return " ".join(unicodedata.normalize("NFKC", q).lower().split())


# ---------------------------------------------------------------------------------------------------------------------
# Cache

class Cache:
    """Record/replay store for search results ("search") and fetched pages ("page") in one SQLite WAL file.

    get(kind, key) -> dict | None and put(kind, key, value). What `get` does depends on the mode:
      live: always None (and put does nothing); record: always None (the caller goes live), put writes;
      replay: the entry, or CacheMiss(kind, key); replay_or_live: the entry or None, put writes.
    With max_age_s, an entry older than that counts as absent. Each thread gets its own connection (sqlite3
    connections are not shareable across threads) and a forked child opens new ones; WAL lets readers run while
    one process writes, and busy_timeout makes concurrent writers wait instead of failing.
    """

    def __init__(self, path: str | os.PathLike | None, mode: str = "replay_or_live", max_age_s: float | None = None):
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode {mode!r}: use one of {', '.join(CACHE_MODES)}")
        if path is None and mode != "live":
            raise ValueError(f"cache mode {mode!r} needs a cache file (--cache=FILE)")
        self.path, self.mode, self.max_age_s = (str(path) if path else None), mode, max_age_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self.stats = {"lookups": 0, "hits": 0, "misses": 0, "stale": 0, "puts": 0}
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            con = self._con()
            with con:
                con.execute("CREATE TABLE IF NOT EXISTS entries (kind TEXT NOT NULL, key TEXT NOT NULL, "
                            "value TEXT NOT NULL, fetched_at REAL NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():  # a connection must not cross a fork
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process crashes, fast
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def get(self, kind: str, key: str, with_time: bool = False):
        """The cached value (or (value, fetched_at) with with_time), None when absent; see the class docstring."""
        if self.mode in ("live", "record"):
            return None
        self._count("lookups")
        row = self._con().execute("SELECT value, fetched_at FROM entries WHERE kind=? AND key=?",
                                  (kind, key)).fetchone()
        if row is not None and self.max_age_s is not None and time.time() - row[1] > self.max_age_s:
            self._count("stale")
            row = None
        if row is None:
            self._count("misses")
            if self.mode == "replay":
                raise CacheMiss(kind, key)
            return None
        self._count("hits")
        value = json.loads(row[0])
        return (value, row[1]) if with_time else value

    def put(self, kind: str, key: str, value: dict, fetched_at: float | None = None) -> None:
        """Store (or replace) an entry; a no-op in live and replay modes (replay never changes the shared file)."""
        if self.mode in ("live", "replay"):
            return
        self._count("puts")
        self._con().execute("INSERT OR REPLACE INTO entries (kind, key, value, fetched_at) VALUES (?, ?, ?, ?)",
                            (kind, key, json.dumps(value, ensure_ascii=False),
                             time.time() if fetched_at is None else fetched_at))

    def __len__(self) -> int:
        if not self.path:
            return 0
        return self._con().execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def search_key(backend: str, query: str, top_k: int, options: dict) -> str:
    """The exact cache key of one search: JSON of (back end, normalised query, top-k, sorted options)."""
    return json.dumps([backend, normalize_query(query), top_k, sorted(options.items())], ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------------------
# Back ends: a shared driver (cache, stats, concurrency) around each back end's `_search_one`

@dataclass
class SearchCall:
    """One `search_detailed` call: results or an error per query, and the call's own stats."""
    results: list  # list[list[SearchResult] | SearchError]
    stats: dict


class Backend:
    name = "?"
    usd_per_query = 0.0

    def __init__(self, top_k: int = 10, cache: Cache | None = None, n_threads: int = 4):
        self.top_k, self.cache = int(top_k), cache
        self.stats = Stats()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix=f"search-{self.name}")
        self.options: dict = {}  # whatever changes the results; part of the cache key

    # subclasses: one query -> list[SearchResult]; raise SearchError; `st` counts api_calls
    def _search_one(self, query: str, st: Stats) -> list[SearchResult]:
        raise NotImplementedError

    def _one(self, query: str) -> tuple[list[SearchResult] | SearchError, Stats]:
        st = Stats(queries=1)
        t0 = time.perf_counter()
        key = search_key(self.name, query, self.top_k, self.options)
        try:
            hit = self.cache.get("search", key) if self.cache is not None else None  # CacheMiss propagates
            if hit is not None:
                st.cache_hits = 1
                out = [SearchResult(**r) for r in hit["results"]]
            else:
                out = self._search_one(query, st)
                st.cost_usd = self.usd_per_query
                if self.cache is not None:
                    self.cache.put("search", key, {"query": query, "results": [asdict(r) for r in out]})
        except SearchError as e:
            st.failures[e.kind] = 1
            out = e
        st.latency_s = time.perf_counter() - t0
        with self._lock:
            self.stats.add(st)
        return out, st

    def search_detailed(self, queries: list[str]) -> SearchCall:
        """Run queries concurrently; errors come back as values. CacheMiss (replay) is raised: it is a set-up
        problem (wrong cache file or mode), not a web failure the policy should see."""
        if isinstance(queries, str):
            queries = [queries]
        pairs = list(self._pool.map(self._one, queries)) if len(queries) > 1 else [self._one(q) for q in queries]
        total = Stats()
        for _, st in pairs:
            total.add(st)
        return SearchCall([r for r, _ in pairs], total.snapshot())

    def search_or_error(self, queries: list[str]) -> list:
        return self.search_detailed(queries).results

    def search(self, queries: list[str]) -> list[list[SearchResult]]:
        """Results per query; raises the first SearchError (use search_or_error to get errors as values)."""
        out = self.search_or_error(queries)
        for r in out:
            if isinstance(r, SearchError):
                raise r
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:  # never shows secrets: only the name and the public options
        return f"{type(self).__name__}(top_k={self.top_k}, options={self.options})"


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _HTTPBackend(Backend):
    """Retries with full-jitter exponential backoff; honours Retry-After (capped); stops at once on 401/403."""

    def __init__(self, top_k=10, cache=None, *, timeout=10.0, max_tries=4, backoff_s=1.0, max_backoff_s=30.0,
                 n_threads=4, secret: str | None = None):
        super().__init__(top_k, cache, n_threads)
        self.timeout, self.max_tries = float(timeout), int(max_tries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self._secret = secret  # scrubbed from every message we build
        self._tls = threading.local()

    def _scrub(self, text: str) -> str:
        text = str(text)
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:300]

    def _session(self):
        import requests  # here, so `import browse` stays cheap for users of the local back end only
        s = getattr(self._tls, "session", None)
        if s is None:
            s = self._tls.session = requests.Session()  # one per thread: Session is not documented thread-safe
        return s

    def _request(self, method: str, url: str, st: Stats, **kw) -> dict:
        import requests
        last: SearchError | None = None
        for attempt in range(self.max_tries):
            st.api_calls += 1
            wait = None
            try:
                r = self._session().request(method, url, timeout=self.timeout, **kw)
            except requests.Timeout:
                last = SearchError("timeout", f"{self.name}: no answer within {self.timeout:g}s")
            except requests.RequestException as e:
                last = SearchError("network", f"{self.name}: {type(e).__name__}: {self._scrub(e)}")
            else:
                if r.status_code in (401, 403):
                    # retrying a bad key only burns quota and time: stop with a message that says what to check
                    raise SearchError("auth", f"{self.name}: HTTP {r.status_code} ({self._auth_hint()})")
                if r.status_code == 429 or r.status_code >= 500:
                    kind = "rate_limit" if r.status_code == 429 else "server"
                    last = SearchError(kind, f"{self.name}: HTTP {r.status_code} after {attempt + 1} tries")
                    wait = _retry_after_s(r.headers.get("Retry-After"))
                elif r.status_code != 200:
                    raise SearchError("http", f"{self.name}: HTTP {r.status_code}: {self._scrub(r.text)}")
                else:
                    try:
                        return r.json()
                    except ValueError:
                        # a proxy's HTML error page or a truncated body; retrying rarely helps, say what we got
                        raise SearchError("malformed", f"{self.name}: response is not JSON: {self._scrub(r.text)!r}")
            if attempt + 1 < self.max_tries:
                backoff = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))  # full jitter
                time.sleep(min(self.max_backoff_s, wait) if wait is not None else backoff)
        assert last is not None
        raise last

    def _auth_hint(self) -> str:
        return "check the URL and access rules"


class SerperBackend(_HTTPBackend):
    """Google results through https://serper.dev. Options: gl (country), hl (language), location."""
    name = "serper"
    usd_per_query = SERPER_USD_PER_QUERY

    def __init__(self, top_k=10, cache=None, *, api_key: str | None = None, gl: str = "us", hl: str = "en",
                 location: str | None = None, url: str = SERPER_URL, **kw):
        key = api_key or os.environ.get("SERPER_API_KEY", "")
        if not key and not (cache is not None and cache.mode == "replay"):  # replay needs no key: no request is made
            raise SearchError("config", "the serper back end needs an API key: export SERPER_API_KEY=<your key> "
                                        "(get one at https://serper.dev), or use --backend=local / --backend=searxng")
        super().__init__(top_k, cache, secret=key, **kw)
        self.url = url
        self.options = {k: v for k, v in (("gl", gl), ("hl", hl), ("location", location)) if v}

    def _auth_hint(self) -> str:
        return "the Serper API key in SERPER_API_KEY was rejected or has no credit"

    def _search_one(self, query, st):
        body = {"q": query, "num": self.top_k, **self.options}
        data = self._request("POST", self.url, st, json=body,
                             headers={"X-API-KEY": self._secret, "Content-Type": "application/json"})
        organic = data.get("organic") if isinstance(data, dict) else None
        if not isinstance(organic, list):
            raise SearchError("malformed", f"serper: no 'organic' list in the response (keys: {list(data)[:8]})"
                              if isinstance(data, dict) else "serper: response is not a JSON object")
        out = []
        for r in organic:
            if isinstance(r, dict) and r.get("link"):
                out.append(SearchResult(str(r.get("title", "")), str(r["link"]), str(r.get("snippet", "")),
                                        len(out) + 1))
        return out[: self.top_k]


class SearxngBackend(_HTTPBackend):
    """A SearXNG instance's JSON API (GET /search?q=..&format=json). Options: language, categories, engines."""
    name = "searxng"

    def __init__(self, top_k=10, cache=None, *, url: str | None = None, language: str = "en",
                 categories: str | None = None, engines: str | None = None, **kw):
        url = url or os.environ.get("SEARXNG_URL", "")
        if not url:
            raise SearchError("config", "the searxng back end needs the instance URL: --searxng_url=http://host:8080 "
                                        "or export SEARXNG_URL=...")
        super().__init__(top_k, cache, **kw)
        self.url = url.rstrip("/")
        self.options = {k: v for k, v in (("language", language), ("categories", categories),
                                          ("engines", engines)) if v}
        self.options["url"] = self.url  # different instances give different results

    def _auth_hint(self) -> str:
        return "the SearXNG instance refused the request; is format=json enabled in its settings.yml?"

    def _search_one(self, query, st):
        params = {"q": query, "format": "json", **{k: v for k, v in self.options.items() if k != "url"}}
        data = self._request("GET", self.url + "/search", st, params=params)
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise SearchError("malformed", "searxng: no 'results' list in the response")
        out = []
        for r in results:
            if isinstance(r, dict) and r.get("url"):
                out.append(SearchResult(str(r.get("title", "")), str(r["url"]), str(r.get("content", "")),
                                        len(out) + 1))
        return out[: self.top_k]


# ---------------------------------------------------------------------------------------------------------------------
# Local BM25 over a JSONL corpus (tantivy)

def corpus_hash(path: str | os.PathLike) -> str:
    """sha1 of the corpus bytes (+ index version), memoised by (path, size, mtime) so a 13 GB corpus is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    memo_file = cache_dir() / "bm25" / "hashes.json"
    tag = f"{path}|{st.st_size}|{st.st_mtime_ns}|{INDEX_VERSION}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if tag in memo:
        return memo[tag]
    h = hashlib.sha1(f"v{INDEX_VERSION}".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()[:16]
    memo[tag] = digest
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(f".hashes.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_file)
    return digest


def chunk_words(text: str, max_words: int = 100) -> list[str]:
    """~max_words-word passages (the Wikipedia-2018 DPR convention); a short tail joins the previous passage."""
    words = text.split()
    if len(words) <= max_words:
        return [" ".join(words)] if words else []
    parts = [words[i:i + max_words] for i in range(0, len(words), max_words)]
    if len(parts) > 1 and len(parts[-1]) < max_words // 4:
        tail = parts.pop()
        parts[-1] = parts[-1] + tail
    return [" ".join(p) for p in parts]


_QUERY_WORD = re.compile(r"\w+", re.UNICODE)
# Words left out of the proximity phrase only (they still count in BM25): question words and function words.
_STOPWORDS = frozenset("a an the of on in at to for by with from and or is are was were be been who what when where "
                       "which how did does do whose whom that this it its as into".split())


class BM25Index:
    """A tantivy index of passages (title and body stemmed, BM25), on disk and memory-mapped.

    Each passage stores its article id, title, text, passage number and the article's byte offset in the JSONL, so
    LocalWeb can serve the full article without holding the corpus in RAM. Built once per corpus hash into
    $DR_CACHE_DIR/bm25/<hash>/ under a file lock (other processes wait, then open it).
    """

    def __init__(self, corpus: str | os.PathLike, index_dir: str | os.PathLike | None = None, max_words: int = 100,
                 verbose: bool = False):
        import tantivy
        self._tantivy = tantivy
        self.corpus = str(Path(corpus).resolve())
        self.hash = corpus_hash(self.corpus)
        root = Path(index_dir) if index_dir else cache_dir() / "bm25"
        self.dir = root / f"{self.hash}-w{max_words}"
        self.max_words = max_words
        self.build_s = 0.0
        if not (self.dir / "DONE").exists():
            root.mkdir(parents=True, exist_ok=True)
            with open(root / f"{self.dir.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others block here, then find DONE
                if not (self.dir / "DONE").exists():
                    self._build(verbose)
        self.index = tantivy.Index.open(str(self.dir))
        self.searcher = self.index.searcher()
        self.n_passages = self.searcher.num_docs

    @staticmethod
    def _schema():
        import tantivy
        sb = tantivy.SchemaBuilder()
        sb.add_text_field("id", stored=True, tokenizer_name="raw")  # exact lookups by article id
        sb.add_text_field("title", stored=True, index_option="basic")
        # contents = title + passage, searched as one field (as pyserini/DPR index Wikipedia): a separate title field
        # gets its own BM25 with tiny length norms, and one word of a short title then outranks the passage that
        # answers the query ("Earth" above "Mount Everest" for "highest mountain on Earth"). Adding Wikipedia's
        # short descriptions made our probe queries worse (K2: "Second-highest mountain on Earth"), so they are not.
        sb.add_text_field("contents", stored=False, tokenizer_name="en_stem")
        sb.add_text_field("body", stored=True, index_option="basic")
        sb.add_integer_field("pno", stored=True)      # passage number within the article
        sb.add_integer_field("offset", stored=True)   # byte offset of the article's JSONL line
        return sb.build()

    def _build(self, verbose: bool) -> None:
        t0 = time.perf_counter()
        tmp = self.dir.with_name(self.dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        index = self._tantivy.Index(self._schema(), path=str(tmp))
        writer = index.writer(heap_size=512_000_000, num_threads=min(4, os.cpu_count() or 1))
        n = 0
        with open(self.corpus, "rb") as f:
            offset = 0
            for line in f:
                here, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                rec = json.loads(line)
                for pno, passage in enumerate(chunk_words(str(rec.get("text", "")), self.max_words)):
                    title = str(rec.get("title", ""))
                    writer.add_document(self._tantivy.Document(id=str(rec["id"]), title=title, body=passage,
                                                               contents=f"{title}\n{passage}", pno=pno, offset=here))
                    n += 1
                if verbose and n and n % 1_000_000 == 0:
                    print(f"indexed {n:,} passages", file=sys.stderr, flush=True)
        writer.commit()
        writer.wait_merging_threads()
        (tmp / "DONE").write_text(json.dumps({"corpus": self.corpus, "passages": n}))
        shutil.rmtree(self.dir, ignore_errors=True)
        os.replace(tmp, self.dir)  # readers only ever see a finished index
        self.build_s = time.perf_counter() - t0

    def query(self, text: str, k: int) -> list[dict]:
        """Top-k passages as dicts (id, title, body, pno, offset, score).

        BM25 over the query's words (OR), plus a proximity bonus: the query's content words as a phrase with slop 2.
        Plain BM25 puts Mount Everest ("the highest mountain on Earth above sea level") 7th for "highest mountain on
        Earth", behind articles that repeat "highest"; the bonus lifts passages that say the query's words together
        (rank 2, behind Karakoram's "second highest mountain on Earth") and changed no other probe we tried.
        """
        words = _QUERY_WORD.findall(text.lower())  # lowercase: AND/OR/NOT would otherwise be operators
        if not words:
            return []
        content = [w for w in words if w not in _STOPWORDS]
        qs = " ".join(words)
        if len(content) > 1:
            qs += ' "%s"~2' % " ".join(content)
        q = self.index.parse_query(qs, ["contents"])
        out = []
        for score, addr in self.searcher.search(q, k).hits:
            d = self.searcher.doc(addr)
            out.append({"id": d["id"][0], "title": d["title"][0], "body": d["body"][0], "pno": d["pno"][0],
                        "offset": d["offset"][0], "score": score})
        return out

    def lookup(self, doc_id: str) -> dict | None:
        """The full corpus record of an article id (read from the JSONL at its offset), or None."""
        q = self._tantivy.Query.term_query(self.index.schema, "id", doc_id)
        hits = self.searcher.search(q, 1).hits
        if not hits:
            return None
        offset = self.searcher.doc(hits[0][1])["offset"][0]
        with open(self.corpus, "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())


_INDEXES: dict = {}
_INDEXES_LOCK = threading.Lock()


def open_index(corpus: str | os.PathLike, **kw) -> BM25Index:
    """One BM25Index per (corpus, options) per process: the back end and LocalWeb share it."""
    key = (str(Path(corpus).resolve()), tuple(sorted(kw.items())))
    with _INDEXES_LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = BM25Index(corpus, **kw)
        return _INDEXES[key]


def _snippet(text: str, n_chars: int = 300) -> str:
    if len(text) <= n_chars:
        return text
    return text[:n_chars].rsplit(" ", 1)[0] + " ..."


class LocalBackend(Backend):
    """BM25 over a JSONL corpus; results point at LocalWeb pages (one hit per article, its best passage)."""
    name = "local"

    def __init__(self, top_k=10, cache=None, *, corpus: str | None = None, index_dir: str | None = None,
                 max_words: int = 100, serve: bool = True, port: int | None = None, snippet_chars: int = 300,
                 n_threads: int = 4):
        super().__init__(top_k, cache, n_threads)
        if corpus is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
            from wiki_corpus import default_corpus_path
            corpus = default_corpus_path()
        self.index = open_index(corpus, index_dir=index_dir, max_words=max_words)
        self.web = LocalWeb(corpus, port=port, index=self.index) if serve else None
        self.base_url = self.web.base_url if self.web else f"http://127.0.0.1:{default_port(self.index.hash)}"
        self.snippet_chars = snippet_chars
        # the corpus hash keys the cache: another corpus gives other results under the same query
        self.options = {"corpus": self.index.hash}

    def close(self) -> None:
        super().close()
        if self.web is not None:
            self.web.close()

    def url_for(self, doc_id: str) -> str:
        return f"{self.base_url}/wiki/{quote(doc_id, safe='')}"

    def _search_one(self, query, st):
        st.api_calls += 1
        seen, out = set(), []
        # a few passages per article can rank high; over-fetch, keep each article's best passage
        for p in self.index.query(query, self.top_k * 3):
            if p["id"] in seen:
                continue
            seen.add(p["id"])
            out.append(SearchResult(p["title"], self.url_for(p["id"]), _snippet(p["body"], self.snippet_chars),
                                    len(out) + 1))
            if len(out) == self.top_k:
                break
        return out


# ---------------------------------------------------------------------------------------------------------------------
# LocalWeb: the corpus as HTML pages on 127.0.0.1

def default_port(corpus_hash_hex: str) -> int:
    """A port fixed by the corpus (30000-44999, below Linux's ephemeral range), so URLs are the same across ranks,
    runs and machines, and a recorded cache replays elsewhere. $DR_LOCALWEB_PORT overrides."""
    env = os.environ.get("DR_LOCALWEB_PORT")
    return int(env) if env else 30000 + int(corpus_hash_hex[:8], 16) % 15000


def _page_html(rec: dict) -> str:
    title = html.escape(str(rec.get("title", rec.get("id", ""))))
    paras = [p.strip() for p in str(rec.get("text", "")).split("\n") if p.strip()]
    desc = f'<p class="description"><i>{html.escape(rec["description"])}</i></p>\n' if rec.get("description") else ""
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paras)
    src = (f'<p class="source">Source: <a href="{html.escape(rec["url"])}">{html.escape(rec["url"])}</a> '
           "(CC BY-SA 4.0)</p>") if rec.get("url") else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\n"
            f"<body><article><h1>{title}</h1>\n{desc}{body}\n</article>\n<footer>{src}</footer></body></html>\n")


class _Handler(BaseHTTPRequestHandler):
    server_version = "LocalWeb/1"

    def log_message(self, *args):  # quiet: thousands of fetches per training step
        pass

    def _send(self, code: int, body: str, ctype: str = "text/html; charset=utf-8") -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        web: LocalWeb = self.server.web  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        if parts.path == "/__localweb__":
            return self._send(200, json.dumps({"corpus_hash": web.index.hash}), "application/json")
        if parts.path.startswith("/wiki/"):
            rec = web.index.lookup(unquote(parts.path[len("/wiki/"):]))
            if rec is None:
                return self._send(404, "<html><body><h1>Not found</h1></body></html>")
            return self._send(200, _page_html(rec))
        if parts.path == "/search":  # a human-friendly view for poking at the embedded web in a browser
            q = parse_qs(parts.query).get("q", [""])[0]
            items = "".join(f'<li><a href="/wiki/{quote(p["id"], safe="")}">{html.escape(p["title"])}</a></li>'
                            for p in web.index.query(q, 10))
            return self._send(200, f"<html><body><h1>{html.escape(q)}</h1><ol>{items}</ol></body></html>")
        if parts.path == "/":
            return self._send(200, "<html><body><form action=/search><input name=q></form></body></html>")
        return self._send(404, "<html><body><h1>Not found</h1></body></html>")


class _ReusePortServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self):
        # SO_REUSEPORT: every torchrun rank binds the same port and the kernel spreads connections over them, so a
        # rank exiting early never breaks another rank's URLs.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _probe(port: int) -> str | None:
    """The corpus hash of a LocalWeb on this port, "" for something else listening, None for nothing."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/__localweb__", timeout=2) as r:
            return json.loads(r.read()).get("corpus_hash", "")
    except (OSError, ValueError):
        # connection refused -> free; an HTTP error or garbage -> someone else's server
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return ""
        except OSError:
            return None


class LocalWeb:
    """Serves a JSONL corpus as HTML at `base_url`/wiki/<id> from a daemon thread (see the module docstring)."""

    def __init__(self, corpus: str | os.PathLike, port: int | None = None, index: BM25Index | None = None):
        self.index = index or open_index(corpus)
        want = default_port(self.index.hash) if port is None else int(port)
        owner = _probe(want) if want else None
        if owner not in (None, self.index.hash):  # another program, or a LocalWeb of another corpus: do not share
            want = 0
        try:
            self.server = _ReusePortServer(("127.0.0.1", want), _Handler)
        except OSError:
            self.server = _ReusePortServer(("127.0.0.1", 0), _Handler)  # taken without SO_REUSEPORT: any free port
        self.server.web = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self.server.serve_forever, name="localweb", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (idempotent). Other processes' servers on the same port keep answering."""
        if not self._closed:
            self._closed = True
            self.server.shutdown()
            self.server.server_close()


# ---------------------------------------------------------------------------------------------------------------------
# Fetching pages: `fetch` (one URL, never raises) and `Fetcher` (thread pool, per-host limit, cache, stats)

USER_AGENT = "Mozilla/5.0 (compatible; deepresearch-agent/0.1; +https://github.com/)"
MAX_BYTES = 5_000_000  # a page is cut here (after decompression); the readers never need more
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


_thread = threading.local()


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


@dataclass
class FetchStats:
    pages: int = 0
    ok: int = 0
    cache_hits: int = 0
    bytes: int = 0
    latency_s: float = 0.0
    failures: dict = field(default_factory=dict)  # kind -> count

    def snapshot(self) -> dict:
        return {**asdict(self), "failures": dict(self.failures)}


def page_key(url: str) -> str:
    """Cache key of a page: the URL without its #fragment."""
    return url.split("#", 1)[0].strip()


class Fetcher:
    """fetch() behind a thread pool: `fetch_many(urls)` returns results in input order; at most `per_host`
    requests to one host at a time; pages go through the record/replay Cache (kind "page"); `.stats` counts
    pages, bytes, latency, cache hits and failures by kind. Thread-safe; one per Browser."""

    def __init__(self, *, cache: Cache | None = None, n_threads: int = 32, per_host: int = 8, **fetch_kw):
        self.cache, self.per_host, self.fetch_kw = cache, per_host, fetch_kw
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="fetch")

    def _host_slot(self, url: str) -> threading.BoundedSemaphore:
        try:
            host = (urlsplit(url).netloc or "").lower()
        except ValueError:
            host = ""
        with self._lock:
            return self._hosts.setdefault(host, threading.BoundedSemaphore(self.per_host))

    def fetch(self, url: str) -> FetchResult:
        t0 = time.monotonic()
        key = page_key(str(url))
        res = None
        if self.cache is not None:
            try:
                hit = self.cache.get("page", key)
                if hit is not None:
                    res = FetchResult(**{**hit, "cached": True})
            except CacheMiss:
                res = _fail(key, "cache_miss", "page not in the replay cache (record it first, or use "
                                               "cache_mode=replay_or_live)")
        if res is None:
            with self._host_slot(key):
                res = fetch(key, **self.fetch_kw)
            # keep what another run would see again: pages and permanent failures, not timeouts or outages
            if self.cache is not None and (res.ok or res.kind in ("http", "unsupported", "empty")) \
                    and not (res.status or 0) >= 500 and res.status != 429:
                self.cache.put("page", key, asdict(res))
        res.elapsed_s = time.monotonic() - t0
        with self._lock:
            st = self.stats
            st.pages += 1
            st.ok += res.ok
            st.cache_hits += res.cached
            st.bytes += res.n_bytes
            st.latency_s += res.elapsed_s
            if not res.ok:
                st.failures[res.kind] = st.failures.get(res.kind, 0) + 1
        return res

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        if len(urls) <= 1:
            return [self.fetch(u) for u in urls]
        return list(self._pool.map(self.fetch, urls))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def fetch_many(urls: list[str], *, n_threads: int = 32, per_host: int = 8, cache: Cache | None = None,
               **fetch_kw) -> list[FetchResult]:
    """Many URLs at once, results in input order (a one-off Fetcher; a Browser keeps one for its lifetime)."""
    f = Fetcher(cache=cache, n_threads=n_threads, per_host=per_host, **fetch_kw)
    try:
        return f.fetch_many(list(urls))
    finally:
        f.close()


# ---------------------------------------------------------------------------------------------------------------------
# Reading: a page is split into chunks; a reader goes chunk by chunk and returns only new, relevant information

@dataclass
class PageState:
    """One trajectory's reading of one page: where reading stopped, what was already returned, and the reader's
    short memory per search (the queries that led here)."""
    url: str
    title: str
    chunks: list[str]
    pos: int = 0                                  # the chunk reading resumes at
    returned: set = field(default_factory=set)    # passages already shown (extract reader)
    memory: dict = field(default_factory=dict)    # queries -> summary so far (llm reader)


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Split at paragraph boundaries into pieces of at most ~chunk_chars (a longer paragraph is cut)."""
    chunks, cur = [], ""
    for para in text.split("\n"):
        while len(para) > chunk_chars:
            chunks.append(para[:chunk_chars])
            para = para[chunk_chars:]
        if cur and len(cur) + 1 + len(para) > chunk_chars:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n{para}" if cur else para
    return chunks + ([cur] if cur else [])


_WORD = re.compile(r"\w+")
_STOP = frozenset("a an and are as at be by for from has have he her his how in is it its of on or she that the "
                  "their there this to was were what when where which who whom whose why with".split())


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def passages(chunk: str, max_chars: int = 600) -> list[str]:
    """Paragraphs, long ones cut at sentence ends into pieces of about max_chars."""
    out = []
    for para in chunk.split("\n"):
        para = para.strip()
        while len(para) > max_chars:
            cut = para.rfind(". ", 0, max_chars)
            cut = cut + 1 if cut > max_chars // 3 else max_chars
            out.append(para[:cut].strip())
            para = para[cut:].strip()
        if para:
            out.append(para)
    return out


def bm25_scores(query_terms: list[str], docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> list[float]:
    import math
    n = len(docs)
    if not n or not query_terms:
        return [0.0] * n
    avg = sum(map(len, docs)) / n or 1.0
    df = {t: sum(t in set(d) for d in docs) for t in set(query_terms)}
    out = []
    for d in docs:
        tf = {}
        for w in d:
            tf[w] = tf.get(w, 0) + 1
        s = 0.0
        for t in set(query_terms):
            if t in tf:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return out


class ExtractReader:
    """No model: BM25-rank the chunk's passages against the question and the search queries, return the best new
    ones (in page order) up to `page_chars`; when a chunk has nothing new and relevant, read on to the next one,
    at most `max_chunks` chunks per call. Deterministic and free. On a first visit where nothing matches, the
    page's opening passage is returned (it usually says what the page is about)."""
    name = "extract"

    def __init__(self, cfg: "BrowseConfig"):
        self.cfg = cfg

    def read(self, page: PageState, question: str, queries: list[str]) -> str:
        q = _terms(" ".join([question, *queries]))
        first_visit = not page.returned
        for _ in range(self.cfg.max_chunks):
            if page.pos >= len(page.chunks):
                break
            ps = passages(page.chunks[page.pos])
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


class ReaderError(RuntimeError):
    pass


def chat_completion(base_url: str, model: str, messages: list[dict], *, api_key: str | None = None,
                    timeout: float = 60.0, max_tries: int = 3, max_tokens: int = 1024) -> str:
    """One temperature-0 call to an OpenAI-compatible /chat/completions endpoint; the reply's text. Retries
    connection errors, 429 and 5xx (bounded, jittered); raises ReaderError with a reason that never holds the key."""
    import requests
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    why = ""
    for attempt in range(max_tries):
        if attempt:
            time.sleep(min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.5))
        try:
            r = requests.post(base_url.rstrip("/") + "/chat/completions", json=body, headers=headers, timeout=timeout)
        except requests.exceptions.RequestException as e:
            why = f"reader endpoint {base_url} unreachable ({type(e).__name__}); is the server up?"
            continue
        if r.status_code in (401, 403):
            raise ReaderError(f"reader endpoint refused the key (HTTP {r.status_code}): check the API key variable")
        if r.status_code == 429 or r.status_code >= 500:
            why = f"reader endpoint answered HTTP {r.status_code}"
            continue
        if r.status_code >= 400:  # the body may echo the request's headers: never show the key
            text = r.text.replace(api_key, "<key>") if api_key else r.text
            raise ReaderError(f"reader endpoint answered HTTP {r.status_code}: {text[:200]}")
        try:
            return r.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise ReaderError("reader endpoint sent a reply that is not a chat completion") from None
    raise ReaderError(why + f" after {max_tries} tries")


def parse_reader_reply(text: str) -> dict | None:
    """{"extracted_info": str, "read_more": bool, "summary": str} from a model's reply, or None."""
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return None
    try:
        d = json.loads(m.group(0))
    except ValueError:
        return None
    if not isinstance(d, dict) or "extracted_info" not in d:
        return None
    more = d.get("read_more", False)
    more = more.strip().lower() in ("yes", "true", "1") if isinstance(more, str) else bool(more)
    return {"extracted_info": str(d.get("extracted_info") or "").strip(), "read_more": more,
            "summary": str(d.get("summary") or "").strip()}


class LLMReader:
    """A reading model behind any OpenAI-compatible endpoint (a local vLLM/SGLang server or a hosted model): per
    chunk it returns extracted info, whether to read on, and a running summary (kept per page per search). Replies
    are cached (Cache kind "read", keyed by model and prompt), so a replayed run reads the same way."""
    name = "llm"

    def __init__(self, cfg: "BrowseConfig", cache: Cache | None = None):
        if not cfg.llm_base_url or not cfg.llm_model:
            raise ValueError("reader=llm needs llm_base_url and llm_model (an OpenAI-compatible endpoint, e.g. "
                             "--llm_base_url=http://localhost:8000/v1 --llm_model=Qwen/Qwen2.5-7B-Instruct); "
                             "or use reader=extract, which needs no model")
        self.cfg, self.cache = cfg, cache
        self.api_key = os.environ.get(cfg.llm_api_key_env) if cfg.llm_api_key_env else None
        self.calls = self.failures = 0

    def _ask(self, prompt: str) -> dict:
        key = hashlib.sha256(json.dumps([self.cfg.llm_model, prompt]).encode()).hexdigest()
        if self.cache is not None:
            try:
                hit = self.cache.get("read", key)
            except CacheMiss:
                raise ReaderError("reading not in the replay cache") from None
            if hit is not None:
                return hit
        self.calls += 1
        text = chat_completion(self.cfg.llm_base_url, self.cfg.llm_model, [{"role": "user", "content": prompt}],
                               api_key=self.api_key, timeout=self.cfg.llm_timeout)
        reply = parse_reader_reply(text)
        if reply is None:
            raise ReaderError("the reading model's reply was not the JSON asked for")
        if self.cache is not None:
            self.cache.put("read", key, reply)
        return reply

    def read(self, page: PageState, question: str, queries: list[str]) -> str:
        mem_key = " | ".join(queries)
        memory = page.memory.get(mem_key, "")
        infos = []
        for _ in range(self.cfg.max_chunks):  # bounded: the reference could loop on a page forever
            if page.pos >= len(page.chunks):
                break
            prompt = READER_PROMPT.format(question=question, queries="; ".join(queries) or "(none)",
                                          memory=memory or "(nothing yet)", part=page.pos + 1,
                                          parts=len(page.chunks), url=page.url, chunk=page.chunks[page.pos])
            try:
                reply = self._ask(prompt)
            except ReaderError:
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


def make_reader(cfg: "BrowseConfig", cache: Cache | None = None):
    """extract | llm. The seam for a `policy` reader (the trained model reading through our engine): any object
    with `read(page: PageState, question, queries) -> str`, passed as Browser(cfg, reader=...)."""
    if cfg.reader == "extract":
        return ExtractReader(cfg)
    if cfg.reader == "llm":
        return LLMReader(cfg, cache)
    raise ValueError(f"unknown reader {cfg.reader!r}: use extract or llm (or pass a reader object to Browser)")


# ---------------------------------------------------------------------------------------------------------------------
# Observations: what the policy sees after web_search and browse_webpage

def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:max(n - 4, 0)].rstrip() + " ..."


def render_search(queries: list[str], results: list, snippet_chars: int = 300, budget: int = 4000) -> str:
    """One block per query: rank, title, URL, snippet; failures as one line. Each query gets an equal share."""
    share = budget // max(len(queries), 1)
    blocks = []
    for q, res in zip(queries, results):
        if isinstance(res, Exception):
            blocks.append(f'Search "{q}" failed: {res}.')
        elif not res:
            blocks.append(f'Search "{q}": no results.')
        else:
            lines = [f'Search "{q}":'] + [f"{r.rank}. {r.title}\n{r.url}\n{_cut(r.snippet, snippet_chars)}"
                                           for r in res]
            blocks.append(_cut("\n".join(lines), share))
    return "\n\n".join(blocks)


def render_browse(items: list[tuple[str, str | None, str | None]], budget: int = 4000) -> str:
    """items: (url, information or None, error or None) per URL -> one block per page."""
    share = budget // max(len(items), 1)
    blocks = []
    for url, info, err in items:
        if err:
            blocks.append(f"Page {url}: {err}.")
        elif not info:
            blocks.append(f"Page {url}: nothing new on this page about the question.")
        else:
            blocks.append(_cut(f"Page {url}:\n{info}", share))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------------------------------
# Browser (shared, thread-safe) and Session (one per trajectory): the two tools the policy calls

@dataclass
class BrowseConfig:
    backend: str = "local"              # local | serper | searxng
    top_k: int = 10                     # results per query (the reference: 10)
    corpus: str | None = None           # local back end's JSONL corpus (None = the embedded Wikipedia summaries)
    searxng_url: str | None = None
    cache: str | None = None            # SQLite record/replay file for searches, pages and readings
    cache_mode: str = "replay_or_live"
    max_age_s: float | None = None
    reader: str = "extract"             # extract | llm
    max_queries: int = 3                # queries per web_search call (the reference: 3)
    max_urls: int = 3                   # URLs per browse_webpage call
    chunk_chars: int = 40_000           # page chunk a reader takes at once (the reference: ~40k characters)
    max_chunks: int = 4                 # chunks read per page per call (bounds the reading loop)
    page_chars: int = 1500              # information returned per page per call
    snippet_chars: int = 300
    obs_chars: int = 4000               # the whole observation
    llm_base_url: str | None = None     # reader=llm: OpenAI-compatible endpoint
    llm_model: str | None = None
    llm_api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never logged; empty for local servers
    llm_timeout: float = 60.0
    n_threads: int = 32                 # fetch pool
    per_host: int = 8                   # concurrent requests to one host
    timeout: float = 10.0               # per page, retries included
    max_bytes: int = MAX_BYTES
    allow_private: bool = False         # fetch private/loopback addresses (the embedded web is always allowed)
    allow_hosts: tuple = ()             # extra host or host:port entries admitted past the private-address guard


class Session:
    """One trajectory's tools. `web_search(queries)` and `browse_webpage(urls)` return the observation text and
    never raise. Only URLs from the most recent search are readable (the reference rule); re-browsing a page
    resumes where its reading stopped."""

    def __init__(self, browser: "Browser", question: str):
        self.browser, self.question = browser, question
        self.queries: list[str] = []
        self.urls: dict[str, SearchResult] = {}  # url -> result, from the most recent search
        self.pages: dict[str, PageState] = {}

    @staticmethod
    def _clean(items, limit: int) -> tuple[list[str], int]:
        if isinstance(items, str):
            items = [items]
        out = []
        for x in items if isinstance(items, (list, tuple)) else []:
            x = " ".join(str(x).split())
            if x and x not in out:
                out.append(x)
        return out[:limit], max(len(out) - limit, 0)

    def web_search(self, queries) -> str:
        cfg = self.browser.cfg
        queries, dropped = self._clean(queries, cfg.max_queries)
        if not queries:
            return "web_search needs at least one non-empty query."
        try:
            results = self.browser.backend.search_or_error(queries)
        except CacheMiss as e:
            self.browser._count("search_cache_miss")
            results = [SearchError("cache_miss", f"not in the replay cache ({e.kind})")] * len(queries)
        self.queries = queries
        self.urls = {r.url: r for res in results if not isinstance(res, Exception) for r in res}
        obs = render_search(queries, results, cfg.snippet_chars, cfg.obs_chars)
        if dropped:
            obs += f"\n\n(only the first {cfg.max_queries} queries were run)"
        return obs

    def browse_webpage(self, urls) -> str:
        cfg = self.browser.cfg
        urls, dropped = self._clean(urls, cfg.max_urls)
        if not urls:
            return "browse_webpage needs at least one URL from your most recent web_search."
        if not self.urls:
            return "Search first: browse_webpage reads URLs from your most recent web_search results."
        readable = [u for u in urls if u in self.urls]
        fetched = dict(zip(readable, self.browser.fetcher.fetch_many(readable)))
        items = []
        for u in urls:
            if u not in fetched:
                items.append((u, None, "not in your most recent search results; browse one of their URLs"))
                continue
            res = fetched[u]
            if not res.ok:
                items.append((u, None, f"could not be fetched: {res.error}"))
                continue
            page = self.pages.get(u)
            if page is None:
                page = self.pages[u] = PageState(u, res.title, chunk_text(res.text, cfg.chunk_chars))
            try:
                items.append((u, self.browser.reader.read(page, self.question, self.queries), None))
            except ReaderError as e:
                self.browser._count("reader_errors")
                items.append((u, None, f"fetched, but the reading model failed: {e}"))
        obs = render_browse(items, cfg.obs_chars)
        if dropped:
            obs += f"\n\n(only the first {cfg.max_urls} URLs were read)"
        return obs


class Browser:
    """The web of a run, shared by every trajectory of a process (thread-safe): a search back end, a page fetcher
    with its pool, a reader, and one record/replay Cache under all three. `session(question)` per trajectory."""

    def __init__(self, cfg: BrowseConfig | None = None, *, reader=None, backend=None):
        self.cfg = cfg = cfg or BrowseConfig()
        self.cache = Cache(cfg.cache, cfg.cache_mode, cfg.max_age_s) if cfg.cache else None
        if backend is None:
            opts = {"url": cfg.searxng_url} if cfg.backend == "searxng" and cfg.searxng_url else {}
            backend = make_backend(cfg.backend, top_k=cfg.top_k, corpus=cfg.corpus, cache=self.cache, **opts)
        self.backend = backend
        allow = tuple(cfg.allow_hosts)
        if getattr(backend, "base_url", None):  # the embedded web on 127.0.0.1 is the one private host allowed
            allow += (urlsplit(backend.base_url).netloc,)
        self.fetcher = Fetcher(cache=self.cache, n_threads=cfg.n_threads, per_host=cfg.per_host, timeout=cfg.timeout,
                               max_bytes=cfg.max_bytes, allow_private=cfg.allow_private, allow_hosts=allow)
        self.reader = reader if reader is not None else make_reader(cfg, self.cache)
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def session(self, question: str) -> Session:
        return Session(self, question)

    @property
    def stats(self) -> dict:
        out = {"search": self.backend.stats.snapshot(), "fetch": self.fetcher.stats.snapshot(), **self.counts}
        if isinstance(self.reader, LLMReader):
            out["reader"] = {"calls": self.reader.calls, "failures": self.reader.failures}
        return out

    def close(self) -> None:
        self.fetcher.close()
        self.backend.close()
        if self.cache is not None:
            self.cache.close()


# ---------------------------------------------------------------------------------------------------------------------
# Factory and CLI

def make_backend(name: str, *, top_k: int = 10, corpus: str | None = None, cache: Cache | None = None, **opts):
    """serper | searxng | local -> a back end object (see the module docstring). opts go to the back end."""
    if name == "serper":
        return SerperBackend(top_k, cache, **opts)
    if name == "searxng":
        return SearxngBackend(top_k, cache, **opts)
    if name == "local":
        return LocalBackend(top_k, cache, corpus=corpus, **opts)
    raise ValueError(f"unknown search back end {name!r}: use serper, searxng or local")


def _parse_flags(argv: list[str]) -> tuple[list[str], dict]:
    pos, flags = [], {}
    for a in argv:
        if a.startswith("--"):
            k, sep, v = a[2:].partition("=")
            if not sep:
                sys.exit(f"flags are --key=value, got {a!r}")
            flags[k] = v
        else:
            pos.append(a)
    return pos, flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: python browse.py search QUERY... [--backend=local|serper|searxng] [--top_k=10] [--cache=FILE] "
             "[--cache_mode=live|record|replay|replay_or_live] [--corpus=FILE] [--searxng_url=URL]\n"
             "       python browse.py serve [--corpus=FILE] [--port=N]\n"
             "       python browse.py fetch URL... [--allow_private=1] [--timeout=10]")
    if argv and argv[0] == "fetch":
        pos, flags = _parse_flags(argv[1:])
        for url in pos:
            r = fetch(url, allow_private=flags.get("allow_private", "0") not in ("0", "false", ""),
                      timeout=float(flags.get("timeout", 10)))
            print(json.dumps(asdict(r), indent=2, ensure_ascii=False))
        return 0 if pos else 2
    if not argv or argv[0] not in ("search", "serve"):
        print(usage, file=sys.stderr)
        return 2
    pos, flags = _parse_flags(argv[1:])
    known = {"backend", "top_k", "cache", "cache_mode", "corpus", "searxng_url", "port", "max_age_s"}
    if set(flags) - known:
        print(f"unknown flags {sorted(set(flags) - known)}\n{usage}", file=sys.stderr)
        return 2
    if argv[0] == "serve":
        if flags.get("corpus") is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
            from wiki_corpus import default_corpus_path
            flags["corpus"] = default_corpus_path()
        web = LocalWeb(flags["corpus"], port=int(flags["port"]) if "port" in flags else None)
        print(f"serving {flags['corpus']} at {web.base_url}/  (Ctrl-C to stop)", flush=True)
        try:
            web._thread.join()
        except KeyboardInterrupt:
            web.close()
        return 0
    if not pos:
        print(usage, file=sys.stderr)
        return 2
    mode = flags.get("cache_mode", "replay_or_live" if flags.get("cache") else "live")
    try:
        cache = Cache(flags.get("cache"), mode, float(flags["max_age_s"]) if "max_age_s" in flags else None)
        opts = {"url": flags["searxng_url"]} if "searxng_url" in flags else {}
        if "port" in flags:
            opts["port"] = int(flags["port"])
        backend = make_backend(flags.get("backend", "local"), top_k=int(flags.get("top_k", 10)),
                               corpus=flags.get("corpus"), cache=cache, **opts)
        call = backend.search_detailed(pos)
    except CacheMiss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (SearchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"results": {}, "errors": {}, "stats": call.stats}
    for q, r in zip(pos, call.results):
        if isinstance(r, SearchError):
            out["errors"][q] = str(r)
        else:
            out["results"][q] = [asdict(x) for x in r]
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
