"""One self-contained HTML page about a training run or an eval: curves, config, and trajectories token by token.

`write_report(folder)` reads what train.py or eval.py left in `folder` and writes `folder/report.html`: one file that
opens from disk in any browser and can be mailed. Styles and the script are inline, the plots are hand-written SVG,
the data is embedded as JSON; nothing is fetched (the page has no `src` or `href` to another place; links inside a
trajectory stay plain text).
- A training run (metrics.jsonl, config.json, rollouts/step_NNNNNN.jsonl): the curves per step, the config (what
  differs from train.py's defaults, and all of it), and the trajectories dumped at each step.
- An eval (trajectories.jsonl, summary.json, run.json, config.json): the summary per source and template beside the
  baselines run into sibling folders (first_title, closed_book, the base model: detected from their run.json /
  config.json and compared on the questions both answered), then every question with filters and a text search.
- A trajectory: the exact token stream the trainer saw (token ids decoded one by one with the folder's tokenizer),
  coloured by kind: prompt, sampled by the policy (loss mask 1; hover shows its log-prob), forced text (mask 0, the
  turn prefixes and the chat template's frame around an observation) and tool observation (mask 0). Records
  without token ids (older dumps, the first_title baseline) show their turns' text instead.

Not here: any server, a JS framework, wandb; the report does not run a model (the tokenizer only decodes ids).
Large runs stay light: at most MAX_STEPS dumped steps (spread over the run) and TOKEN_BUDGET token ids in all.

Run: `python eval.py --report=<run or eval folder>` (train.py and eval.py also write it at their end), or
`python report.py <folder>`. Tests: `python -m pytest -q tests/test_report.py` (headless Chromium).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import html
import json
import math
import sys
from pathlib import Path

MAX_STEPS = 60           # training steps whose dumped trajectories are embedded (spread evenly, first and last kept)
TOKEN_BUDGET = 300_000   # token ids embedded per page, ~6 bytes each (later records show their turn text)
MAX_OBS_CHARS = 4000     # observation text kept per turn where a record has no tokens
KIND_LETTERS = {"prompt": "p", "sampled": "s", "forced": "f", "observation": "o"}  # the page's KIND, reversed

# the training curves: (title, [(metrics key, label)], y format). Rates are shown as percentages.
CURVES = [
    ("reward (mean over trajectories)", [("reward", "reward")], "num"),
    ("training F1 / EM", [("f1", "F1"), ("em", "EM")], "pct"),
    ("format errors", [("format_error", "format error rate")], "pct"),
    ("dev F1 (greedy, the learning curve)", [("dev_f1", "dev F1")], "pct"),
    ("entropy of sampled tokens", [("entropy", "entropy")], "num"),
    ("groups with equal rewards", [("zero_var_groups", "share of groups")], "pct"),
    ("calls and turns per trajectory", [("search_calls", "searches"), ("browse_calls", "browses"),
                                        ("turns", "turns")], "num"),
    ("response length (sampled tokens)", [("response_len", "sampled tokens")], "num"),
    ("KL to the initial model", [("kl", "kl")], "num"),
    ("gradient norm", [("grad_norm", "grad norm")], "num"),
    ("seconds per step", [("time_rollout", "rollout"), ("time_learn", "update")], "num"),
    ("what the policy did (sampled)", [("searched_twice", "searched 2+"),
                                       ("bridge_in_later_query", "bridge entity in a later query"),
                                       ("answer_is_title", "answer is a title")], "pct"),
    ("what the policy did on dev (greedy)", [("dev_searched_twice", "searched 2+"),
                                             ("dev_bridge_in_later_query", "bridge entity in a later query"),
                                             ("dev_answer_is_title", "answer is a title")], "pct"),
]
CHART_W, CHART_H = 300, 190  # four charts to a row on a laptop screen
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
END_COLORS = {"answer": "#2ca02c", "format_error": "#d62728", "bad_call": "#ff7f0e", "max_turns": "#9467bd",
              "context_limit": "#8c564b", "tool_failure": "#7f7f7f", "engine_error": "#000000"}


# ----------------------------------------------------------------------------------------------- reading the folder

def read_jsonl(path: Path) -> list[dict]:
    """JSON lines; a torn last line (a run killed mid-write) is skipped, not fatal."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def folder_kind(folder: Path) -> str:
    if (folder / "metrics.jsonl").exists():
        return "train"
    if (folder / "trajectories.jsonl").exists():
        return "eval"
    raise ValueError(f"{folder} holds neither metrics.jsonl (a train.py run) nor trajectories.jsonl (an eval.py run):"
                     " pass the out_dir of one of them")


def config_changes(config: dict, kind: str) -> tuple[dict, dict]:
    """The settings that differ from the entry script's defaults (train.Config or eval.Config), and those that
    differ from the paper's recipe (its `deepresearcher` preset) with the recipe's value."""
    if kind == "train":
        from train import PRESETS, Config
    else:
        from eval import PRESETS, Config
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    paper = {**defaults, **PRESETS.get("deepresearcher", {})}
    changed = {k: v for k, v in config.items() if k not in defaults or defaults[k] != v}
    # where the recipe says nothing about a run's place or bookkeeping, a difference is no departure
    bookkeeping = {"out_dir", "data", "eval_data", "resume", "overwrite", "device", "n_slots", "cache", "dry_run"}
    departures = {k: [v, paper[k]] for k, v in config.items() if k in paper and paper[k] != v and k not in bookkeeping}
    return changed, departures


