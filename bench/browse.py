"""Page fetching throughput: browse.Fetcher's thread pool vs fetching one URL after another, in the same run.

What it measures: 500 URLs served by local HTTP servers (ThreadingHTTPServer) that add 100 ms of latency per request
(a web server far away). Each page is a realistic ~4 KB HTML page: four records of the embedded Wikipedia corpus as
sections of an article, inside a head with CSS and JavaScript, a navigation bar of 25 links and a footer, so the whole
fetch() path runs (SSRF guard, HTTP, deadline watchdog, charset, trafilatura main-content extraction). Search results
come from many sites, so the URLs are spread over 10 servers on 10 ports ("hosts") and the per-host limit (default 8)
applies as it would on the web. The servers run in a child process, as remote servers would: in this process they
would take the GIL from the client (--inproc=true measures that too).
Runs, in this order, on the same URLs: one after another with fetch(); the pool (Fetcher.fetch_many, browse.py's
defaults: 32 threads, 8 per host), 3 times (median; the pool is CPU-bound and the machine shared); the pool again
recording into a Cache; the Cache replayed (no network).
Reports pages/s for each, the client's CPU per page, the slowest call against the timeout, and prints
`speedup_vs_sequential=<ratio>` (sequential wall / pool wall) last. Target: >= 20x on a 2-core CPU.

What it does not measure: DNS, TLS, real page sizes (real pages are 50-500 KB of HTML: more extraction CPU per page).

Run: python bench/browse.py [--urls=500] [--latency=0.1] [--hosts=10] [--threads=32] [--per_host=8] [--repeat=3]
       [--inproc=true] [--profile=true]
"""

from __future__ import annotations

import html
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.config import parse_config  # noqa: E402


@dataclass
class Args:
    urls: int = 500
    latency: float = 0.1
    hosts: int = 10
    threads: int = 0         # pool threads (0 = browse.py's default, 32)
    per_host: int = 0        # per-host limit (0 = browse.py's default, 8)
    timeout: float = 10.0
    inproc: bool = False     # run the servers in this process (they share the GIL)
    profile: bool = False    # also print where a fetch's CPU time goes
    repeat: int = 3          # pool runs (the median is reported)


def make_pages(n: int) -> list[bytes]:
    """n article pages of ~4 KB from the embedded corpus (4 records each), with the usual boilerplate around."""
    from data.wiki_corpus import default_corpus_path
    with open(default_corpus_path(), encoding="utf-8") as f:
        recs = [json.loads(next(f)) for _ in range(4 * n + 25)]
    esc = html.escape
    nav = "".join(f'<li><a href="/wiki/{esc(r["id"])}">{esc(r["title"])}</a></li>' for r in recs[-25:])
    pages = []
    for i in range(n):
        rs = recs[4 * i:4 * i + 4]
        secs = "".join(f"<h2>{esc(r['title'])}</h2>\n" + "".join(f"<p>{esc(p)}</p>\n" for p in r["text"].split("\n")
                                                                if p.strip()) for r in rs)
        pages.append((
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(rs[0]["title"])} - Wiki</title>'
            '<link rel="stylesheet" href="/s.css"><style>body{font-family:sans-serif;margin:0} nav li{display:inline;'
            'margin:0 4px} .ad{display:none}</style><script>window.dataLayer=window.dataLayer||[];function gtag(){'
            "dataLayer.push(arguments)}gtag('js',new Date());</script></head>\n<body><header><div class=\"logo\">"
            f'WikiSite</div><nav><ul>{nav}</ul></nav><form action="/search"><input name="q"></form></header>\n'
            f'<main><article><h1>{esc(rs[0]["title"])}</h1>\n{secs}</article></main>\n<aside class="ad">Sponsored'
            "</aside><footer><p>Text is available under the Creative Commons Attribution-ShareAlike License.</p>"
            '<p><a href="/privacy">Privacy policy</a> | <a href="/about">About</a></p></footer>'
            '<script src="/app.js"></script></body></html>\n').encode())
    return pages


def start_servers(pages: list[bytes], latency: float, n: int) -> list[ThreadingHTTPServer]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real web servers do (http.server defaults to 1.0)
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

    servers = []
    for _ in range(n):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        srv.request_queue_size = 256
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    return servers


def _serve_child(pages, latency, n, conn) -> None:
    servers = start_servers(pages, latency, n)
    conn.send([s.server_address[1] for s in servers])
    conn.recv()  # until the parent says stop


def profile(urls: list[str], hosts: tuple, timeout: float) -> None:
    """cProfile (CPU time: the servers' latency is a sleep in another process) over sequential fetches: the share of
    fetch()'s time spent in each phase."""
    import cProfile
    import pstats
    import browse
    pr = cProfile.Profile(time.process_time)
    pr.enable()
    for u in urls[:200]:
        browse.fetch(u, timeout=timeout, allow_hosts=hosts)
    pr.disable()
    cum = {}
    for (file, _, fn), v in pstats.Stats(pr).stats.items():
        cum[(Path(file).name, fn)] = cum.get((Path(file).name, fn), 0.0) + v[3]
    total = cum[("browse.py", "fetch")]
    phases = {"HTML -> text (html_to_text: trafilatura)": cum.get(("browse.py", "html_to_text"), 0.0),
              "HTTP request + headers (requests Session.get)": cum.get(("sessions.py", "get"), 0.0),
              "body read (_read_body)": cum.get(("browse.py", "_read_body"), 0.0),
              "charset (decode_body)": cum.get(("browse.py", "decode_body"), 0.0),
              "URL check (check_url)": cum.get(("browse.py", "check_url"), 0.0)}
    phases["the rest (session, result)"] = total - sum(phases.values())
    print(f"profile of 200 sequential fetches: {total / 200 * 1e3:.2f} ms CPU per page under cProfile (inflated ~4x)")
    for name, t in phases.items():
        print(f"  {name:<48}{t / total:6.1%}")


