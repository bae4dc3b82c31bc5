"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1: correct, incorrect, garbage, timeout, cache."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval import Judge, parse_judgement

# what the fake judge replies, chosen by a word in the predicted answer
REPLIES = {
    "rightish": '```json\n{"rationale": "same city", "judgement": "correct"}\n```',
    "wrongish": '{"rationale": "different city", "judgement": "Incorrect"}',
    "garbage": "I think it is probably fine?",
}


class FakeOpenAI(BaseHTTPRequestHandler):
    calls: list = []

    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.calls.append({"body": body, "auth": self.headers.get("Authorization")})
        prompt = body["messages"][-1]["content"]
        pred = prompt.split("predicted answer:")[1].split("\n")[0]
        if "slow" in pred:
            time.sleep(1.5)  # longer than the client's timeout
        if "boom" in pred:
            self.send_response(500)
            self.end_headers()
            return
        word = next((w for w in REPLIES if w in pred), "garbage")
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": REPLIES[word]}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up: expected
            pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def make(server, tmp_path, **kw):
    cfg = dict(base_url=server, model="fake", api_key_env="DR_TEST_JUDGE_KEY", cache_path=str(tmp_path / "j.jsonl"),
               timeout_s=0.5, max_retries=1, backoff_s=0.01)
    cfg.update(kw)
    return Judge(**cfg)


def test_exact_match_needs_no_call(server, tmp_path):
    FakeOpenAI.calls.clear()
    v = make(server, tmp_path).judge("Capital of France?", "London<|answer_split|>Paris", "paris.")
    assert (v.verdict, v.source, v.correct) == ("correct", "exact_match", 1.0) and not FakeOpenAI.calls
    v = make(server, tmp_path).judge("Capital of France?", "Paris", None)
    assert (v.verdict, v.source) == ("incorrect", "no_answer") and not FakeOpenAI.calls


def test_correct_incorrect_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DR_TEST_JUDGE_KEY", "sk-secret")
    FakeOpenAI.calls.clear()
    j = make(server, tmp_path)
    v = j.judge("Capital of France?", ["Paris"], "rightish: the city of Paris")
    assert (v.verdict, v.source, v.rationale) == ("correct", "judge", "same city")
    v = j.judge("Capital of France?", ["Paris"], "wrongish Lyon")
    assert (v.verdict, v.correct) == ("incorrect", 0.0)
    assert len(FakeOpenAI.calls) == 2
    body = FakeOpenAI.calls[0]["body"]
    assert body["temperature"] == 0.0 and body["model"] == "fake"
    assert FakeOpenAI.calls[0]["auth"] == "Bearer sk-secret"
    assert '["Paris"]' in body["messages"][0]["content"]
    cache_text = (tmp_path / "j.jsonl").read_text()
    assert "sk-secret" not in cache_text and len(cache_text.splitlines()) == 2
    # a new Judge reads the verdicts back from disk: no more calls
    j2 = make(server, tmp_path)
    assert j2.judge("Capital of France?", ["Paris"], "rightish: the city of Paris").source == "cache"
    assert len(FakeOpenAI.calls) == 2
    got = j2.judge_many([("q", ["Paris"], "wrongish Lyon"), ("q", ["Paris"], "Paris")])
    assert [v.verdict for v in got] == ["incorrect", "correct"]


def test_garbage_is_unjudged_once(server, tmp_path):
    FakeOpenAI.calls.clear()
    j = make(server, tmp_path)
    v = j.judge("Capital of France?", ["Paris"], "garbage Lyon")
    assert (v.verdict, v.correct, v.error) == ("unjudged", None, "unparseable judge reply")
    assert len(FakeOpenAI.calls) == 1 and j.stats["unparseable"] == 1   # not retried
    assert not (tmp_path / "j.jsonl").exists()                           # not cached: a later run may try again


def test_timeout_and_server_error_are_bounded(server, tmp_path):
    FakeOpenAI.calls.clear()
    j = make(server, tmp_path, max_retries=1)
    t0 = time.time()
    v = j.judge("Capital of France?", ["Paris"], "slow Lyon")
    assert v.verdict == "unjudged" and v.error.startswith("timeout")
    assert len(FakeOpenAI.calls) == 2 and time.time() - t0 < 5       # 1 + max_retries attempts, each 0.5 s
    v = j.judge("Capital of France?", ["Paris"], "boom Lyon")
    assert v.verdict == "unjudged" and "HTTP 500" in v.error


def test_unreachable_server(tmp_path):
    j = make("http://127.0.0.1:9/v1", tmp_path, max_retries=0)
    v = j.judge("q", ["Paris"], "Lyon")
    assert v.verdict == "unjudged" and v.error


def test_parse_judgement_variants():
    assert parse_judgement('{"rationale": "x", "judgement": "correct"}') == ("correct", "x")
    assert parse_judgement('{"judgment": " INCORRECT "}') == ("incorrect", "")
    assert parse_judgement('{"rationale": "he said "no"", "judgement": "correct"}') == ("correct", "")
    assert parse_judgement('{"judgement": "maybe"}') is None
    assert parse_judgement("") is None