# ----------------------------------------------------------------------------------------------- tokens

def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def tokenizer_folder(folder: Path, config: dict, run: dict) -> str | None:
    """Where the folder's model keeps its tokenizer, found offline: the path train.py / eval.py resolved, a
    checkpoint of the run, else data.models.resolve_model (hub ids only from the local cache). None: none found."""
    candidates = [config.get("resolved_model_path"), run.get("model_path"), config.get("model")]
    candidates += [str(p) for p in sorted((folder / "ckpt").glob("*/hf"))[::-1]]
    for c in candidates:
        if c and _has_tokenizer(Path(c)):
            return c
    if not config.get("model"):
        return None
    import huggingface_hub.constants

    from data.models import resolve_model
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # a report never downloads: the cache or nothing
    try:
        path = resolve_model(config["model"])
    except (OSError, RuntimeError, ValueError) as e:  # not cached, not a folder: the page shows turn text
        print(f"report: no tokenizer for {config['model']!r} offline ({type(e).__name__}); showing turn text")
        return None
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline
    return path if _has_tokenizer(Path(path)) else None


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


class Pieces:
    """Each token's text, decoded on its own (cached per id), interned in one table the page shares. The tokenizer
    is found and loaded on first use: a folder whose records hold no token ids (first_title) never needs it."""

    def __init__(self, find_tokenizer):
        self.find_tokenizer = find_tokenizer  # () -> tokenizer folder or None
        self.budget = TOKEN_BUDGET  # token ids the page may still embed
        self.by_id: dict[int, str] = {}
        self.table: list[str] = []
        self.index: dict[str, int] = {}

    @functools.cached_property
    def path(self) -> str | None:
        return self.find_tokenizer()

    @functools.cached_property
    def tok(self):
        return load_tokenizer(self.path) if self.path else None

    def intern(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.table)
            self.table.append(text)
        return self.index[text]

    def text(self, token: int) -> str:
        if token not in self.by_id:
            self.by_id[token] = self.tok.decode([token], skip_special_tokens=False)
        return self.by_id[token]

    def of(self, tokens: list[int]) -> list[int]:
        """Table indices of the tokens' texts. A character that byte-level BPE splits over several tokens decodes
        to U+FFFD token by token: such a run is decoded together, its text given to its first token ("" after)."""
        texts = [self.text(t) for t in tokens]
        i = 0
        while i < len(texts):
            if "\ufffd" not in texts[i]:
                i += 1
                continue
            j = i
            while j < len(texts) and "\ufffd" in texts[j]:
                j += 1
            joined = self.tok.decode(tokens[i:j], skip_special_tokens=False)
            if "\ufffd" not in joined:
                texts[i:j] = [joined] + [""] * (j - i - 1)
            i = j
        return [self.intern(t) for t in texts]


def _find(haystack: list[int], needle: list[int], start: int, end: int) -> int:
    """First position of `needle` inside haystack[start:end], or -1."""
    n = len(needle)
    for i in range(start, end - n + 1):
        if haystack[i:i + n] == needle:
            return i
    return -1


def token_kinds(rec: dict, tokenizer) -> tuple[str, bool]:
    """One letter per token (KIND_LETTERS) and whether every observation was located.

    The loss mask says prompt (before prompt_len), sampled (1) or forced (0). Among the forced tokens after the
    prompt, rollout.py appends after turn k (when it ran a call or answered a bad one) the chat frame, then
    tokenizer.encode(defang(observation)) encoded on its own, then the closing frame and the next turn's prefix.
    So the observation's ids appear verbatim in the forced run that follows turn k's sampled tokens: that exact
    sub-sequence is the observation, the rest of the run is forced text. No token id is guessed from text."""
    from rollout import defang

    tokens, mask, prompt_len = rec["tokens"], rec["loss_mask"], rec.get("prompt_len", 0)
    letter = KIND_LETTERS
    kinds = [letter["prompt"] if i < prompt_len else letter["sampled"] if m else letter["forced"]
             for i, m in enumerate(mask)]
    specials = list(getattr(tokenizer, "all_special_tokens", []))
    turns, located = rec.get("turns") or [], True
    turn, i = -1, prompt_len  # turn: index of the last sampled run seen
    while i < len(tokens):
        j = i
        while j < len(tokens) and mask[j] == mask[i]:
            j += 1
        if mask[i]:
            turn += 1
        elif turn >= 0 and turn < len(turns) and turns[turn].get("observation"):
            ids = tokenizer.encode(defang(turns[turn]["observation"], specials), add_special_tokens=False)
            at = _find(tokens, ids, i, j)
            if at >= 0:
                kinds[at:at + len(ids)] = [letter["observation"]] * len(ids)
            else:  # (never seen: the dump and the tokenizer disagree) left as forced, and the page says so
                located = False
        i = j
    return "".join(kinds), located


