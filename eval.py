"""Run a research agent over benchmark questions; write per-question trajectories and per-source metrics.

- An agent (`--agent`): `model` (a checkpoint through rollout.py, greedy) and, through the same harness, prompt and
  token framing: `closed_book` (the model, no tools, one turn) and three scripted agents with no model, `first_title`
  (search the question, answer the first result's title: the shortcut a trained agent must beat), `oracle` (one
  search per supporting article, from the data's oracle_queries; answers the gold when its searches showed it: the
  ceiling of this web, not a baseline) and `question_first` (the question first, then the supporting articles it did
  not return: train.py's demonstrations). Data: the reference's parquet or our JSONL (data/prepare.py).
- `<out_dir>/trajectories.jsonl` gets one line per question (turns, calls, observations, answer, scores) as each
  batch finishes. Resumable: done ids are skipped; `run.json` records what produced them (weights fingerprint, data
  hash, every setting that changes an answer) and a different run refuses to resume there. One folder per model.
- Under torchrun rank r takes every world-th unfinished question; ranks append under a file lock; rank 0 scores.
- Scores (reward.py): the reference F1/EM, SQuAD F1/EM, the format check on the policy's own turns, and MBE (the LLM
  judge below; an exact match needs no call) with `--judge_base_url`. `summary.json` / `summary.md`: per source, per
  template and overall, with the metadata a result depends on. `--score_only=true` re-scores without a model.
A format error scores 0 F1 (as in the reference) and counts in the format-error rate; no pass@k.

How to run
    python eval.py                                            # the research dev set, the base SmolLM2, CPU
    python eval.py --model=runs/train/ckpt/step_000004/hf     # the default run's checkpoint
    python eval.py --agent=first_title                        # the no-model baseline, seconds
    python eval.py --agent=oracle                             # the ceiling of the embedded web, seconds
    python eval.py --preset=single_hop                        # the single-hop dev set (data/qa_dev.jsonl), 3 turns
    python eval.py --report=runs/train                        # (re)write a run's or an eval's report.html
    python eval.py --preset=tiny --data=../shared/held_out_data/dev.parquet --limit=14          # CPU, seconds
    python eval.py --model=runs/ckpt/step_100 --data=../shared/held_out_data/test.parquet --backend=serper \\
        --cache=runs/search.sqlite --reader=llm --device=cuda                                      # 1 GPU
    torchrun --standalone --nproc_per_node=8 eval.py --preset=deepresearcher --model=PATH         # 8 GPUs
    python eval.py --score_only=true --out_dir=runs/eval --judge_base_url=https://api.openai.com/v1
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

# one config source: the agent's fields, the start-up checks and the process set-up are train.py's
from train import (DEEPRESEARCHER_AGENT, AgentConfig, barrier, is_distributed, setup_distributed, turn_records,
                   turns_behaviour, validate)
# the agent (module-level names: tests swap in fakes with monkeypatch.setattr(eval, "rollout", ...))
from browse import BrowseConfig, Browser, WebError, chat_completion
from data.config import parse_config, subconfig
from data.prepare import load_examples
from data.wiki_corpus import default_corpus_path
from data.models import resolve_model
from model import Transformer
from report import write_report
from reward import em, normalize, reward, split_golds, squad_em, squad_f1
from rollout import PLANS, RolloutConfig, rollout, rule_config, scripted_rollout, system_prompt

ROOT = Path(__file__).resolve().parent


@dataclass
class Config(AgentConfig):
    """train.py's AgentConfig (the same fields and defaults: the embedded offline run) and what evaluation adds."""
    temperature: float = 0.0        # greedy, as the paper evaluates: eval's own default (training samples at 0.7)
    agent: str = "model"            # model | closed_book (the model answers with no tools, one turn) | no model:
    #                                 first_title (search the question, answer the first title) | oracle (searches
    #                                 the supporting articles, answers the gold when it saw it: the ceiling) |
    #                                 question_first (the question, then the supporting articles it did not return:
    #                                 the default's demonstrations; a ceiling too)
    data: str = "data/qa_dev_research.jsonl"  # the research dev set (train.py's default trains for it)
    out_dir: str = "runs/eval-{model}"  # {model}: a short name of --model (or the agent), one folder per agent
    limit: int = 0                  # first N rows of the data file (0 = all), before sharding and resumption
    sources: str = ""               # comma-separated data sources to keep ("" = all)
    batch_size: int = 64            # questions per rollout call; the unit of progress saved to disk
    # judge (MBE)
    judge_base_url: str = ""        # "" = no judge, MBE not reported
    judge_model: str = "gpt-4o-mini"
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_cache: str = ""           # "" = <out_dir>/judge_cache.jsonl
    # runtime
    dtype: str = "auto"             # auto (bf16 on cuda, fp32 on cpu) | float32 | bfloat16
    score_only: bool = False
    report: str = ""                # a training run's or an eval's folder: write its report.html and stop


