"""The asynchronous agent loop (rollout.rollout) against a turn-synchronous loop, same engine, same run.

Both loops run the same questions on the same model and engine kernels, with the same simulated tools: latency
drawn from a lognormal (median ~200 ms, p99 ~3 s, seeded per call so both loops see the same draws) and
observations of realistic length (search ~10 results with title/url/snippet, browse ~1,500 chars of extracted
text). A random model never calls a tool, so the policy is *scripted*: a thin wrapper around the model runs the
real forward (all compute is real) and then puts a large logit on the next token of a per-question script
(2-5 tool turns of 40-160 tokens of thinking each, then an answer), read from what the engine wrote into each
cache row. Sampled tokens are therefore the script's; timing is the engine's.

- async: `rollout.rollout` (rows park on their own tool calls, others keep decoding, observations are appended
  at the row's offset, freed slots take queued questions).
- sync (the reference's shape, implemented here): generate one turn for a batch of n_slots questions, wait for
  every tool call of the batch, then re-submit every row's whole context (re-prefill) for the next turn.

Reports wall time, engine idle fraction (wall time not spent inside engine calls) and sampled tokens/s for each.
Last line: `async_vs_sync_speedup=<sync wall / async wall>`.

Run:
    python bench/rollout.py                                              # CPU, tiny random model, ~1-2 min
    python bench/rollout.py --device=cuda --shape=qwen2.5-0.5b --dtype=bfloat16 --questions=256 --slots=64
"""

import math
import random
import sys
import time
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# this file is itself named rollout.py: drop bench/ from the path so `import rollout` finds the repo's module
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from data.config import parse_config  # noqa: E402
from data.models import SHAPES, resolve_model  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402

from rollout import (STOP_STRINGS, RolloutConfig, obs_frame, parse_turn, render_prompt, rollout,  # noqa: E402
                     stop_token_ids)

WORDS = ("the of and a to in is was for on that by with as from his at which an are it be this were city river "
         "born film album year team war king state first its after new two also had has one during population "
         "county university church station").split()


# ------------------------------------------------------------------------------------------------ scripted policy

def script_for(tokenizer, prompt_len: int, turn: int, protocol: str) -> list[int]:
    """The token ids of one scripted turn; the script of a question is keyed by its prompt length."""
    rng = random.Random(prompt_len * 1000 + turn)
    n_tools = random.Random(prompt_len).randint(2, 5)
    think = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 120)))
    if turn >= n_tools:
        text = f"<think>{think}</think><answer>{rng.choice(WORDS)}</answer>"
    elif turn % 2 == 0 or protocol == "tags":
        q = " ".join(rng.choice(WORDS) for _ in range(5))
        text = (f'<think>{think}</think><tool_call>{{"name": "web_search", "arguments": {{"query": ["{q}"]}}}}'
                f"</tool_call>" if protocol == "dr" else f"<think>{think}</think><search>{q}</search>")
    else:
        text = (f'<think>{think}</think><tool_call>{{"name": "browse_webpage", "arguments": {{"url_list": '
                f'["https://example.org/{turn}"]}}}}</tool_call>')
    return tokenizer.encode(text, add_special_tokens=False)


class ScriptedPolicy(nn.Module):
    """Wraps the model: real forward, then a +1e4 logit on the script's next token. It mirrors what each call
    writes into each engine row (positions from the model contract) to know the turn and the offset in it. A row is
    named by the first block of its block table: a row holds it from its prompt's prefill until it is released,
    and no other live row has it (groups of one here, no padding rows on the eager path)."""

    def __init__(self, inner, tokenizer, protocol: str, eos: int):
        super().__init__()
        self.inner, self.config, self.tok, self.protocol, self.eos = inner, inner.config, tokenizer, protocol, eos
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.hist: dict[int, list[int]] = {}      # row (first block) -> token at each position
        self.heads: dict[int, list[int]] = {}     # row (first block) -> positions right after each assistant header
        self.scripts: dict[tuple[int, int], list[int]] = {}

    def _write(self, row: int, pos: int, tok: int) -> None:
        h, hd = self.hist.setdefault(row, []), self.heads.setdefault(row, [])
        if pos < len(h):
            del h[pos:]
            del hd[bisect_right(hd, pos):]
        h.extend([-1] * (pos - len(h)))
        h.append(tok)
        n = len(self.header)
        if pos + 1 >= n and h[pos + 1 - n:pos + 1] == self.header:
            hd.append(pos + 1)

    def _target(self, row: int, pos: int) -> int:
        hd = self.heads.get(row, [])
        i = bisect_right(hd, pos + 1)
        if i == 0:
            return self.eos
        key = (hd[0], i - 1)  # (prompt length, turn)
        if key not in self.scripts:
            self.scripts[key] = script_for(self.tok, *key, self.protocol)
        s, k = self.scripts[key], pos + 1 - hd[i - 1]
        return s[k] if k < len(s) else self.eos

    def forward(self, tokens, positions=None, cache=None, block_table=None, logits_at=None):
        logits = self.inner(tokens, positions=positions, cache=cache, block_table=block_table, logits_at=logits_at)
        B, T = tokens.shape
        pos = (positions if positions is not None else torch.arange(T).expand(B, T)).tolist()
        rws = block_table[:, 0].tolist() if block_table is not None else list(range(B))
        toks = tokens.tolist()
        for b in range(B):
            for t in range(T):
                self._write(rws[b], pos[b][t], toks[b][t])
        at = logits_at.tolist() if logits_at is not None else [list(range(T))] * B
        bias = torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long)
        for b in range(B):
            for j, t in enumerate(at[b]):
                bias[b * len(at[b]) + j] = self._target(rws[b], pos[b][t])
        flat = logits.view(-1, logits.shape[-1])
        flat[torch.arange(flat.shape[0]), bias.to(flat.device)] += 1e4
        return logits