def token_view(rec: dict, pieces: Pieces) -> dict | None:
    """What the page needs to draw a record token by token, or None (no token ids, no tokenizer, or the page's
    token budget is spent)."""
    if not rec.get("tokens") or len(rec.get("loss_mask") or []) != len(rec["tokens"]):
        return None
    if pieces.budget < len(rec["tokens"]) or pieces.tok is None:
        return None
    pieces.budget -= len(rec["tokens"])
    kinds, located = token_kinds(rec, pieces.tok)
    logprobs = rec.get("logprobs") or [0.0] * len(kinds)
    return {"t": pieces.of(rec["tokens"]), "k": kinds, "located": located,
            "lp": [round(float(lp), 4) for lp, k in zip(logprobs, kinds) if k == KIND_LETTERS["sampled"]]}


def light_turns(turns: list[dict], with_observations: bool) -> list[dict]:
    """The turns as the page shows them: the observation (cut) only where there is no token stream holding it."""
    out = []
    for t in turns or []:
        obs = t.get("observation")
        if obs and not with_observations:
            obs = None
        elif obs and len(obs) > MAX_OBS_CHARS:
            obs = obs[:MAX_OBS_CHARS] + f" [... {len(obs) - MAX_OBS_CHARS} more characters]"
        out.append({"text": t.get("text", ""), "tool": t.get("tool"), "args": t.get("args"), "observation": obs,
                    "error": t.get("error"), "n_tokens": t.get("n_tokens")})
    return out


def trajectory_entry(rec: dict, pieces: Pieces, **extra) -> dict:
    """One row of the page's trajectory list: what the table shows, and the trajectory for the panel."""
    view = token_view(rec, pieces)
    scores = rec.get("scores") or {}
    stats = rec.get("stats") or {}
    f1 = scores.get("f1", rec.get("f1"))
    gold = rec.get("gold") or []
    return {"question": rec.get("question", ""), "gold": [gold] if isinstance(gold, str) else list(gold),
            "answer": rec.get("answer"),
            "f1": f1, "em": scores.get("em", rec.get("em")), "reward": scores.get("reward", rec.get("reward")),
            "advantage": rec.get("advantage"), "end_reason": rec.get("end_reason", ""),
            "searches": stats.get("n_search", 0), "browses": stats.get("n_browse", 0),
            "n_turns": len(rec.get("turns") or []), "n_tokens": rec.get("n_tokens"),
            "turns": light_turns(rec.get("turns"), with_observations=view is None), "tokens": view,
            "tokens_left_out": view is None and bool(rec.get("tokens")), **extra}


# ----------------------------------------------------------------------------------------------- SVG plots

def nice_ticks(lo: float, hi: float, n: int = 5, integers: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi] (whole numbers only with `integers`: steps)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    step = max(1, round(step)) if integers else step
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float, style: str) -> str:
    if style == "pct":
        return f"{100 * v:.0f}%"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def line_chart(title: str, series: list[tuple[str, list, list]], style: str = "num", steps: tuple = (0, 1),
               width: int = CHART_W, height: int = CHART_H) -> str:
    """An SVG line chart: series of (label, steps, values) over the run's steps (first, last); a point per value
    when there are few."""
    left, right, top, bottom = 46, 10, 24, 36
    ys = [y for _, _, sy in series for y in sy]
    if not ys:
        return ""
    ticks = nice_ticks(min(ys + [0.0] if style == "pct" else ys), max(ys + [1.0] if style == "pct" else ys))
    x0, x1 = steps[0], max(steps[1], steps[0] + 1)
    y0, y1 = ticks[0], ticks[-1]
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda y: top + (y1 - y) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{left}" y="14" class="ctitle">{html.escape(title)}</text>']
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{py(t) + 4:.1f}" class="ylab">{_fmt(t, style)}</text>')
    for t in nice_ticks(x0, x1, 6, integers=True):
        if x0 <= t <= x1:
            out.append(f'<text x="{px(t):.1f}" y="{height - bottom + 14}" class="xlab">{t:g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" class="xlab">step</text>')
    for n, (label, sx, sy) in enumerate(series):
        color = COLORS[n % len(COLORS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(sx) <= 60:
            for x, y in zip(sx, sy):
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.4" fill="{color}">'
                           f'<title>{html.escape(label)} at step {x:g}: {_fmt(y, "num")}</title></circle>')
        if len(series) > 1:
            out.append(f'<text x="{left + 6 + 70 * n}" y="{top + 10}" style="fill:{color}" class="legend">'
                       f'{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def stacked_chart(title: str, steps: list, shares: dict[str, list[float]], width: int = CHART_W,
                  height: int = CHART_H) -> str:
    """An SVG stacked area of shares per step (end reasons): each band from the running sum."""
    left, right, top, bottom = 46, 10, 24, 36
    if not steps:
        return ""
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda y: top + (1 - y) * (height - top - bottom)  # noqa: E731
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{left}" y="14" class="ctitle">{html.escape(title)}</text>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{py(t) + 4:.1f}" class="ylab">{100 * t:.0f}%</text>')
    for t in nice_ticks(x0, x1, 6, integers=True):
        if x0 <= t <= x1:
            out.append(f'<text x="{px(t):.1f}" y="{height - bottom + 14}" class="xlab">{t:g}</text>')
    below = [0.0] * len(steps)
    legend_x = left + 6
    for reason, share in shares.items():
        above = [b + s for b, s in zip(below, share)]
        if len(steps) == 1:  # one step: a bar, not an area
            xs_top, xs_bottom = [x0 - 0.4, x0 + 0.4], [x0 + 0.4, x0 - 0.4]
            top_pts, bottom_pts = [above[0]] * 2, [below[0]] * 2
        else:
            xs_top, xs_bottom, top_pts, bottom_pts = steps, steps[::-1], above, below[::-1]
        poly = [f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs_top, top_pts)]
        poly += [f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs_bottom, bottom_pts)]
        color = END_COLORS.get(reason, "#bbbbbb")
        out.append(f'<polygon points="{" ".join(poly)}" fill="{color}" fill-opacity="0.75">'
                   f'<title>{html.escape(reason)}</title></polygon>')
        out.append(f'<text x="{legend_x}" y="{height - 2}" style="fill:{color}" class="legend">'
                   f'{html.escape(reason)}</text>')
        legend_x += 8 + 6 * len(reason)
        below = above
    out.append("</svg>")
    return "".join(out)