PRESETS: dict[str, dict] = {
    # tiny random model + offline local search: the whole path in seconds on a CPU (tests, smoke runs)
    "tiny": dict(model="tiny", max_turns=3, max_new_tokens=24, max_len=2048, n_slots=16, batch_size=8,
                 date="2025-01-01", out_dir="runs/eval-tiny-{model}", device="cpu", data="data/qa_dev.jsonl"),
    # the embedded offline default, as train.py's default trains it (the defaults: SmolLM2-135M-Instruct or
    # --model=<trained checkpoint>/hf, the research dev split, local search, the short prompt and the scaffold)
    "offline": dict(out_dir="runs/eval-offline-{model}"),
    # train.py's single_hop preset: the earlier default's dev set and agent (3 turns), the README's single-hop table
    "single_hop": dict(data="data/qa_dev.jsonl", max_turns=3, max_new_tokens=24, max_len=1024,
                       out_dir="runs/eval-single-hop-{model}"),
    # the paper's evaluation set-up: train.py's deepresearcher agent and web (Qwen2.5-7B-Instruct or a trained
    # checkpoint, Serper top 10, reading agent, 10 turns of at most 2000 new tokens, ~32k context), greedy
    "deepresearcher": dict(DEEPRESEARCHER_AGENT, n_slots=64, data="../shared/held_out_data/test.parquet",
                           out_dir="runs/eval-deepresearcher-{model}"),
}


# ----------------------------------------------------------------------------------------------- files

def sha256_file(path: str | os.PathLike | None, max_bytes: int | None = None) -> str | None:
    """Hex sha256 of a file (or of its first max_bytes); None when there is none. The SQLite cache is hashed as its
    main file: rows still in the -wal file are not covered (close it first)."""
    if not path or not Path(path).is_file():
        return None
    with open(path, "rb") as fh:
        h = hashlib.file_digest(fh, "sha256") if max_bytes is None else hashlib.sha256(fh.read(max_bytes))
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path):
    """Exclusive lock on the output file for all ranks (and a second eval started by mistake); closing releases it."""
    with open(str(path) + ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        yield


def append_records(path: Path, records: list[dict]) -> None:
    """Append JSON lines under the lock, first cutting a torn last line (a crash mid-write) so they start afresh."""
    with locked(path), open(path, "ab+") as fh:
        if (size := fh.seek(0, os.SEEK_END)) and fh.seek(size - 1) >= 0 and fh.read(1) != b"\n":
            fh.seek(0)  # torn (rare): find the last whole line
            fh.truncate(fh.read().rfind(b"\n") + 1)
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike | None) -> list[dict]:
    """The records of a JSONL file we append to; a torn line (a crash mid-write) is skipped; [] when none."""
    if not path or not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


NO_MODEL_AGENTS = tuple(PLANS)  # rollout.py's scripted agents: first_title, oracle, question_first
AGENTS = ("model", "closed_book", *NO_MODEL_AGENTS)