# ------------------------------------------------------------------------------------------------ simulated tools

def latency(key: str, median: float, p99: float) -> float:
    """Lognormal latency with the given median and 99th percentile, seeded by the call's key."""
    sigma = math.log(p99 / median) / 2.326
    return median * math.exp(random.Random(key).gauss(0.0, sigma))


class SimSession:
    def __init__(self, question: str, median: float, p99: float):
        self.q, self.n, self.median, self.p99 = question, 0, median, p99

    def _text(self, n_chars: int, rng) -> str:
        words = []
        while sum(len(w) + 1 for w in words) < n_chars:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    def web_search(self, queries):
        self.n += 1
        key = f"{self.q}|{self.n}"
        time.sleep(latency(key, self.median, self.p99))
        rng = random.Random(key)
        return "\n".join(f"[{i + 1}] {self._text(50, rng)}\nURL: https://example.org/{i}\n{self._text(220, rng)}"
                         for i in range(10))

    def browse_webpage(self, urls):
        self.n += 1
        key = f"{self.q}|{self.n}"
        time.sleep(latency(key, self.median, self.p99))
        return f"{urls[0]}: " + self._text(1500, random.Random(key))


class SimBrowser:
    def __init__(self, median=0.2, p99=3.0):
        self.median, self.p99 = median, p99

    def session(self, question):
        return SimSession(question, self.median, self.p99)


class TimedEngine:
    """Delegates to an Engine and adds up the wall time spent inside it (busy); idle = the rest."""

    def __init__(self, engine):
        self.e, self.busy = engine, 0.0

    def _timed(self, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.busy += time.perf_counter() - t0

    n_free = property(lambda self: self.e.n_free)
    n_decoding = property(lambda self: self.e.n_decoding)

    @property
    def n_slots(self):
        return self.e.n_slots

    def can_admit(self, *a, **kw):
        return self.e.can_admit(*a, **kw)

    def reseed(self, seed):
        self.e.reseed(seed)

    def keep_prefix(self, tokens):
        return self._timed(self.e.keep_prefix, tokens)

    def drop_prefix(self):
        self.e.drop_prefix()

    def submit(self, *a, **kw):
        return self._timed(self.e.submit, *a, **kw)

    def step(self):
        return self._timed(self.e.step)

    def append(self, *a, **kw):
        return self._timed(self.e.append, *a, **kw)

    def release(self, slot):
        return self._timed(self.e.release, slot)

    def length(self, slot):
        return self.e.length(slot)


# ------------------------------------------------------------------------------------------------ the two loops

def run_sync(model, tok, questions, browser, cfg: RolloutConfig, engine: TimedEngine) -> int:
    """Turn-synchronous baseline: per batch of n_slots questions, each turn generates for every live row, waits
    for every tool call, then re-prefills every row's whole context. Returns the number of sampled tokens."""
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                              stop_token_ids=stop_token_ids(tok), stop_strings=STOP_STRINGS[cfg.protocol])
    frame = obs_frame(tok)
    n_sampled = 0
    with ThreadPoolExecutor(cfg.tool_threads) as pool:
        for b in range(0, len(questions), cfg.n_slots):
            batch = questions[b:b + cfg.n_slots]
            ctx = [render_prompt(tok, q, cfg.protocol, cfg.date) for q in batch]
            sessions = [browser.session(q) for q in batch]
            live = list(range(len(batch)))
            for turn in range(cfg.max_turns):
                slot_of = {i: engine.submit(ctx[i], sampling)[0] for i in live}  # re-prefill everything
                new = {}
                while engine.n_decoding:
                    for fin in engine.step():
                        new[fin.slot] = fin.tokens
                calls = {}
                for i in live:
                    toks = new[slot_of[i]]
                    engine.release(slot_of[i])
                    ctx[i] = ctx[i] + toks
                    n_sampled += len(toks)
                    act = parse_turn(tok.decode(toks, skip_special_tokens=True), cfg.protocol)
                    if act.kind == "call" and turn + 1 < cfg.max_turns:
                        sess = sessions[i]
                        fn = sess.web_search if act.tool == "web_search" else sess.browse_webpage
                        calls[i] = pool.submit(fn, next(iter(act.args.values())))
                live = list(calls)
                for i, fut in calls.items():  # the whole batch waits for its slowest call
                    obs = fut.result()
                    ctx[i] = ctx[i] + frame.before_ids + tok.encode(obs, add_special_tokens=False) + frame.after_ids
                if not live:
                    break
    return n_sampled