def training_charts(metrics: list[dict]) -> str:
    if not metrics:
        return '<p class="muted">metrics.jsonl has no steps yet</p>'
    run_steps = (min(m["step"] for m in metrics), max(m["step"] for m in metrics))
    charts = []
    for title, keys, style in CURVES:
        series = [(label, [m["step"] for m in metrics if m.get(key) is not None],
                   [float(m[key]) for m in metrics if m.get(key) is not None]) for key, label in keys]
        series = [s for s in series if s[1]]
        if series:
            charts.append(line_chart(title, series, style, run_steps))
    reasons = sorted({k[4:] for m in metrics for k in m if k.startswith("end_")},
                     key=lambda r: list(END_COLORS).index(r) if r in END_COLORS else 99)
    steps = [m["step"] for m in metrics]
    totals = [sum(m.get(f"end_{r}", 0) for r in reasons) or 1 for m in metrics]
    shares = {r: [m.get(f"end_{r}", 0) / t for m, t in zip(metrics, totals)] for r in reasons}
    shares = {r: s for r, s in shares.items() if any(s)}
    if shares:
        charts.insert(7, stacked_chart("end reasons (share of trajectories)", steps, shares))
    return "".join(f'<div class="chartbox">{c}</div>' for c in charts)


# ----------------------------------------------------------------------------------------------- the two views

def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def spread(items: list, k: int) -> list:
    """At most k items, evenly spread, the first and the last kept."""
    if len(items) <= k:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def training_data(folder: Path, pieces: Pieces) -> dict:
    metrics = read_jsonl(folder / "metrics.jsonl")
    dumps = sorted((folder / "rollouts").glob("step_*.jsonl"))
    chosen = spread(dumps, MAX_STEPS)
    rows = []
    for path in chosen:
        step = int(path.stem.split("_")[1])
        for n, rec in enumerate(read_jsonl(path)):
            rows.append(trajectory_entry(rec, pieces, step=step, n=n))
    last = metrics[-1] if metrics else {}
    dev = [(m["step"], m["dev_f1"]) for m in metrics if m.get("dev_f1") is not None]
    facts = {"steps logged": len(metrics), "last step": last.get("step"),
             "last reward": last.get("reward"), "last training F1": _pct(last.get("f1")),
             "last dev F1": f"{_pct(dev[-1][1])} at step {dev[-1][0]}" if dev else None,
             "trajectories shown": f"{len(rows)} from {len(chosen)} of {len(dumps)} dumped steps"}
    return {"charts": training_charts(metrics), "rows": rows, "facts": facts}


def eval_label(config: dict, run: dict) -> str:
    """A baseline's name as a reader knows it: first_title, closed_book (model), or the model's short name."""
    from eval import model_tag

    agent = config.get("agent") or run.get("agent") or "model"
    model = model_tag(config.get("model") or run.get("model") or "?")
    return agent if agent == "first_title" else f"{agent} ({model})" if agent != "model" else model


def group_means(records: list[dict], ids: set) -> dict[str, tuple[float, int]]:
    """Mean F1 and n per source, per template and overall over the records whose id is in `ids`."""
    groups: dict[str, list[float]] = {}
    for r in records:
        if r.get("id") not in ids:
            continue
        f1 = (r.get("scores") or {}).get("f1", 0.0)
        for name in (r.get("source", "?"), f"template: {r['template']}" if r.get("template") else None, "overall"):
            if name:
                groups.setdefault(name, []).append(f1)
    return {k: (sum(v) / len(v), len(v)) for k, v in groups.items()}


