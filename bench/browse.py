"""Page fetching throughput: browse.Fetcher's thread pool vs fetching one URL after another, in the same run.

What it measures: 500 URLs served by local HTTP servers that add 100 ms of latency per request (a web server far
away), each a few-KB HTML page built from the embedded Wikipedia corpus, so the whole fetch() path runs (HTTP,
the SSRF guard, charset, trafilatura extraction). Real search results come from many sites: the URLs are spread
over 10 servers ("hosts") so the per-host limit (default 8) applies as it would on the web. Then the same 500 pages
again from a replayed Cache (no network). Reports pages/s for each, the worst call's time against the timeout,
and prints `speedup_vs_sequential=<ratio>` last. Target: >= 20x on a 2-core CPU.

Run: python bench/browse.py [--urls=500] [--latency=0.1] [--hosts=10] [--threads=64] [--per_host=8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
import browse  # noqa: E402


def make_server(pages: list[bytes], latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            time.sleep(latency)
            body = pages[int(self.path.rsplit("/", 1)[-1]) % len(pages)]
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.request_queue_size = 256
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--urls", type=int, default=500)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--per_host", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()

    from wiki_corpus import default_corpus_path
    with open(default_corpus_path(), encoding="utf-8") as f:
        recs = [json.loads(next(f)) for _ in range(200)]
    pages = [browse._page_html(r).encode() for r in recs]
    servers = [make_server(pages, a.latency) for _ in range(a.hosts)]
    hosts = tuple(f"127.0.0.1:{s.server_address[1]}" for s in servers)
    urls = [f"http://{hosts[i % a.hosts]}/page/{i}" for i in range(a.urls)]
    print(f"{a.urls} URLs over {a.hosts} local hosts, {a.latency * 1e3:.0f} ms latency each, "
          f"{sum(map(len, pages)) / len(pages) / 1e3:.1f} KB pages; pool {a.threads} threads, {a.per_host} per host")
    browse.html_to_text(pages[0].decode())  # import trafilatura outside the timings

    t0 = time.perf_counter()
    seq = [browse.fetch(u, timeout=a.timeout, allow_hosts=hosts) for u in urls]
    t_seq = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        f = browse.Fetcher(cache=browse.Cache(Path(tmp) / "web.sqlite", "record"), n_threads=a.threads,
                           per_host=a.per_host, timeout=a.timeout, allow_hosts=hosts)
        t0 = time.perf_counter()
        par = f.fetch_many(urls)
        t_par = time.perf_counter() - t0
        f.close()
        rep = browse.Fetcher(cache=browse.Cache(Path(tmp) / "web.sqlite", "replay"), n_threads=a.threads)
        t0 = time.perf_counter()
        hit = rep.fetch_many(urls)
        t_hit = time.perf_counter() - t0
        rep.close()

    ok = [sum(r.ok for r in x) for x in (seq, par, hit)]
    assert ok == [a.urls] * 3, f"failures: sequential/pool/replay ok = {ok}"
    assert [r.text for r in par] == [r.text for r in seq] == [r.text for r in hit], "pool or replay changed a page"
    worst = max(r.elapsed_s for r in seq + par)
    print(f"sequential  {t_seq:7.2f} s  {a.urls / t_seq:8.1f} pages/s")
    print(f"pool        {t_par:7.2f} s  {a.urls / t_par:8.1f} pages/s")
    print(f"cache hits  {t_hit:7.2f} s  {a.urls / t_hit:8.1f} pages/s  (replay mode, no network)")
    print(f"slowest call {worst:.2f} s (timeout {a.timeout:g} s; over by {max(0.0, worst - a.timeout):.2f} s)")
    for s in servers:
        s.shutdown()
    print(f"speedup_vs_sequential={t_seq / t_par:.1f}")


if __name__ == "__main__":
    main()