@dataclass
class Args:
    device: str = "cpu"
    shape: str = "tiny"       # 'tiny' (random, SmolLM2 tokenizer) or a data.models.SHAPES name
    dtype: str = "float32"    # float32, bfloat16 or float16
    questions: int = 32
    slots: int = 16
    protocol: str = "dr"      # dr or tags
    max_turns: int = 10
    max_len: int = 4096
    median: float = 0.2
    p99: float = 3.0
    only: str = ""            # async or sync ("" = both)
    threads: int = 1          # CPU threads (1: on shared cores 2 threads ran 10x slower)


def main(args: Args):
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    if args.protocol not in ("dr", "tags"):
        raise SystemExit(f"--protocol must be dr or tags, got {args.protocol!r}")
    if args.only not in ("", "async", "sync"):
        raise SystemExit(f"--only must be async or sync (or empty: both), got {args.only!r}")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    tiny = resolve_model("tiny")
    tok = AutoTokenizer.from_pretrained(tiny)
    if args.shape == "tiny":
        inner = Transformer.from_pretrained(tiny, dtype=dtype, device=args.device)
    else:  # a real shape with random weights; the SmolLM2 tokenizer's ids fit any vocab >= 49152
        with torch.device(args.device):
            inner = Transformer(ModelConfig.from_json(SHAPES[args.shape])).to(dtype)
    inner.eval()
    model = ScriptedPolicy(inner, tok, args.protocol, eos=tok.convert_tokens_to_ids("<|im_end|>"))
    questions = [f"Question {i}: " + " ".join(random.Random(i).choice(WORDS) for _ in range(3 + i % 17)) + "?"
                 for i in range(args.questions)]
    cfg = RolloutConfig(protocol=args.protocol, max_turns=args.max_turns, max_new_tokens=512, max_len=args.max_len,
                        n_slots=args.slots, date="2026-11-24", temperature=1.0)
    print(f"device {args.device} | shape {args.shape} | dtype {args.dtype} | questions {args.questions} | "
          f"slots {args.slots} | tool latency lognormal median {args.median}s p99 {args.p99}s")
    results = {}
    for name in ("async", "sync"):
        if args.only and name != args.only:
            continue
        eng = TimedEngine(Engine(model, n_slots=args.slots, max_len=args.max_len,
                                 decode=lambda ids: tok.decode(ids, skip_special_tokens=False), seed=0))
        browser = SimBrowser(args.median, args.p99)
        t0 = time.perf_counter()
        with torch.no_grad():
            if name == "async":
                trajs = rollout(model, tok, questions, browser, cfg, engine=eng)
                n_tok = sum(sum(t.loss_mask) for t in trajs)
                statuses = {s: sum(t.end_reason == s for t in trajs) for s in {t.end_reason for t in trajs}}
            else:
                n_tok, statuses = run_sync(model, tok, questions, browser, cfg, eng), {}
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        results[name] = wall
        print(f"{name:5s} | wall {wall:7.2f} s | engine idle {1 - eng.busy / wall:6.1%} | sampled tokens {n_tok} | "
              f"{n_tok / wall:8.1f} tok/s" + (f" | {statuses}" if statuses else ""), flush=True)
    if len(results) == 2:
        print(f"async_vs_sync_speedup={results['sync'] / results['async']:.2f}")


if __name__ == "__main__":
    main(parse_config(Args, sys.argv[1:]))