def eval_data(folder: Path, pieces: Pieces) -> dict:
    records = list({r["id"]: r for r in read_jsonl(folder / "trajectories.jsonl")}.values())
    summary = read_json(folder / "summary.json").get("metrics")
    if summary is None and records and all("scores" in r for r in records):  # an eval stopped before its summary
        from eval import summarize
        summary = summarize(records)
    summary = summary or {}
    ids = {r["id"] for r in records}
    # baselines: sibling eval folders (same parent), compared on the questions both runs answered
    baselines = []
    for sibling in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p.resolve() != folder.resolve()):
        if not (sibling / "trajectories.jsonl").exists() or not (
                (sibling / "run.json").exists() or (sibling / "config.json").exists()):
            continue
        theirs = {r["id"]: r for r in read_jsonl(sibling / "trajectories.jsonl") if "scores" in r}
        common = ids & set(theirs)
        if not common:
            continue
        baselines.append({"name": eval_label(read_json(sibling / "config.json"), read_json(sibling / "run.json")),
                          "folder": sibling.name, "means": group_means(list(theirs.values()), common),
                          "mine": group_means(records, common), "f1": {i: theirs[i]["scores"]["f1"] for i in common}})
    rows = []
    for rec in records:
        extra = {"id": rec["id"], "source": rec.get("source", ""), "template": rec.get("template", ""),
                 "baseline_f1": [b["f1"].get(rec["id"]) for b in baselines]}
        rows.append(trajectory_entry(rec, pieces, **extra))
    for b in baselines:
        del b["f1"]
    overall = summary.get("overall") or {}
    facts = {"questions": len(records), "F1": _pct(overall.get("f1")), "EM": _pct(overall.get("em")),
             "format errors": _pct(overall.get("format_error_rate")),
             "searches per question": overall.get("mean_search"),
             "baselines found beside it": ", ".join(b["name"] for b in baselines) or "none"}
    return {"summary": summary, "baselines": baselines, "rows": rows, "facts": facts}


# ----------------------------------------------------------------------------------------------- the page

def write_report(folder: str | Path) -> Path:
    """Write folder/report.html for a train.py run or an eval.py folder; returns its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass a train.py out_dir or an eval.py out_dir")
    kind = folder_kind(folder)
    config, run = read_json(folder / "config.json"), read_json(folder / "run.json")
    pieces = Pieces(lambda: tokenizer_folder(folder, config, run))
    data = training_data(folder, pieces) if kind == "train" else eval_data(folder, pieces)
    changes, departures = config_changes(config, kind) if config else ({}, {})
    data.update(kind=kind, folder=str(folder.resolve()), model=config.get("model") or run.get("model"),
                agent=config.get("agent"), tokenizer=pieces.path if pieces.table else None, config=config,
                changes=changes, departures=departures,
                pieces=pieces.table, written=_dt.datetime.now().isoformat(timespec="seconds"))
    charts = data.pop("charts", "")
    # JSON inside <script type="application/json">: every "<" escaped, so no text can close the tag
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = f"{'training run' if kind == 'train' else 'eval'} {folder.resolve().name}"
    page = (PAGE.replace("__TITLE__", html.escape(title)).replace("__CSS__", CSS).replace("__CHARTS__", charts)
            .replace("__JS__", JS).replace("__DATA__", payload))
    out = folder / "report.html"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>__CSS__</style></head>
<body>
<header><h1>__TITLE__</h1><div id="facts"></div></header>
<section id="curves-section" class="train-only"><h2>Curves per step</h2><div class="charts">__CHARTS__</div></section>
<section id="summary-section" class="eval-only"><h2>Summary beside the baselines</h2><div id="summary"></div></section>
<section id="rows-section"><h2 id="rows-title">Trajectories</h2>
<div id="filters" class="filters"></div><div id="count" class="muted"></div>
<div class="tablewrap"><table id="rows"><thead></thead><tbody></tbody></table></div></section>
<section id="traj-section" hidden><h2>Trajectory</h2><div id="traj"></div></section>
<section id="config-section"><h2>Config</h2><div id="config"></div></section>
<footer class="muted" id="footer"></footer>
<script type="application/json" id="data">__DATA__</script>
<script>__JS__</script>
</body></html>
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1320px;padding:0 18px 40px;
color:#1d1d1f}
h1{font-size:20px;margin:16px 0 6px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:13px;margin:8px 0 4px;font-weight:600}
.muted{color:#666;font-size:12px}
#facts span{display:inline-block;margin:0 14px 4px 0}#facts b{font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:8px}.chartbox{border:1px solid #e3e3e3;border-radius:4px;background:#fff}
.chart .grid{stroke:#eee}.chart text{font-size:10px;fill:#555}.chart .ctitle{font-size:12px;fill:#111;font-weight:600}
.chart .ylab{text-anchor:end}.chart .xlab{text-anchor:middle}.chart .legend{font-size:10px}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 7px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f6f6f6;position:sticky;top:0}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}
#rows tbody tr{cursor:pointer}#rows tbody tr:hover{background:#f2f7ff}#rows tbody tr.sel{background:#e4eeff}
.tablewrap{max-height:520px;overflow:auto;border:1px solid #e3e3e3}
.filters{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:6px 0}
.filters input[type=search]{width:260px}
.good{color:#1a7f37}.bad{color:#c62828}
.stream{white-space:pre-wrap;word-break:break-word;font:12.5px/1.7 ui-monospace,Menlo,Consolas,monospace;
border:1px solid #ddd;padding:8px;background:#fff}
.tok{border-radius:2px;box-shadow:inset -1px 0 0 rgba(255,255,255,.95)}
.tok-prompt{background:#ececec;color:#555}
.tok-sampled{background:#c9f2c7;color:#0b3d0b}
.tok-sampled:hover{outline:1px solid #1a7f37}
.tok-forced{background:#ffe3a3;color:#5a3b00}
.tok-observation{background:#d6e6ff;color:#0d2a57}
.legend-tok{display:inline-block;padding:0 6px;margin-right:8px;border-radius:2px;font-size:12px}
details.obs,details.prompt{display:block;margin:4px 0;border-left:3px solid #9ab8e8;padding-left:6px}
details.prompt{border-left-color:#bbb}
details summary{cursor:pointer;font:12px system-ui,sans-serif;color:#333}
.turnmark{display:inline-block;font:11px system-ui,sans-serif;background:#333;color:#fff;border-radius:3px;
padding:0 5px;margin:0 4px}
.kv span{display:inline-block;margin-right:16px}
.turn{border:1px solid #ddd;margin:6px 0;padding:6px;background:#fff}
.turn pre{white-space:pre-wrap;margin:4px 0;font-size:12.5px}
pre.config{font-size:12px;background:#f8f8f8;padding:8px}
"""

JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const KIND = {p: "prompt", s: "sampled", f: "forced", o: "observation"};
const $ = (sel) => document.querySelector(sel);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}
const pct = (v) => (v === null || v === undefined) ? "-" : (100 * v).toFixed(1);
const num = (v, d = 2) => (v === null || v === undefined) ? "-" : (+v).toFixed(d);
const answerText = (a) => (a === null || a === undefined) ? "(none)" : a;

function showFacts() {
  const f = $("#facts");
  const facts = Object.assign({model: D.model, agent: D.agent}, D.facts);
  for (const [k, v] of Object.entries(facts)) {
    if (v === null || v === undefined) continue;
    const shown = (typeof v === "number" && !Number.isInteger(v)) ? v.toFixed(3) : String(v);
    f.append(el("span", {}, el("b", {text: k + ": "}), shown));
  }
  $("#footer").textContent = "written " + D.written + " from " + D.folder +
    (D.tokenizer ? " · tokens decoded with the tokenizer of " + D.tokenizer :
      " · no tokenizer found: turn text only");
  for (const e of document.querySelectorAll(D.kind === "train" ? ".eval-only" : ".train-only")) e.remove();
}

function showSummary() {
  if (D.kind !== "eval") return;
  const s = D.summary;
  // sources first, then templates, overall last
  const rank = (name) => name === "overall" ? 2 : name.startsWith("template: ") ? 1 : 0;
  const names = Object.keys(s).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  const t = el("table", {id: "summary-table"});
  const head = el("tr", {}, el("th", {text: "source / template"}), el("th", {class: "num", text: "n"}),
    el("th", {class: "num", text: "F1"}), el("th", {class: "num", text: "EM"}),
    el("th", {class: "num", text: "format err"}), el("th", {class: "num", text: "searches"}),
    el("th", {class: "num", text: "turns"}));
  for (const b of D.baselines) {
    head.append(el("th", {class: "num", title: "on the questions both runs answered (folder " + b.folder + ")",
      text: "F1 " + b.name}));
  }
  t.append(el("thead", {}, head));
  const body = el("tbody");
  for (const name of names) {
    const r = s[name];
    const tr = el("tr", {}, el("td", {text: name}),
      el("td", {class: "num", text: r.n}), el("td", {class: "num", text: pct(r.f1)}),
      el("td", {class: "num", text: pct(r.em)}), el("td", {class: "num", text: pct(r.format_error_rate)}),
      el("td", {class: "num", text: num(r.mean_search)}), el("td", {class: "num", text: num(r.mean_turns)}));
    for (const b of D.baselines) {
      const mine = b.mine[name], theirs = b.means[name];
      // on fewer questions than this row: say so, with this run's F1 on the same ones
      const note = theirs && theirs[1] !== r.n ? " (on " + theirs[1] + " q.; this run " + pct(mine[0]) + ")" : "";
      tr.append(el("td", {class: "num", text: theirs ? pct(theirs[0]) + note : "-"}));
    }
    body.append(tr);
  }
  t.append(body);
  $("#summary").append(t, el("div", {class: "muted",
    text: "Scores in %. Baselines: the eval folders found beside this one, each scored on the questions both " +
          "runs answered."}));
}

// ---------------------------------------------------------------- the table of trajectories / questions
const COLS = D.kind === "train" ? [
  ["step", (r) => r.step, "num"], ["question", (r) => r.question], ["gold", (r) => r.gold.join(" | ")],
  ["answer", (r) => answerText(r.answer)], ["reward", (r) => num(r.reward), "num"],
  ["advantage", (r) => num(r.advantage), "num"], ["F1", (r) => pct(r.f1), "num"],
  ["searches", (r) => r.searches, "num"], ["turns", (r) => r.n_turns, "num"], ["end", (r) => r.end_reason]]
