"""report.py: the offline HTML report of a training run and of an eval, checked as a person sees it.

The fixtures write a training run folder and two sibling eval folders (a model and the first_title baseline) from
real `rollout()` trajectories, driven by test_rollout's scripted engine (so the token layout, loss masks and
observations are exactly what rollout.py makes) and decoded with the SmolLM2 tokenizer of the tiny checkpoint.
The browser tests open the written report.html files from disk in headless Chromium (Debian's `chromium`, driven
by playwright): no console errors, filters change the visible rows, and a trajectory shows one green span per
sampled token. They skip only when chromium is not installed (.ci/run installs it).
Run: python -m pytest -q tests/test_report.py
"""

import dataclasses
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

import report
import train
from reward import reward
from rollout import RolloutConfig, rollout
from test_rollout import FakeBrowser, FakeEngine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the token colours of report.CSS, as the browser reports them
COLOURS = {"sampled": "rgb(201, 242, 199)", "forced": "rgb(255, 227, 163)", "observation": "rgb(214, 230, 255)",
           "prompt": "rgb(236, 236, 236)"}
EXAMPLE = "What is the capital of Norway?|capital of Norway|Oslo"


def policy(ctx, turn):
    """Scripted turns after the forced "<search>", by the question (the user message `turn` tool responses back):
    search and answer; search twice and answer; or an unclosed call then neither call nor answer (format error)."""
    question = ctx.split("<|im_start|>user\n")[-1 - turn]
    if "Nowhere" in question:
        return "no idea" if turn == 0 else "still nothing"
    if "twice" in question and turn == 1:
        return "<search>second look</search>"
    return "capital city</search>" if turn == 0 else "<answer>Oslo</answer>"


QUESTIONS = [("What is the capital of Norway, asked twice?", ["Oslo"], "capital"),
             ("Which city is the capital of Norway?", ["Oslo"], "capital"),
             ("Who founded Nowhere?", ["Nobody"], "who")]


@pytest.fixture(scope="module")
def tok(tiny_qwen2):
    return report.load_tokenizer(str(tiny_qwen2))


def make_trajectories(tok):
    cfg = RolloutConfig(date="2025-01-01", max_len=2048, n_slots=8, protocol="tags", prompt="short",
                        turn_prefixes="<search>", example=EXAMPLE, max_turns=3, max_new_tokens=24)
    engine = FakeEngine(tok, policy, n_slots=8, max_len=2048)
    return rollout(None, tok, [q for q, _, _ in QUESTIONS], FakeBrowser(), cfg, group_size=2, engine=engine)


@pytest.fixture(scope="module")
def trajectories(tok):
    return make_trajectories(tok)


def dump_record(traj, gold, adv, tok):
    """A step dump's record, as train.py writes it (token ids, loss mask, 4-decimal log-probs, turns)."""
    return train.trajectory_record(traj, gold, reward([t.text for t in traj.turns], gold, protocol="tags"), adv, tok)