def load_records(path: Path) -> list[dict]:
    """Records of trajectories.jsonl; a repeated id keeps its last record."""
    return list({r["id"]: r for r in read_jsonl(path)}.values())


# ----------------------------------------------------------------------------------------------- one folder per run

def model_tag(model: str) -> str:
    """A short folder-name part for --model: the hub name, or a checkpoint path's meaningful parts
    ("runs/train/ckpt/step_000004/hf" -> "train-step_000004")."""
    parts = [x for x in Path(model).parts if x not in ("/", ".", "..", "~", "runs", "ckpt", "hf")]
    tag = "-".join(parts[-1:] if model.count("/") == 1 and not Path(model).exists() else parts[-3:])
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag) or "model"


def resolve_out_dir(cfg: Config) -> Config:
    """The config with `{model}` in out_dir filled in (an explicit --out_dir without it is used as given)."""
    if cfg.agent == "model":
        tag = model_tag(cfg.model)
    elif cfg.agent in NO_MODEL_AGENTS:
        tag = cfg.agent
    else:
        tag = f"{cfg.agent}-{model_tag(cfg.model)}"
    return replace(cfg, out_dir=cfg.out_dir.replace("{model}", tag))


def weights_sha256(model_path: str | None, head_bytes: int = 8 << 20) -> str | None:
    """A cheap fingerprint of a checkpoint folder: config.json, and each weight file's size plus its first 8 MB
    (the embedding, which every training step moves): two different checkpoints differ here in practice."""
    if not model_path or not Path(model_path).is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(Path(model_path).glob("*.safetensors")) + sorted(Path(model_path).glob("config.json")):
        h.update(f"{f.name}\0{f.stat().st_size}\0{sha256_file(f, max_bytes=head_bytes)}\n".encode())
    return h.hexdigest()


def run_identity(cfg: Config, model_path: str | None, corpus: str | None) -> dict:
    """What decides the trajectories of a question: the model's weights, the data, the system prompt as the policy
    reads it, and every setting that changes an answer. Resuming into a folder whose trajectories came from another
    identity would mix two runs. The date counts only where the prompt shows it (the reference prompt does, the
    short one does not), so an offline eval resumed the next day is the same run."""
    # the agent's fields but those that cannot change an answer (device, engine width) or are recorded otherwise
    skipped = ("model", "device", "n_slots", "date", "corpus", "cache", "llm_base_url", "cuda_graphs")
    keys = [f.name for f in fields(AgentConfig) if f.name not in skipped] + ["agent", "dtype"]
    prompt_text = system_prompt(cfg.protocol, cfg.date or None, cfg.prompt)
    return {"model": cfg.model, "model_path": str(Path(model_path).resolve()) if model_path else None,
            "weights_sha256": weights_sha256(model_path), "data_sha256": sha256_file(cfg.data),
            "corpus": corpus, "system_prompt_sha256": hashlib.sha256(prompt_text.encode()).hexdigest(),
            **{key: getattr(cfg, key) for key in keys}}


def check_same_run(out_dir: Path, identity: dict, n_done: int) -> None:
    """Refuse to add to (and re-score) trajectories that another model or other settings produced."""
    if not n_done:
        return
    f = out_dir / "run.json"
    old = json.loads(f.read_text()) if f.exists() else {}  # (no run.json: written by an older eval.py)
    if diff := [k for k in identity if k != "model" and old.get(k) != identity[k]]:
        said = "; ".join(f"{k} was {old.get(k)!r}, now {identity[k]!r}" for k in diff)
        raise SystemExit(f"{out_dir / 'trajectories.jsonl'} holds {n_done} trajectories of a different run ({said})"
                         f": resuming would mix them with this one's; pass --out_dir=<another folder> (the default "
                         f"is one folder per model) or delete {out_dir}")


# ----------------------------------------------------------------------------------------------- scoring