: [
  ["#", (r, i) => i + 1, "num"], ["source", (r) => r.source], ["template", (r) => r.template],
  ["question", (r) => r.question], ["gold", (r) => r.gold.join(" | ")], ["answer", (r) => answerText(r.answer)],
  ["F1", (r) => pct(r.f1), "num"], ["searches", (r) => r.searches, "num"], ["turns", (r) => r.n_turns, "num"],
  ["end", (r) => r.end_reason]].concat(D.baselines.map((b, j) =>
    ["F1 " + b.name, (r) => pct(r.baseline_f1[j]), "num"]));

const filterState = {wrong: false, twice: false, template: "", end: "", step: "", text: ""};
function distinct(key) {
  return [...new Set(D.rows.map((r) => String(r[key])))].sort();
}
function selectFilter(id, label, key, values) {
  const s = el("select", {id: id}, el("option", {value: "", text: "all"}));
  for (const v of values) s.append(el("option", {value: v, text: v}));
  s.addEventListener("change", () => {
    filterState[key] = s.value;
    renderRows();
  });
  return el("label", {}, label + " ", s);
}
function checkFilter(id, label, key) {
  const c = el("input", {type: "checkbox", id: id});
  c.addEventListener("change", () => {
    filterState[key] = c.checked;
    renderRows();
  });
  return el("label", {}, c, " " + label);
}
function buildFilters() {
  const f = $("#filters");
  f.append(checkFilter("f-wrong", "wrong only (no exact match)", "wrong"));
  if (D.kind === "train") f.append(selectFilter("f-step", "step", "step", distinct("step")));
  else f.append(selectFilter("f-template", "template", "template", distinct("template")));
  f.append(selectFilter("f-end", "end reason", "end", distinct("end_reason")));
  f.append(checkFilter("f-twice", "searched twice or more", "twice"));
  const q = el("input", {type: "search", id: "f-text", placeholder: "search question, gold, answer, turns"});
  q.addEventListener("input", () => {
    filterState.text = q.value.toLowerCase();
    renderRows();
  });
  f.append(q);
}
function haystack(r) {
  if (r._hay === undefined) {
    r._hay = [r.question, r.gold.join(" "), answerText(r.answer)].concat(r.turns.map((t) => t.text))
      .join("\n").toLowerCase();
  }
  return r._hay;
}
function keep(r) {
  const s = filterState;
  if (s.wrong && r.em === 1) return false;
  if (s.wrong && r.em === undefined && r.f1 === 1) return false;
  if (s.twice && r.searches < 2) return false;
  if (s.template && String(r.template) !== s.template) return false;
  if (s.step && String(r.step) !== s.step) return false;
  if (s.end && r.end_reason !== s.end) return false;
  if (s.text && !haystack(r).includes(s.text)) return false;
  return true;
}
function renderRows() {
  $("#rows-title").textContent = D.kind === "train" ? "Trajectories dumped per step" : "Every question";
  const thead = $("#rows thead"), tbody = $("#rows tbody");
  thead.replaceChildren(el("tr", {}, ...COLS.map(([name, , c]) => el("th", {class: c || "", text: name}))));
  const rows = [];
  D.rows.forEach((r, i) => {
    if (!keep(r)) return;
    const tr = el("tr", {"data-i": i});
    for (const [, get, c] of COLS) tr.append(el("td", {class: c || "", text: String(get(r, i))}));
    if (r.f1 !== null && r.f1 !== undefined) tr.children[COLS.findIndex((c) => c[0] === "F1")].className +=
      r.f1 >= 0.999 ? " good" : r.f1 <= 0 ? " bad" : "";
    tr.addEventListener("click", () => {
      location.hash = "traj=" + i;
    });
    rows.push(tr);
  });
  tbody.replaceChildren(...rows);
  $("#count").textContent = "showing " + rows.length + " of " + D.rows.length + " (click a row for its trajectory)";
}

