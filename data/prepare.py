"""Turn question-answering datasets into one JSONL schema, and optionally drop questions the base model already knows.

Schema, one JSON object a line:  {"id": str, "source": str, "question": str, "answers": [str, ...]}
`source` uses the reference's data_source names: nq, tq, hotpotqa, 2wiki, musique, Bamboogle, popqa.

What it does
- `--from=parquet`: the reference's parquet files (columns data_source, prompt[{role, content}],
  reward_model.ground_truth joined by `<|answer_split|>`, extra_info.index). The dev and test files live in
  `../shared/held_out_data/`; read them from there, never copy them into the repo (they are evaluation data).
- `--from=hub`: NQ, TriviaQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle, PopQA from the Hugging Face hub (FlashRAG's
  preprocessed copies, RUC-NLPIR/FlashRAG_datasets: fields id, question, golden_answers), by plain HTTP; offline
  this stops with a message that says so. `--max_per_source` subsamples with a fixed seed.
- `--filter=contamination`: the reference's contamination filter. For each question the base model answers k times
  WITHOUT search (our own engine, `rollout.generate`, sampled at temperature 1); if any sample contains a gold answer
  (normalised, whole words) the question is dropped: it teaches nothing about searching.
- `load_examples(path)`: read a parquet (reference or our schema) or JSONL file as a list of dicts in our schema;
  eval.py and train.py use it.

What it does not do
- No dedup across datasets and no train/test overlap check (the reference's dev and test overlap on Bamboogle; the
  summary reports per source so that is visible).

How to run (CPU is fine for everything but the filter with a real model; 1 GPU for that)
    python data/prepare.py --from=parquet --input=../shared/held_out_data/dev.parquet --out=runs/data/dev.jsonl
    python data/prepare.py --from=hub --sources=nq,tq,hotpotqa,2wiki --split=train --max_per_source=20000 \\
        --out=runs/data/train.jsonl
    python data/prepare.py --from=jsonl --input=runs/data/train.jsonl --filter=contamination \\
        --model=Qwen/Qwen2.5-7B-Instruct --k=4 --device=cuda --out=runs/data/train.clean.jsonl
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repo's top-level modules importable
    sys.path.insert(0, str(ROOT))

from data.config import parse_config  # noqa: E402  (after the sys.path fix)
from reward import ANSWER_SPLIT, normalize  # noqa: E402

HUB_BASE = "https://huggingface.co/datasets/RUC-NLPIR/FlashRAG_datasets/resolve/main"
# our source name (the reference's data_source) -> FlashRAG's folder name
HUB_NAMES = {"nq": "nq", "tq": "triviaqa", "hotpotqa": "hotpotqa", "2wiki": "2wikimultihopqa",
             "musique": "musique", "Bamboogle": "bamboogle", "popqa": "popqa"}
SOURCES = tuple(HUB_NAMES)


@dataclass
class Example:
    id: str
    source: str
    question: str
    answers: list[str]
    template: str = ""  # the question's kind where the data says it (our offline QA set): eval reports F1 per kind
    # our research QA set (data/build_qa.py) only: the bridge entity a second hop must search for (eval counts later
    # queries that name it), and the scripted oracle's queries (the ceiling agent and the warm start's demonstrations)
    bridge: str = ""
    oracle_queries: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- reading

def _from_reference_row(row: dict, i: int) -> Example:
    msgs = row.get("prompt") or []
    # the question is the (last) user message; the reference's files hold exactly one
    question = next((m["content"] for m in reversed(list(msgs)) if m.get("role") == "user"), "")
    gt = (row.get("reward_model") or {}).get("ground_truth", "")
    answers = [a for a in (gt.split(ANSWER_SPLIT) if isinstance(gt, str) else list(gt)) if a.strip()]
    extra = row.get("extra_info") or {}
    rid = extra.get("index")
    return Example(id=str(rid) if rid is not None else f"{row.get('data_source', 'row')}_{i}",
                   source=str(row.get("data_source", "unknown")), question=question.strip(), answers=answers)


def _from_our_row(row: dict, i: int) -> Example:
    answers = row.get("answers", row.get("golden_answers", row.get("answer", [])))
    if isinstance(answers, str):
        answers = answers.split(ANSWER_SPLIT)
    return Example(id=str(row.get("id", i)), source=str(row.get("source", "unknown")),
                   question=str(row["question"]).strip(), answers=[str(a) for a in answers],
                   template=str(row.get("template", "")), bridge=str(row.get("bridge") or ""),
                   oracle_queries=[str(query) for query in row.get("oracle_queries") or []])


def _row_to_example(row: dict, i: int) -> Example:
    return _from_reference_row(row, i) if "prompt" in row and "reward_model" in row else _from_our_row(row, i)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a line that is not JSON stops with the file and its line number
    (json's own error counts lines within the one line it was given)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno}); "
                                 f"fix or delete that line") from None
    return rows


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Examples (dicts in our schema) from a .parquet (reference or our columns) or .jsonl file, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (the reference dev/test files are in ../shared/held_out_data/)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        numbered = list(enumerate(pq.read_table(path).to_pylist(), 1))  # (row number, row)
    else:
        numbered = _read_jsonl(path)
    numbered = numbered[:limit] if limit else numbered
    for n, row in numbered:  # a row the schema cannot read: say which file and line, not a bare KeyError
        if not isinstance(row, dict) or not ("question" in row or ("prompt" in row and "reward_model" in row)):
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}: line {n} has no 'question' field (it has: {keys or 'nothing'}); each row "
                             f"needs question and answers (see data/prepare.py)")
    out = [asdict(_row_to_example(r, i)) for i, (_, r) in enumerate(numbered)]
    seen: set[str] = set()
    for ex in out:  # ids key resumption in eval.py; a duplicate would silently skip a question
        if ex["id"] in seen:
            raise ValueError(f"{path}: duplicate id {ex['id']!r}")
        seen.add(ex["id"])
    return out


def write_jsonl(examples: list[dict], out: str | os.PathLike) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
    tmp.replace(out)  # atomic: a killed run never leaves half a file under the final name


def from_hub(sources: list[str], split: str, max_per_source: int | None = None, seed: int = 0,
             timeout: float = 30.0) -> list[dict]:
    """Download FlashRAG's preprocessed split of each source by plain HTTP (no `datasets` needed)."""
    import requests

    out = []
    for src in sources:
        if src not in HUB_NAMES:
            raise ValueError(f"unknown source {src!r}; choose from {', '.join(SOURCES)}")
        url = f"{HUB_BASE}/{HUB_NAMES[src]}/{split}.jsonl"
        try:
            r = requests.get(url, timeout=timeout)
        except requests.RequestException as e:
            raise SystemExit(f"cannot reach the Hugging Face hub ({type(e).__name__}); this machine looks offline. "
                             f"Download {url} elsewhere and run --from=jsonl --input=FILE --source_name={src}")
        if r.status_code == 404:
            raise SystemExit(f"{src} has no {split!r} split on the hub ({url}); Bamboogle and PopQA have only 'test'")
        r.raise_for_status()
        rows = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        if max_per_source and len(rows) > max_per_source:
            rows = random.Random(f"{seed}-{src}").sample(rows, max_per_source)
        for i, row in enumerate(rows):
            ex = _from_our_row(row, i)
            ex.id, ex.source = f"{src}_{ex.id}", src  # prefix: ids stay unique once sources are mixed
            out.append(asdict(ex))
        print(f"{src}: {len(rows)} rows from {url}")
    return out


