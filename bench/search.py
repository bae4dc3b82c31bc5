"""Benchmark of the search side of browse.py: local BM25 (tantivy, data/localweb.py) build time, memory and query
latency, and the record/replay cache's lookup rate. Prints one line per figure; ratios against baselines measured in
the same run.

What it measures
1. The embedded corpus (~10k Wikipedia summaries): index build time (fresh index dir), RSS, p50/p99 per query over
   question-like queries (through LocalBackend.search, i.e. with dedup and snippets; no cache).
2. A synthetic corpus of --n_passages passages (default 1M; ~60 words each, words drawn with the embedded corpus's
   word frequencies, so posting lists are as skewed as real text): JSONL write, index build, index size on disk, RSS,
   p50/p99 per query (5 words sampled from a random passage). Target: p99 < 50 ms at 1M.
3. Baselines (--compare_n passages, default 200k, same synthetic text, same queries): bm25s (numpy sparse matrix,
   mmap) and SQLite FTS5 (bm25 rank), against tantivy: the measurement behind the library choice.
4. Cache: lookups/s (hits) from 1 and 4 threads, and puts/s, on a WAL file in a temp dir.

What it does not do: no network back ends (those are tested against a fake server), no GPU (nothing here uses one).

How to run (a few minutes on 2 CPU cores; temp files go to --workdir and are deleted)
    python bench/search.py
    python bench/search.py --n_passages=200000 --compare_n=50000      # quicker
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import browse  # noqa: E402
from data.config import parse_config  # noqa: E402
from data.localweb import BM25Index  # noqa: E402
from data.wiki_corpus import default_corpus_path  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def pct(lat_s: list[float]) -> tuple[float, float]:
    a = np.array(lat_s) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def dir_mb(d) -> float:
    return sum(os.path.getsize(os.path.join(a, f)) for a, _, fs in os.walk(d) for f in fs) / 1e6


def timed_queries(fn, queries) -> tuple[float, float]:
    for q in queries[:20]:  # warm the page cache / code paths
        fn(q)
    lat = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        lat.append(time.perf_counter() - t)
    return pct(lat)


def synthetic(n: int, seed: int = 0, words_per: int = 60) -> list[str]:
    """n passages of words drawn i.i.d. from the embedded corpus's unigram distribution (Zipf-like)."""
    words = []
    with open(default_corpus_path(), encoding="utf-8") as f:
        for line in f:
            words += re.findall(r"\w+", json.loads(line)["text"].lower())
    vocab, counts = np.unique(np.array(words), return_counts=True)
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, 100_000):  # in blocks: one 60M-element array of strings would need ~5 GB
        m = min(100_000, n - start)
        ids = rng.choice(len(vocab), size=(m, words_per), p=counts / counts.sum())
        out += [" ".join(row) for row in vocab[ids]]
    return out


def sample_queries(docs: list[str], n: int = 500, seed: int = 1) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.sample(docs[r.randrange(len(docs))].split(), 5)) for _ in range(n)]


def bench_embedded(work: Path) -> None:
    corpus = default_corpus_path()
    m0 = rss_mb()
    t = time.perf_counter()
    idx = BM25Index(corpus, index_dir=work / "emb")
    build = time.perf_counter() - t
    b = browse.LocalBackend(top_k=10, serve=False, index_dir=str(work / "emb"))
    titles = [json.loads(line)["title"] for line in open(corpus, encoding="utf-8")]
    r = random.Random(0)
    queries = [f"who or what is {x}" for x in r.sample(titles, 250)] + [
        "highest mountain on Earth", "who wrote Hamlet", "capital of Peru", "speed of light"] * 25
    p50, p99 = timed_queries(lambda q: b.search([q]), queries)
    print(f"embedded corpus: {idx.n_passages:,} passages | build {build:.1f} s | RSS +{rss_mb() - m0:.0f} MB | "
          f"index {dir_mb(idx.dir):.1f} MB | search p50 {p50:.2f} ms p99 {p99:.2f} ms (top-10, dedup, snippets)",
          flush=True)


def bench_synthetic(work: Path, n: int) -> None:
    t = time.perf_counter()
    docs = synthetic(n)
    path = work / "synth.jsonl"
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": f"p{i}", "title": f"P{i}", "url": "", "text": d}) + "\n")
    queries = sample_queries(docs)
    del docs
    gen = time.perf_counter() - t
    m0 = rss_mb()
    t = time.perf_counter()
    idx = BM25Index(path, index_dir=work / "synth")
    build = time.perf_counter() - t
    p50, p99 = timed_queries(lambda q: idx.query(q, 10), queries)
    ok = "meets" if p99 < 50 else "MISSES"
    print(f"synthetic {n:,} passages: corpus gen+write {gen:.0f} s ({path.stat().st_size / 1e6:.0f} MB) | "
          f"build {build:.1f} s | index {dir_mb(idx.dir):.0f} MB on disk | RSS +{rss_mb() - m0:.0f} MB after queries | "
          f"query p50 {p50:.2f} ms p99 {p99:.2f} ms ({ok} the 50 ms target)", flush=True)
    shutil.rmtree(idx.dir, ignore_errors=True)
    path.unlink()