def main(a: Args) -> None:
    pages = make_pages(100)
    if a.inproc:
        servers, child = start_servers(pages, a.latency, a.hosts), None
        ports = [s.server_address[1] for s in servers]
    else:  # spawned before this process starts any thread (and imports nothing heavy)
        parent_end, child_end = mp.Pipe()
        child = mp.get_context("spawn").Process(target=_serve_child, args=(pages, a.latency, a.hosts, child_end),
                                                daemon=True)
        child.start()
        ports = parent_end.recv()

    import browse
    cfg = browse.BrowseConfig()
    threads = a.threads or cfg.n_threads
    per_host = a.per_host or cfg.per_host
    hosts = tuple(f"127.0.0.1:{p}" for p in ports)
    urls = [f"http://{hosts[i % a.hosts]}/page/{i}" for i in range(a.urls)]
    where = "in this process" if a.inproc else "in a child process"
    print(f"{a.urls} URLs over {a.hosts} local hosts (ports; servers {where}), {a.latency * 1e3:.0f} ms latency per "
          f"request, {sum(map(len, pages)) / len(pages) / 1e3:.1f} KB HTML pages; pool {threads} threads, "
          f"{per_host} per host")
    t0 = time.perf_counter()
    for p in pages:
        browse.html_to_text(p.decode())  # also imports trafilatura outside the timings
    extract_ms = (time.perf_counter() - t0) / len(pages) * 1e3

    def timed(fn):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, (time.process_time() - c0) / len(urls) * 1e3

    seq, t_seq, cpu_seq = timed(lambda: [browse.fetch(u, timeout=a.timeout, allow_hosts=hosts) for u in urls])
    runs = []  # the pool is CPU-bound on a shared machine, so it is timed --repeat times and the median is used
    for _ in range(a.repeat):
        f = browse.Fetcher(n_threads=threads, per_host=per_host, timeout=a.timeout, allow_hosts=hosts)
        runs.append(timed(lambda: f.fetch_many(urls)))
        f.close()
    par, t_par, cpu_par = sorted(runs, key=lambda r: r[1])[len(runs) // 2]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "web.sqlite"
        f = browse.Fetcher(cache=browse.Cache(db, "record"), n_threads=threads, per_host=per_host, timeout=a.timeout,
                           allow_hosts=hosts)
        rec, t_rec, cpu_rec = timed(lambda: f.fetch_many(urls))
        f.close()
        f = browse.Fetcher(cache=browse.Cache(db, "replay"), n_threads=threads)
        hit, t_hit, cpu_hit = timed(lambda: f.fetch_many(urls))
        f.close()

    ok = [sum(r.ok for r in x) for x in (seq, par, rec, hit)]
    assert ok == [a.urls] * 4, f"failures: sequential/pool/record/replay ok = {ok}"
    assert [r.text for r in seq] == [r.text for r in par] == [r.text for r in rec] == [r.text for r in hit], \
        "the pool or the cache changed a page"
    assert all(r.cached for r in hit)
    n_chars = sum(len(r.text) for r in seq) / len(seq)
    print(f"extracted text: {n_chars:.0f} chars per page; html_to_text alone {extract_ms:.2f} ms per page")
    print(f"{'run':<34}{'wall':>9}{'pages/s':>10}{'client CPU/page':>17}")
    for name, t, cpu in [("sequential fetch()", t_seq, cpu_seq), ("pool Fetcher.fetch_many, median", t_par, cpu_par),
                         ("pool, recording into the Cache", t_rec, cpu_rec),
                         ("Cache hits (replay, no network)", t_hit, cpu_hit)]:
        print(f"{name:<34}{t:8.2f}s{a.urls / t:10.1f}{cpu:14.2f} ms")
    print(f"pool runs: {', '.join(f'{t:.2f} s' for _, t, _ in runs)}")
    worst_seq = max(r.elapsed_s for r in seq)
    worst_par = max(r.elapsed_s for run in runs for r in run[0] + rec)  # includes waiting for a per-host slot
    print(f"slowest call: sequential {worst_seq:.2f} s, pool {worst_par:.2f} s (incl. per-host queueing); timeout "
          f"{a.timeout:g} s, over by {max(0.0, worst_seq - a.timeout, worst_par - a.timeout):.2f} s")
    ideal = a.latency * -(-a.urls // min(threads, a.hosts * per_host))
    print(f"pool lower bound from latency alone: {ideal:.2f} s ({a.urls / ideal:.0f} pages/s); the rest is CPU")
    if a.profile:
        profile(urls, hosts, a.timeout)
    if child is not None:
        parent_end.send("stop")
        child.join(5)
    print(f"speedup_vs_sequential={t_seq / t_par:.1f}")


if __name__ == "__main__":
    main(parse_config(Args, sys.argv[1:]))