def record_behaviour(rec: dict, answer: str | None) -> dict:
    """reward.behaviour of a record (train.turns_behaviour, the same reading as train's metrics)."""
    return turns_behaviour(rec["turns"], rec["stats"]["n_search"], rec.get("bridge"), answer)


def score_record(rec: dict, protocol: str | None = None) -> dict:
    """Scores from the policy's own turn texts and the gold answers (observations are never format-checked);
    protocol "dr": every turn must close </think>, as in training (reward.format_ok). Plus the behaviour counts."""
    result = reward([turn["text"] for turn in rec["turns"]], rec["gold"], protocol=protocol)
    stats = rec["stats"]  # calls that ran (a malformed call, or one after the last turn, did not)
    squad_f1_score = 0.0
    squad_em_score = 0.0
    if result.format_ok:  # there is an answer
        squad_f1_score = squad_f1(result.answer, rec["gold"])
        squad_em_score = squad_em(result.answer, rec["gold"])
    return {"reward": result.score, "format_ok": result.format_ok, "format_reason": result.reason, "f1": result.f1,
            "em": result.em, "squad_f1": squad_f1_score, "squad_em": squad_em_score, "answer": result.answer,
            "n_turns": len(rec["turns"]), "n_search": stats["n_search"], "n_browse": stats["n_browse"],
            **record_behaviour(rec, result.answer if result.format_ok else None)}


# ----------------------------------------------------------------------------------------------- the LLM judge (MBE)

JUDGE_PROMPT = (  # one string: the text the judge reads (its cache keys hash it)
    'You are grading an answer to a question. You get the question, a list of reference answers (each '
    'one of them is a fully correct answer) and a predicted answer.\n'
    '\n'
    'Decide whether the predicted answer correctly answers the question. It does not have to be worded '
    'like any reference answer, but it must mean the same thing as at least one of them in the context '
    'of the question. An answer that is vaguer, only partly right, or hedges between several options is '
    'incorrect.\n'
    '\n'
    'question: {question}\n'
    'reference answers: {golds}\n'
    'predicted answer: {prediction}\n'
    '\n'
    'Explain your reasoning briefly first, then give your verdict. Reply with a single JSON object and '
    'nothing else:\n'
    '{{"rationale": "<your reasoning, as text>", "judgement": "<correct or incorrect>"}}')


@dataclass
class Verdict:
    verdict: str          # "correct" | "incorrect" | "unjudged"
    rationale: str
    source: str           # "exact_match" | "no_answer" | "judge" | "cache" | "error"
    error: str | None = None

    @property
    def correct(self) -> float | None:
        """1.0 / 0.0, or None when unjudged (reported apart, not silently counted as wrong)."""
        return {"correct": 1.0, "incorrect": 0.0}.get(self.verdict)


def parse_judgement(text: str) -> tuple[str, str] | None:
    """(judgement, rationale) from a judge reply, or None when it cannot be read. The judgement is found even in
    almost-JSON (e.g. an unescaped quote in the rationale, which then reads as "")."""
    m = re.search(r'"judge?ment"\s*:\s*"\s*(correct|incorrect)\s*"', text or "", re.IGNORECASE)
    if not m:
        return None
    try:
        rationale = str(json.loads(re.search(r"\{.*\}", text, re.DOTALL).group(0)).get("rationale", ""))
    except (json.JSONDecodeError, AttributeError):  # not JSON, or not an object
        rationale = ""
    return m.group(1).lower(), rationale