def bench_compare(work: Path, n: int) -> None:
    """tantivy vs bm25s vs SQLite FTS5 on the same passages and queries."""
    docs = synthetic(n, seed=2)
    queries = sample_queries(docs, 300)
    rows = {}
    # tantivy, through our index class
    path = work / "cmp.jsonl"
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": f"p{i}", "title": "", "url": "", "text": d}) + "\n")
    t = time.perf_counter()
    idx = BM25Index(path, index_dir=work / "cmp_tantivy")
    rows["tantivy"] = (time.perf_counter() - t, *timed_queries(lambda q: idx.query(q, 10), queries),
                       dir_mb(idx.dir))
    try:
        import bm25s
        t = time.perf_counter()
        r = bm25s.BM25()
        r.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
        r.save(str(work / "cmp_bm25s"))
        del r
        r = bm25s.BM25.load(str(work / "cmp_bm25s"), mmap=True)
        build = time.perf_counter() - t
        rows["bm25s (mmap)"] = (build, *timed_queries(lambda q: r.retrieve(
            bm25s.tokenize([q], stopwords="en", show_progress=False), k=10, show_progress=False, n_threads=1),
            queries), dir_mb(work / "cmp_bm25s"))
    except ImportError:
        print("bm25s not installed (pip install bm25s): skipped", flush=True)
    con = sqlite3.connect(str(work / "cmp_fts5.db"))
    t = time.perf_counter()
    con.execute("CREATE VIRTUAL TABLE t USING fts5(body)")
    con.executemany("INSERT INTO t(rowid, body) VALUES (?, ?)", enumerate(docs))
    con.commit()
    build = time.perf_counter() - t

    def fts(q):
        m = " OR ".join(f'"{w}"' for w in q.split())
        return con.execute("SELECT rowid FROM t WHERE t MATCH ? ORDER BY rank LIMIT 10", (m,)).fetchall()

    rows["sqlite fts5"] = (build, *timed_queries(fts, queries[:100]), os.path.getsize(work / "cmp_fts5.db") / 1e6)
    base = rows["tantivy"]
    for name, (build, p50, p99, mb) in rows.items():
        print(f"compare {n:,} passages: {name:14s} build {build:6.1f} s | p50 {p50:7.2f} ms p99 {p99:7.2f} ms | "
              f"disk {mb:5.0f} MB | p99 = {p99 / base[2]:.1f}x tantivy's", flush=True)


def bench_cache(work: Path, n: int = 20_000, seconds: float = 2.0) -> None:
    c = browse.Cache(work / "cache.sqlite", "replay_or_live")
    t = time.perf_counter()
    for i in range(n):
        c.put("page", f"https://example.org/{i}", {"text": "x" * 2000, "status": 200})
    puts = n / (time.perf_counter() - t)
    for threads in (1, 4):
        counts = [0] * threads
        stop = time.perf_counter() + seconds

        def work_fn(k):
            r = random.Random(k)
            while time.perf_counter() < stop:
                assert c.get("page", f"https://example.org/{r.randrange(n)}") is not None
                counts[k] += 1

        ts = [threading.Thread(target=work_fn, args=(k,)) for k in range(threads)]
        [x.start() for x in ts]
        [x.join() for x in ts]
        print(f"cache: {sum(counts) / seconds:,.0f} lookups/s (hits, 2 kB pages, {threads} thread(s)) | "
              f"{puts:,.0f} puts/s (1 thread, autocommit)", flush=True)


@dataclass
class Args:
    n_passages: int = 1_000_000  # synthetic corpus size (0 = skip)
    compare_n: int = 200_000     # passages of the library comparison (0 = skip)
    workdir: str = ""            # where the temp files go ("" = the system's temp dir)


def main(a: Args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_search_", dir=a.workdir or None))
    print(f"bench/search.py | {os.cpu_count()} CPUs | tantivy index, workdir {work}", flush=True)
    try:
        bench_embedded(work)
        bench_cache(work)
        if a.compare_n:
            bench_compare(work, a.compare_n)
        if a.n_passages:
            bench_synthetic(work, a.n_passages)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(parse_config(Args, sys.argv[1:]))