def make_run_folder(folder: Path, trajectories, model: str, tok) -> Path:
    """A train.py out_dir: config.json, metrics.jsonl for 3 steps (dev F1 on two), a dump per step."""
    (folder / "config.json").write_text(json.dumps({"model": model, "steps": 3, "batch_size": 3}))
    metrics = [{"step": s, "reward": -0.5 + 0.3 * s, "f1": 0.1 * s, "em": 0.05 * s, "format_error": 0.3 / s,
                "zero_var_groups": 0.5, "turns": 2.0, "search_calls": 1.0 + 0.2 * s, "browse_calls": 0.0,
                "response_len": 20.0, "entropy": 1.0 / s, "end_answer": 4, "end_format_error": 2,
                **({"dev_f1": 0.2 * s} if s != 2 else {})} for s in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (folder / "rollouts").mkdir()
    for step in (1, 2, 3):  # step s dumps the trajectories of the first s questions (both samples)
        recs = [dump_record(t, QUESTIONS[t.group][1], 0.5, tok) for t in trajectories if t.group < step]
        (folder / "rollouts" / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, trajectories, tiny_qwen2, tok):
    return make_run_folder(tmp_path_factory.mktemp("run"), trajectories, str(tiny_qwen2), tok)


def eval_folder(parent: Path, name: str, agent: str, model: str, trajectories, with_tokens: bool) -> Path:
    """An eval.py out_dir with one record per question (eval.trajectory_record, scored as eval.py scores); without
    tokens, the records look like the first_title baseline's (its trajectories hold no token ids)."""
    import eval as evaluation

    folder = parent / name
    folder.mkdir()
    records = []
    for n, traj in enumerate(trajectories[::2]):  # one trajectory per question, as an eval has
        question, gold, template = QUESTIONS[n]
        example = {"id": f"q{n}", "source": "offline_qa", "template": template, "question": question, "answers": gold}
        if not with_tokens:
            traj = dataclasses.replace(traj, tokens=[], loss_mask=[], logprobs=[], prompt_len=0)
        rec = evaluation.trajectory_record(example, traj)
        rec["scores"] = evaluation.score_record(rec, "tags")
        records.append(rec)
    (folder / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.json").write_text(json.dumps({"agent": agent, "model": model}))
    (folder / "run.json").write_text(json.dumps({"agent": agent, "model": model}))
    summary = {"metrics": evaluation.summarize(records), "meta": {}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def make_eval_folders(parent: Path, trajectories, model: str) -> Path:
    """A model's eval folder (token ids in its records) and, beside it, a first_title baseline's (none)."""
    eval_folder(parent, "first_title", "first_title", "SmolLM2", trajectories, with_tokens=False)
    return eval_folder(parent, "eval-tiny", "model", model, trajectories, with_tokens=True)


@pytest.fixture(scope="module")
def eval_folders(tmp_path_factory, trajectories, tiny_qwen2):
    return make_eval_folders(tmp_path_factory.mktemp("evals"), trajectories, str(tiny_qwen2))


# ----------------------------------------------------------------------------------------------- without a browser

def test_token_kinds_follow_the_rollout(trajectories, tok):
    """prompt up to prompt_len, sampled exactly where the loss mask is 1, and the observation tokens decode to the
    observation each turn got; the forced rest is the chat frame and the turn prefixes."""
    t = trajectories[0]  # searched twice: two observations
    rec = dump_record(t, ["Oslo"], 0.0, tok)
    kinds, located = report.token_kinds(rec, tok)
    assert located and len(kinds) == len(t.tokens)
    assert kinds[:t.prompt_len] == "p" * t.prompt_len and "p" not in kinds[t.prompt_len:]
    assert [k == "s" for k in kinds] == [bool(m) for m in t.loss_mask]
    observed = [t.turns[0].observation, t.turns[1].observation]
    runs, i = [], 0
    while (i := kinds.find("o", i)) >= 0:
        j = i
        while j < len(kinds) and kinds[j] == "o":
            j += 1
        runs.append(tok.decode(t.tokens[i:j]))
        i = j
    assert runs == observed and "second look" in t.turns[1].text
    forced = tok.decode([x for x, k in zip(t.tokens, kinds) if k == "f"])
    assert forced.startswith("<search>") and "<tool_response>" in forced and "Results for" not in forced


def test_record_without_tokens_shows_turn_text(trajectories, tok):
    rec = dump_record(trajectories[0], ["Oslo"], 0.0, tok)
    for key in ("tokens", "loss_mask", "logprobs"):
        del rec[key]
    never = report.Pieces(lambda: pytest.fail("a record without token ids needs no tokenizer"))
    entry = report.trajectory_entry(rec, never)
    assert entry["tokens"] is None and entry["turns"][0]["observation"] == trajectories[0].turns[0].observation


def test_token_budget_keeps_the_page_light(trajectories, tok, tiny_qwen2, monkeypatch):
    """Past the page's token budget a record shows its turn text (observations included), and says why."""
    records = [dump_record(t, ["Oslo"], 0.0, tok) for t in trajectories[:3]]
    monkeypatch.setattr(report, "TOKEN_BUDGET", len(records[0]["tokens"]) + len(records[1]["tokens"]))
    pieces = report.Pieces(lambda: str(tiny_qwen2))
    entries = [report.trajectory_entry(r, pieces) for r in records]
    assert [e["tokens"] is not None for e in entries] == [True, True, False]
    assert entries[2]["tokens_left_out"] and entries[2]["turns"][0]["observation"]
    assert entries[0]["turns"][0]["observation"] is None  # the token stream holds it: not embedded twice


class Checker(HTMLParser):
    """Collects every src/href-like attribute and checks that each element is closed in order."""
    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}

    def __init__(self):
        super().__init__()
        self.refs, self.open, self.tags, self.problems = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags += 1
        self.refs += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "xlink:href") and v]
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):  # <line .../> in SVG: opened and closed at once
        self.tags += 1
        self.refs += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1:] or 'nothing'} at line {self.getpos()[0]}")
        else:
            self.open.pop()