# ----------------------------------------------------------------------------------------------- contamination

NO_SEARCH_PROMPT = "Answer the question with a short answer and nothing else.\nQuestion: {question}"


def contains_gold(text: str, answers: list[str]) -> bool:
    """Whether a normalised gold answer occurs in the normalised text as whole words."""
    t = f" {normalize(text)} "
    return any(g and f" {g} " in t for g in (normalize(a) for a in answers))


def contaminated(model, tokenizer, examples: list[dict], k: int = 4, max_new_tokens: int = 64,
                 temperature: float = 1.0, batch_size: int = 32, seed: int = 0) -> list[bool]:
    """For each example: does any of k no-search samples from the model contain a gold answer?"""
    from rollout import generate  # lazy: the engine (and torch) only for this option

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flags = []
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        prompts = []
        for ex in chunk:
            msgs = [{"role": "user", "content": NO_SEARCH_PROMPT.format(question=ex["question"])}]
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
            prompts.extend([ids] * k)  # k samples per question, question-major
        outs = generate(model, prompts, max_new_tokens, temperature=temperature, stop_token_ids=tuple(eos),
                        seed=seed + b)
        for j, ex in enumerate(chunk):
            texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs[j * k:(j + 1) * k]]
            flags.append(any(contains_gold(t, ex["answers"]) for t in texts))
    return flags


# ----------------------------------------------------------------------------------------------- CLI

@dataclass
class Config:
    src: str = "parquet"            # parquet | jsonl | hub   (given on the command line as --from=...)
    input: str = ""                 # file for parquet/jsonl
    out: str = "runs/data/out.jsonl"
    sources: str = "nq,tq,hotpotqa,2wiki"   # hub only, comma separated
    split: str = "train"            # hub only
    source_name: str = ""           # jsonl only: set `source` on every row (e.g. a raw FlashRAG file)
    max_per_source: int = 0         # 0 = all
    limit: int = 0                  # 0 = all; first N rows after everything else
    seed: int = 0
    filter: str = ""                # "" | contamination
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"   # contamination filter only
    k: int = 4
    max_new_tokens: int = 64
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float32"


def parse_args(argv: list[str]) -> Config:
    """The repo's parser (typed, unknown keys rejected, --help); `--from` is an alias of `src`."""
    return parse_config(Config, ["--src=" + a[7:] if a.startswith("--from=") else a for a in argv])


def main(cfg: Config) -> list[dict]:
    if cfg.src == "hub":
        exs = from_hub([s for s in cfg.sources.split(",") if s], cfg.split, cfg.max_per_source or None, cfg.seed)
    elif cfg.src in ("parquet", "jsonl"):
        if not cfg.input:
            raise SystemExit("--input=FILE is required with --from=parquet/jsonl")
        exs = load_examples(cfg.input)
        if cfg.source_name:
            exs = [dict(e, source=cfg.source_name) for e in exs]
    else:
        raise SystemExit(f"--from must be parquet, jsonl or hub, got {cfg.src!r}")
    if cfg.limit:
        exs = exs[:cfg.limit]
    if cfg.filter == "contamination":
        import torch
        from transformers import AutoTokenizer

        from data.models import resolve_model
        from model import Transformer

        path = resolve_model(cfg.model)
        tok = AutoTokenizer.from_pretrained(path)
        model = Transformer.from_pretrained(path, dtype=getattr(torch, cfg.dtype), device=cfg.device).eval()
        flags = contaminated(model, tok, exs, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size, seed=cfg.seed)
        print(f"contamination filter: dropped {sum(flags)} of {len(exs)} questions the model answers without search")
        exs = [e for e, bad in zip(exs, flags) if not bad]
    elif cfg.filter:
        raise SystemExit(f"--filter must be '' or contamination, got {cfg.filter!r}")
    write_jsonl(exs, cfg.out)
    print(f"wrote {len(exs)} examples to {cfg.out}")
    return exs


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