class Judge:
    """Thread-safe LLM judge with an on-disk verdict cache (`cache_path`, a JSONL; None = in memory only):
    `judge(question, golds, prediction) -> Verdict` through browse.chat_completion at `base_url` (any OpenAI-compatible
    root, e.g. https://api.openai.com/v1). An exact match is correct without a call; an unparseable reply is "unjudged"
    and reported, never retried. The key comes from $api_key_env (may be unset locally), never logged or cached. The
    reference judged with gpt-4o-mini at temperature 0.7; we use 0. timeout_s is per HTTP request; transport errors
    (timeout, connection, 429, 5xx) are tried 1 + max_retries times, ~backoff_s * 2**attempt apart (urllib3's)."""

    def __init__(self, base_url: str, model: str = "gpt-4o-mini", api_key_env: str = "OPENAI_API_KEY",
                 cache_path: str | None = None, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0):
        if not base_url:
            raise ValueError("Judge(base_url=...) is empty: give the OpenAI-compatible endpoint, e.g. "
                             "--judge_base_url=https://api.openai.com/v1")
        self.base_url, self.model, self.api_key_env, self.cache_path = base_url, model, api_key_env, cache_path
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self._lock, self.stats = threading.Lock(), Counter()
        self._cache: dict[str, dict] = {rec["key"]: rec for rec in read_jsonl(cache_path)}

    def judge(self, question: str, golds: str | list[str], prediction: str | None) -> Verdict:
        gold_list = split_golds(golds)
        if prediction is None or not normalize(prediction):
            self.stats["no_answer"] += 1
            return Verdict("incorrect", "no answer", "no_answer")
        if em(prediction, gold_list):  # the reference counts an exact match as correct without asking
            self.stats["exact_match"] += 1
            return Verdict("correct", "exact match", "exact_match")
        prompt = JUDGE_PROMPT.format(question=question, golds=json.dumps(gold_list, ensure_ascii=False),
                                     prediction=prediction)
        key = hashlib.sha256(f"{self.model}\n{prompt}".encode()).hexdigest()
        if (hit := self._cache.get(key)) is not None:  # a dict read is atomic; writes below hold the lock
            self.stats["cache"] += 1
            return Verdict(hit["verdict"], hit["rationale"], "cache")
        try:
            text = chat_completion(self.base_url, self.model, [{"role": "user", "content": prompt}],
                                   api_key=os.environ.get(self.api_key_env) or None, timeout=self.timeout_s,
                                   max_tries=1 + self.max_retries, backoff_s=self.backoff_s,
                                   max_tokens=512, who="judge endpoint")
        except WebError as e:  # timeouts, refused connections, HTTP errors: after the bounded retries
            self.stats.update(("http_error", "unjudged"))
            return Verdict("unjudged", "", "error", str(e))  # "kind: message"
        if (parsed := parse_judgement(text)) is None:
            # temperature 0: asking again would return the same text; report it instead of looping
            self.stats["unparseable"] += 1
            return Verdict("unjudged", text[:500], "error", "unparseable judge reply")
        verdict, rationale = parsed
        rec = {"key": key, "verdict": verdict, "rationale": rationale, "model": self.model,
               "question": question, "prediction": prediction}
        with self._lock:
            self._cache[key] = rec
            if self.cache_path:
                Path(self.cache_path).parent.mkdir(parents=True, exist_ok=True)
                append_records(Path(self.cache_path), [rec])
        self.stats["judged"] += 1
        return Verdict(verdict, rationale, "judge")

    def judge_many(self, items: list[tuple[str, str | list[str], str | None]]) -> list[Verdict]:
        """Judge (question, golds, prediction) triples concurrently; results in input order."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda it: self.judge(*it), items))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _share(flags: list) -> float | None:
    """The share of True among the flags that apply (None = does not apply to this question)."""
    return _mean([1.0 if flag else 0.0 for flag in flags if flag is not None])


# rates, shown as percentages
PERCENT = ("f1", "em", "squad_f1", "squad_em", "mbe", "format_error_rate", "searched_twice", "bridge_in_later_query",
           "answer_is_title")


def summary_row(scores: list[dict]) -> dict:
    """One row of the summary: the scores' means, MBE over judged questions (unjudged ones counted, not guessed),
    and the behaviour counts (searches per question, searching twice, the bridge entity in a later query, answers
    that are a result's title). Records scored before the behaviour counts existed count as not applicable."""
    row = {"n": len(scores)}
    for key in ("f1", "em", "squad_f1", "squad_em"):
        row[key] = _mean([x[key] for x in scores])
    if any("mbe" in x for x in scores):
        row["mbe"] = _mean([x["mbe"] for x in scores if x.get("mbe") is not None])
        row["n_unjudged"] = sum("mbe" in x and x["mbe"] is None for x in scores)
    row["mean_turns"] = _mean([x["n_turns"] for x in scores])
    row["mean_tool_calls"] = _mean([x["n_search"] + x["n_browse"] for x in scores])
    row["mean_search"] = _mean([x["n_search"] for x in scores])
    row["mean_browse"] = _mean([x["n_browse"] for x in scores])
    row["format_error_rate"] = _mean([0.0 if x["format_ok"] else 1.0 for x in scores])
    row["searched_twice"] = _share([x.get("searched_twice") for x in scores])
    row["bridge_in_later_query"] = _share([x.get("bridge_in_later_query") for x in scores])
    row["answer_is_title"] = _share([x.get("answer_is_title") for x in scores])
    return row


def summarize(records: list[dict]) -> dict:
    """Per-source, per-template (where the data has one) and overall rows (summary_row)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        groups[rec["source"]].append(rec["scores"])
        if rec.get("template"):
            groups[f"template: {rec['template']}"].append(rec["scores"])
    named = [*sorted(groups.items()), ("overall", [rec["scores"] for rec in records])]
    return {name: summary_row(scores) for name, scores in named}


SUMMARY_COLUMNS = [("n", "n"), ("f1", "F1 (ref)"), ("em", "EM"), ("squad_f1", "SQuAD-F1"), ("squad_em", "SQuAD-EM"),
                   ("mbe", "MBE"), ("mean_turns", "turns"), ("mean_search", "searches"),
                   ("mean_tool_calls", "tool calls"), ("searched_twice", "searched 2+"),
                   ("bridge_in_later_query", "bridge in later query"), ("answer_is_title", "answer is a title"),
                   ("format_error_rate", "format err")]


def format_cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "n":
        return str(value)
    if key in PERCENT:
        return f"{100 * value:.1f}"
    return f"{value:.2f}"


def render_md(summary: dict) -> str:
    rows = summary["metrics"]
    columns = [(key, title) for key, title in SUMMARY_COLUMNS
               if key == "n" or any(row.get(key) is not None for row in rows.values())]
    lines = ["# Evaluation summary", "", "| source | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        cells = [format_cell(key, row.get(key)) for key, _ in columns]
        label = "**overall**" if name == "overall" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Scores and shares are percentages. F1 (ref) is the reference's word-set F1 (articles kept), 0 on a "
              "format error; SQuAD columns remove articles and count repeated words. `bridge in later query`: bridge "
              "questions whose second or later query names the bridge entity; `answer is a title`: answers equal to "
              "the title of a search result the agent was shown.", "", "## Run", ""]
    lines += [f"- {key}: `{value}`" for key, value in summary["meta"].items() if key != "config"]
    return "\n".join(lines) + "\n"


def rescore(cfg: Config, out_dir: Path, meta: dict | None = None, ids: set[str] | None = None) -> dict:
    """Score the records of trajectories.jsonl (judge included when set), rewrite it, write the summaries. `ids`:
    summarise (and judge) only these; the file keeps every record it had (e.g. from a run without --limit)."""
    path = out_dir / "trajectories.jsonl"
    everything = load_records(path)
    records = [r for r in everything if ids is None or r["id"] in ids]
    if not records:
        raise SystemExit(f"{path} has no trajectories to score")
    for rec in everything:  # fresh scores; MBE only when a judge is set now (its on-disk cache makes re-judging free)
        rec["scores"] = score_record(rec, cfg.protocol)
    if cfg.judge_base_url:
        judge = Judge(cfg.judge_base_url, model=cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                      cache_path=cfg.judge_cache or str(out_dir / "judge_cache.jsonl"))
        # MBE in each record's scores (a format error is incorrect, as in the reference, with no call)
        items = [(r["question"], r["gold"], r["scores"]["answer"] if r["scores"]["format_ok"] else None)
                 for r in records]
        for rec, v in zip(records, judge.judge_many(items)):
            rec["scores"].update(mbe=v.correct, judge=asdict(v))
        print("judge: " + " | ".join(f"{k} {v}" for k, v in sorted(judge.stats.items())))
    with locked(path):  # atomic rewrite, so a crash here never loses trajectories
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in everything), encoding="utf-8")
        tmp.replace(path)
    if meta is None:  # score-only: keep the run's metadata, update the judge
        old = out_dir / "summary.json"
        meta = json.loads(old.read_text())["meta"] if old.exists() else {}
    meta = dict(meta, judge_model=cfg.judge_model if cfg.judge_base_url else None,
                scored_at=_dt.datetime.now().isoformat(timespec="seconds"))
    summary = {"metrics": summarize(records), "meta": meta}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "summary.md").write_text(render_md(summary))
    print(render_md(summary).split("\n## Run")[0])
    try:  # the scores are on disk already: a report that fails to render costs nothing but itself
        print(f"report: {write_report(out_dir)}")
    except Exception as e:  # noqa: BLE001
        print(f"report: not written ({type(e).__name__}: {e}); retry with python eval.py --report={out_dir}")
    return summary


# ----------------------------------------------------------------------------------------------- running the agent

def trajectory_record(ex: dict, traj) -> dict:
    """One line of trajectories.jsonl: the question, what the agent did and said, and the exact token stream (ids,
    loss mask, sampled log-probs) that report.py shows token by token."""
    return {"id": ex["id"], "source": ex["source"], "template": ex.get("template", ""), "question": ex["question"],
            "gold": ex["answers"], "bridge": ex.get("bridge", ""), "answer": traj.answer,
            "end_reason": traj.end_reason, "turns": turn_records(traj), "stats": dict(traj.stats),
            "n_tokens": len(traj.tokens), "prompt_len": traj.prompt_len, "tokens": list(traj.tokens),
            "loss_mask": list(traj.loss_mask), "logprobs": [round(logp, 4) for logp in traj.logprobs]}


def run_meta(cfg: Config, identity: dict, corpus: str | None) -> dict:
    """summary.json's metadata: the run's identity, and what else a reader of the numbers needs."""
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    return {**identity, "model": cfg.model if cfg.agent not in NO_MODEL_AGENTS else None, "data": cfg.data,
            "limit": cfg.limit, "sources": cfg.sources or "all", "cache": cfg.cache or None,
            "cache_sha256": sha256_file(cfg.cache), "corpus_sha256": sha256_file(corpus),
            "judge_model": cfg.judge_model if cfg.judge_base_url else None, "git_commit": commit,
            "finished_at": _dt.datetime.now().isoformat(timespec="seconds"), "config": asdict(cfg)}


def load_policy(model_path: str, dtype_name: str, device):
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtypes["auto"] = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Transformer.from_pretrained(model_path, dtype=dtypes[dtype_name], device=device).eval()


def closed_book_config(cfg: Config) -> Config:
    """The closed_book agent: no tools, one turn, a prompt without them, no forced search; the worked example keeps
    its question and answer without its search."""
    question, _, answer = (cfg.example.split("|") + ["", ""])[:3]
    example = f"{question}||{answer}" if cfg.example else ""
    return replace(cfg, prompt="closed_book", turn_prefixes="", example=example, max_turns=1)


def run_agent(cfg: Config, todo: list[dict], path: Path, model_path: str, corpus: str | None, proc) -> None:
    """Run the agent over `todo` in batches, appending each finished batch to `path`."""
    if not todo:
        return
    tokenizer = AutoTokenizer.from_pretrained(model_path)  # the scripted agents write through it too
    model = None
    if cfg.agent not in NO_MODEL_AGENTS:
        model = load_policy(model_path, cfg.dtype, proc.device)
    if cfg.agent == "closed_book":
        cfg = closed_book_config(cfg)
    rollout_cfg = subconfig(RolloutConfig, cfg)
    if cfg.agent in NO_MODEL_AGENTS:
        rollout_cfg = rule_config(rollout_cfg)
    with contextlib.closing(Browser(subconfig(BrowseConfig, cfg, corpus=corpus))) as browser:
        started = time.time()
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            if cfg.agent in NO_MODEL_AGENTS:
                trajs = scripted_rollout(PLANS[cfg.agent], tokenizer, chunk, browser, rollout_cfg)
            else:
                with torch.no_grad():
                    trajs = rollout(model, tokenizer, [ex["question"] for ex in chunk], browser, rollout_cfg,
                                    group_size=1, seed=cfg.seed)
            records = []
            for example, traj in zip(chunk, trajs):
                record = trajectory_record(example, traj)
                record["scores"] = score_record(record, cfg.protocol)
                records.append(record)
            append_records(path, records)
            done = start + len(chunk)
            batch_f1 = sum(record["scores"]["f1"] for record in records) / len(records)
            seconds_each = (time.time() - started) / done
            print(f"rank {proc.rank} | done {done}/{len(todo)} | batch_f1 {batch_f1:.3f} | "
                  f"{seconds_each:.2f} s/question", flush=True)


def main(cfg: Config) -> dict | None:
    if cfg.report:
        print(f"report: {write_report(cfg.report)}")
        return None
    cfg = resolve_out_dir(cfg)
    if not Path(cfg.data).exists() and (ROOT / cfg.data).exists():  # the repo's data/ from another folder
        cfg = replace(cfg, data=str(ROOT / cfg.data))
    out_dir = Path(cfg.out_dir)
    if cfg.score_only:
        return rescore(cfg, out_dir)
    validate(cfg)  # train.py's start-up checks: numbers, model folder, data file, out_dir writable
    if cfg.agent not in AGENTS:
        raise SystemExit(f"--agent={cfg.agent!r}: use one of {', '.join(AGENTS)}")
    proc = setup_distributed(cfg.device)
    examples = load_examples(cfg.data, limit=cfg.limit or None)
    examples = [e for e in examples if not cfg.sources or e["source"] in cfg.sources.split(",")]
    path = out_dir / "trajectories.jsonl"
    finished = {r["id"] for r in load_records(path)}
    model_path = resolve_model(cfg.model)  # the scripted agents use its tokenizer only
    # the local back end's corpus file, recorded in run.json (None for the other back ends)
    corpus = cfg.corpus or (str(default_corpus_path()) if cfg.backend == "local" else None)
    identity = run_identity(cfg, model_path, corpus)
    check_same_run(out_dir, identity, len(finished))
    todo = [e for e in examples if e["id"] not in finished]
    if proc.main:
        if not finished:
            (out_dir / "run.json").write_text(json.dumps(identity, indent=2) + "\n")
        print(json.dumps(asdict(cfg), indent=2))
        print(f"{len(examples)} questions, {len(examples) - len(todo)} already in {path}, {len(todo)} to run "
              f"on {proc.world} rank(s)")
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    run_agent(cfg, todo[proc.rank::proc.world], path, model_path, corpus, proc)
    barrier()
    if is_distributed():
        torch.distributed.destroy_process_group()  # rank 0 scores alone (the judge may take minutes)
    if not proc.main:
        return None
    wanted = {e["id"] for e in examples}  # this run's questions (see rescore's `ids`)
    if missing := wanted - {r["id"] for r in load_records(path)}:
        raise SystemExit(f"{len(missing)} questions have no trajectory (a rank failed?); run again to finish them")
    return rescore(cfg, out_dir, meta=run_meta(cfg, identity, corpus), ids=wanted)


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:], PRESETS))
