"""The embedded offline web: a BM25 index over a JSONL corpus and a 127.0.0.1 server that serves its pages as HTML.

What it does
- `BM25Index(corpus)`: tantivy (Rust, on disk, memory-mapped; chosen by measurement over bm25s and SQLite FTS5, see
  bench/RESULTS.md) over ~100-word passages of `title + text`, built once per corpus hash in $DR_CACHE_DIR/bm25/ under
  a file lock and shared by processes. `query(text, k)` -> passages, `lookup(id)` -> the full corpus record.
  `open_index(corpus)` keeps one per corpus per process.
- `LocalWeb(corpus)`: serves each record as an HTML page at `<base_url>/wiki/<id>` from a daemon thread, on any free
  port (or `port=`). Search results never carry that port: they use the canonical `http://localweb/wiki/<id>`
  (`page_url`), which browse.py's fetcher maps to whichever port this process's server got. So a recorded cache
  replays on another run, rank or machine, and two processes never fight over one port.
- The corpus itself (records `id, title, url, text`) comes from data/wiki_corpus.py unless you pass another file.

What it does not do
- No search API of its own (browse.py's `local` back end turns passages into SearchResults), no dense retrieval,
  nothing outside 127.0.0.1.

How to run
    python -m data.localweb [--corpus=FILE] [--port=N]     # serve the embedded web; browse it at the printed URL
"""

from __future__ import annotations

import fcntl
import hashlib
import html
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from data.config import parse_config
from data.wiki_corpus import cache_dir, default_corpus_path

INDEX_VERSION = 2  # bump when the index schema or chunking changes: old indexes are then rebuilt, not misread
HOST = "localweb"  # the canonical host of every local page URL; never resolved, the fetcher maps it to a real port


def page_url(doc_id: str) -> str:
    """The canonical, port-free URL of an article: what search results, caches and the policy see."""
    return f"http://{HOST}/wiki/{quote(doc_id, safe='')}"


# ---------------------------------------------------------------------------------------------------------------------
# The index

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
    memo[tag] = digest = h.hexdigest()[:16]
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(f".hashes.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_file)  # concurrent writers: the last one wins, and every version is a whole file
    return digest


def chunk_words(text: str, max_words: int = 100) -> list[str]:
    """~max_words-word passages (the Wikipedia-2018 DPR convention); a short tail joins the previous passage."""
    words = text.split()
    parts = [words[i:i + max_words] for i in range(0, len(words), max_words)]
    if len(parts) > 1 and len(parts[-1]) < max_words // 4:
        tail = parts.pop()
        parts[-1] = parts[-1] + tail
    return [" ".join(p) for p in parts]


_WORD = re.compile(r"\w+", re.UNICODE)
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
        self.dir = root / f"{self.hash}-w{max_words}-t1"  # t1: built by one thread (see _build)
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
        # one indexing thread: passages keep the corpus order in one segment. With several threads each took a share
        # of the passages, in an order that changed from build to build, and equal BM25 scores (the queries "Uruguay"
        # and "Uruguay River" score the same on both articles) came back in that order: two machines saw different
        # search results, so neither the data build nor a training run replayed. 10k articles index in under 1 s.
        writer = index.writer(heap_size=512_000_000, num_threads=1)
        n = offset = 0
        with open(self.corpus, "rb") as f:
            for line in f:
                here, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                rec = json.loads(line)
                title = str(rec.get("title", ""))
                for pno, passage in enumerate(chunk_words(str(rec.get("text", "")), self.max_words)):
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
        words = _WORD.findall(text.lower())  # lowercase: AND/OR/NOT would otherwise be operators
        if not words:
            return []
        content = [w for w in words if w not in _STOPWORDS]
        qs = " ".join(words)
        if len(content) > 1:
            qs += ' "%s"~2' % " ".join(content)
        out = []
        for score, addr in self.searcher.search(self.index.parse_query(qs, ["contents"]), k).hits:
            d = self.searcher.doc(addr)
            out.append({"id": d["id"][0], "title": d["title"][0], "body": d["body"][0], "pno": d["pno"][0],
                        "offset": d["offset"][0], "score": score})
        # equal scores in corpus order, also where a large corpus filled several segments (there, which of the hits
        # tied at the k-th place make the cut can still follow the segments)
        out.sort(key=lambda hit: (-hit["score"], hit["offset"], hit["pno"]))
        return out

    def lookup(self, doc_id: str) -> dict | None:
        """The full corpus record of an article id (read from the JSONL at its offset), or None."""
        q = self._tantivy.Query.term_query(self.index.schema, "id", doc_id)
        hits = self.searcher.search(q, 1).hits
        if not hits:
            return None
        with open(self.corpus, "rb") as f:
            f.seek(self.searcher.doc(hits[0][1])["offset"][0])
            return json.loads(f.readline())


_INDEXES: dict = {}
_INDEXES_LOCK = threading.Lock()


def open_index(corpus: str | os.PathLike | None = None, **kw) -> BM25Index:
    """One BM25Index per (corpus, options) per process (None = the embedded corpus): the back end and LocalWeb share
    it."""
    corpus = corpus or default_corpus_path()
    key = (str(Path(corpus).resolve()), tuple(sorted(kw.items())))
    with _INDEXES_LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = BM25Index(corpus, **kw)
        return _INDEXES[key]


# ---------------------------------------------------------------------------------------------------------------------
# The page server

def page_html(rec: dict) -> str:
    """A corpus record as a small HTML article: title, description, paragraphs, a link back to its source."""
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

    def _send(self, code: int, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        index: BM25Index = self.server.index  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        rec = index.lookup(unquote(parts.path[len("/wiki/"):])) if parts.path.startswith("/wiki/") else None
        if rec is not None:
            return self._send(200, page_html(rec))
        if parts.path == "/search":  # a human-friendly view for poking at the embedded web in a browser
            q = parse_qs(parts.query).get("q", [""])[0]
            items = "".join(f'<li><a href="/wiki/{quote(p["id"], safe="")}">{html.escape(p["title"])}</a></li>'
                            for p in index.query(q, 10))
            return self._send(200, f"<html><body><h1>{html.escape(q)}</h1><ol>{items}</ol></body></html>")
        if parts.path == "/":
            return self._send(200, "<html><body><form action=/search><input name=q></form></body></html>")
        return self._send(404, "<html><body><h1>Not found</h1></body></html>")


class LocalWeb:
    """Serves a corpus as HTML at `base_url`/wiki/<id> from a daemon thread. Each process runs its own server on a
    free port: nothing is shared between processes, so nothing needs probing and no URL depends on the port."""

    def __init__(self, corpus: str | os.PathLike | None = None, port: int = 0, index: BM25Index | None = None):
        self.index = index or open_index(corpus)
        self.server = ThreadingHTTPServer(("127.0.0.1", int(port)), _Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 128
        self.server.index = self.index  # type: ignore[attr-defined]
        self.netloc = f"127.0.0.1:{self.server.server_address[1]}"
        self.base_url = f"http://{self.netloc}"
        self._closed = False
        self._thread = threading.Thread(target=self.server.serve_forever, name="localweb", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if not self._closed:
            self._closed = True
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Args:
    corpus: str = ""    # JSONL corpus ("" = the embedded Wikipedia summaries)
    port: int = 0       # 0 = any free port


def main(argv: list[str]) -> int:
    a = parse_config(Args, argv)
    web = LocalWeb(a.corpus or None, port=a.port)
    print(f"serving {web.index.corpus} at {web.base_url}/  (Ctrl-C to stop)", flush=True)
    try:
        web._thread.join()
    except KeyboardInterrupt:
        web.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