def test_html_parses_and_reaches_nothing(run_folder, eval_folders):
    for folder in (run_folder, eval_folders):
        page = report.write_report(folder)
        assert page == folder / "report.html"
        text = page.read_text(encoding="utf-8")
        parser = Checker()
        parser.feed(text)
        parser.close()
        assert parser.problems == [] and parser.open == []  # every element closed, in order
        assert parser.tags > 10 and parser.refs == []  # no src/href at all: nothing loads, nothing links out
        assert "<link" not in text and "@import" not in text and "url(" not in text
        assert text.count("<script") == 2  # the data and the inline script, no src
    with pytest.raises(ValueError, match="neither metrics.jsonl"):
        report.write_report(run_folder / "rollouts")


# ----------------------------------------------------------------------------------------------- in Chromium

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:  # launch() gives the browser a fresh temporary profile (user data dir)
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def open_page(browser, path: Path, hash_part: str = ""):
    """The report opened from disk; returns (page, errors): console errors, page errors and any request that is
    not the file itself (a report that reaches for the network fails here)."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"request {r.url}") if not r.url.startswith("file://") else None)
    page.goto(path.resolve().as_uri() + hash_part)
    page.wait_for_selector("#rows tbody tr")
    return page, errors


def visible_rows(page) -> int:
    return page.locator("#rows tbody tr").count()


def test_training_report_in_chromium(browser, run_folder, trajectories):
    path = report.write_report(run_folder)
    page, errors = open_page(browser, path)
    assert visible_rows(page) == 2 + 4 + 6  # the dumps of steps 1, 2, 3
    assert page.locator("svg.chart").count() >= 8  # the curves, drawn inline
    page.select_option("#f-step", "2")
    assert visible_rows(page) == 4
    page.select_option("#f-step", "")
    page.check("#f-twice")
    assert visible_rows(page) == 2 * 3  # the question that searched twice, at each step
    # a trajectory: one green span per sampled token (loss mask 1), log-prob on hover, blue observations
    page.locator("#rows tbody tr").first.click()
    page.wait_for_selector("#stream")
    t = trajectories[0]
    sampled = page.locator("#stream .tok-sampled")
    assert sampled.count() == sum(t.loss_mask)
    colours = sampled.evaluate_all("spans => [...new Set(spans.map(e => getComputedStyle(e).backgroundColor))]")
    assert colours == [COLOURS["sampled"]]
    assert sampled.first.get_attribute("title").startswith("log p = -0.")
    for kind in ("observation", "forced", "prompt"):
        spans = page.locator(f"#stream .tok-{kind}")
        assert spans.count() > 0 and spans.first.evaluate("e => getComputedStyle(e).backgroundColor") == COLOURS[kind]
    assert page.locator("#stream details.obs").count() == 2  # each observation collapsible, named by its call
    assert "web_search: capital city" in page.locator("#stream details.obs summary").first.inner_text()
    first_observation = page.locator("#stream details.obs").first.locator(".tok").all_text_contents()
    assert "".join(first_observation) == t.turns[0].observation  # the blue tokens are exactly what the tool said
    assert "".join(page.locator("#stream .tok").all_text_contents()) == report.load_tokenizer(
        str(json.loads((run_folder / "config.json").read_text())["model"])).decode(t.tokens)
    assert errors == []
    page.close()


def test_eval_report_in_chromium(browser, eval_folders):
    path = report.write_report(eval_folders)
    page, errors = open_page(browser, path)
    assert visible_rows(page) == 3
    header = page.locator("#summary-table thead").inner_text()
    assert "first_title" in header  # the sibling baseline, found beside it
    page.check("#f-wrong")
    assert visible_rows(page) == 1  # only the format error is wrong
    page.uncheck("#f-wrong")
    page.select_option("#f-template", "who")
    assert visible_rows(page) == 1
    page.select_option("#f-template", "")
    page.select_option("#f-end", "answer")
    assert visible_rows(page) == 2
    page.select_option("#f-end", "")
    page.fill("#f-text", "which city")
    assert visible_rows(page) == 1
    page.fill("#f-text", "")
    page.check("#f-twice")
    assert visible_rows(page) == 1
    page.close()
    # a question opened by its address shows its token stream; the baseline's own report shows turn text
    page, more = open_page(browser, path, "#traj=1")
    page.wait_for_selector("#stream")
    assert page.locator("#stream .tok-sampled").count() > 0
    baseline, most = open_page(browser, report.write_report(eval_folders.parent / "first_title"), "#traj=0")
    baseline.wait_for_selector("#turns")
    assert baseline.locator("#stream").count() == 0 and baseline.locator("#turns .turn").count() >= 2
    assert errors + more + most == []