// ---------------------------------------------------------------- one trajectory
function toolCall(t) {
  if (!t.tool) return t.error ? "no call (" + t.error + ")" : "no call";
  const args = t.args ? Object.values(t.args).flat().join(" | ") : "";
  return t.tool + ": " + args;
}
function tokenStream(r) {
  const v = r.tokens, box = el("div", {class: "stream", id: "stream"});
  let i = 0, lpIndex = 0, turn = -1;
  while (i < v.k.length) {
    let j = i;
    while (j < v.k.length && v.k[j] === v.k[i]) j++;
    const kind = KIND[v.k[i]];
    let holder = box;
    if (kind === "prompt") {
      holder = el("details", {class: "prompt"}, el("summary", {text: "prompt (" + (j - i) + " tokens)"}));
      box.append(holder);
    } else if (kind === "observation") {
      const t = r.turns[turn] || {};
      const what = "observation of turn " + (turn + 1) + " · " + toolCall(t) + " (" + (j - i) + " tokens)";
      holder = el("details", {class: "obs"}, el("summary", {text: what}));
      box.append(holder);
    } else if (kind === "sampled") {
      turn++;
      box.append(el("span", {class: "turnmark", text: "turn " + (turn + 1)}));
    }
    for (let n = i; n < j; n++) {
      const span = el("span", {class: "tok tok-" + kind, text: D.pieces[v.t[n]]});
      if (kind === "sampled") {
        const lp = v.lp[lpIndex++];
        span.title = "log p = " + lp.toFixed(4) + "  (p = " + Math.exp(lp).toFixed(3) + ")";
      }
      holder.append(span);
    }
    i = j;
  }
  return box;
}
function turnList(r) {
  const box = el("div", {id: "turns"});
  r.turns.forEach((t, n) => {
    const d = el("div", {class: "turn"}, el("b", {text: "turn " + (n + 1) + " · " + toolCall(t)}),
      el("pre", {class: "turntext", text: t.text}));
    if (t.observation) {
      d.append(el("details", {class: "obs"}, el("summary", {text: "observation"}), el("pre", {text: t.observation})));
    }
    if (t.error) d.append(el("div", {class: "muted", text: "error: " + t.error}));
    box.append(d);
  });
  return box;
}
function showTrajectory(i) {
  const r = D.rows[i];
  if (!r) return;
  for (const tr of document.querySelectorAll("#rows tbody tr")) tr.classList.toggle("sel", tr.dataset.i == i);
  const box = $("#traj");
  box.replaceChildren();
  const kv = el("div", {class: "kv"});
  const facts = [["question", r.question], ["gold", r.gold.join(" | ")], ["answer", answerText(r.answer)],
    ["F1", pct(r.f1)], ["reward", num(r.reward, 3)], ["advantage", r.advantage === undefined || r.advantage === null ?
    null : num(r.advantage, 3)], ["end reason", r.end_reason], ["step", r.step], ["searches", r.searches],
    ["tokens", r.n_tokens]];
  for (const [k, v] of facts) if (v !== null && v !== undefined) kv.append(el("span", {}, el("b", {text: k + ": "}),
    String(v)));
  box.append(kv);
  if (r.tokens) {
    const legend = el("div", {class: "legend"});
    for (const k of ["prompt", "sampled", "forced", "observation"]) {
      const label = {prompt: "prompt", sampled: "sampled by the policy (loss mask 1, hover: log-prob)",
        forced: "forced text (mask 0)", observation: "tool observation (mask 0)"}[k];
      legend.append(el("span", {class: "legend-tok tok-" + k, text: label}));
    }
    const counts = {};
    for (const c of r.tokens.k) counts[c] = (counts[c] || 0) + 1;
    box.append(legend, el("div", {class: "muted", text: Object.entries(counts).map(([c, n]) => KIND[c] + " " + n)
      .join(" · ") + (r.tokens.located ? "" : " · an observation could not be located: its tokens show as forced")}),
      tokenStream(r));
    const calls = el("details", {}, el("summary", {text: "turns as text (tool calls and errors)"}), turnList(r));
    box.append(calls);
  } else {
    const why = r.tokens_left_out ? "its token ids are left out of this page (the page's token budget is spent)" :
      "no token ids in this record (an older dump, a no-model baseline, or no tokenizer found)";
    box.append(el("div", {class: "muted", text: why + ": its turns' text"}), turnList(r));
  }
  $("#traj-section").hidden = false;
}
function onHash() {
  const m = /traj=(\d+)/.exec(location.hash);
  if (!m) return;
  showTrajectory(+m[1]);
  $("#traj-section").scrollIntoView();
}

function showConfig() {
  const c = $("#config");
  const script = D.kind === "train" ? "train.py" : "eval.py";
  const changed = Object.entries(D.changes).map(([k, v]) => el("tr", {}, el("td", {text: k}),
    el("td", {text: JSON.stringify(v)})));
  const departed = Object.entries(D.departures).map(([k, [v, paper]]) => el("tr", {}, el("td", {text: k}),
    el("td", {text: JSON.stringify(v)}), el("td", {class: "muted", text: JSON.stringify(paper)})));
  c.append(el("h3", {text: "what differs from the defaults of " + script}),
    el("table", {id: "changes"}, el("tbody", {}, ...changed)),
    el("details", {id: "departures"}, el("summary", {text: "departures from the paper's recipe (" + script +
      " --preset=deepresearcher): " + departed.length + " settings"}),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {text: "setting"}), el("th", {text: "this run"}),
        el("th", {text: "the paper's recipe"}))), el("tbody", {}, ...departed))),
    el("details", {}, el("summary", {text: "the full config"}),
      el("pre", {class: "config", text: JSON.stringify(D.config, null, 2)})));
}

showFacts();
showSummary();
buildFilters();
renderRows();
showConfig();
window.addEventListener("hashchange", onHash);
onHash();
"""


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python report.py <train.py out_dir or eval.py out_dir>")
    written = write_report(sys.argv[1])
    print(f"{written} ({written.stat().st_size / 1e6:.2f} MB)")
