"""Generation engine and research-agent loop: everything that turns a policy into trajectories.

Part 1, the engine (`Engine`, `generate`): a paged KV cache (`model.KVCache`: one pool of `block_size`-token blocks,
a block table, a length per row and a refcount per block, so memory follows the tokens rows hold). A row is free,
decoding or parked: `submit` (a GRPO group shares its prompt's full blocks by reference), `step`, `append` (forced
tokens at the row's own offset), `release` (continuous batching). A full pool is an error with the numbers, never an
overwrite. A row's last sampled token enters the cache with the next forward, so a stop token costs no forward. Each
token comes with its log-prob under the sampling distribution (temperature applied, before top-p/top-k: what the
trainer recomputes). Each row samples by Gumbel-max from its own generator seeded from (engine seed, row key), so its
tokens do not depend on which rows share its batches or when tool calls return (logits still differ in the last bits
with the batch: a near-tie can flip a token, rarely on CPU, more often in bf16). CUDA graphs: see `Engine`.

Part 2, the agent loop (`rollout()`): every row decodes a turn; a turn that ends in a tool call parks its row while
the call runs in a thread pool and the others decode; the observation, wrapped in the chat template's tool turn and
the next assistant header, is appended as forced tokens. A finished trajectory frees its slots for the next question.
`Trajectory.tokens` is exactly the cache content, `loss_mask` is 1 exactly on sampled tokens (with their `logprobs`):
nothing is re-rendered or re-tokenised, and only the policy's own turn text is parsed, so web text cannot end a
trajectory or fake an answer. Protocols: `dr` (the reference's `<tool_call>{JSON}</tool_call>`) and `tags`
(`<search>q1 | q2</search>`, which small models learn faster), described in the system text. End reasons (exactly one
each, END_REASONS): answer; max_turns (a call after the last turn is not run); bad_call (a malformed call under
on_bad_call="end"; "error_observation" answers it and goes on); format_error (neither call nor answer);
context_limit; tool_failure (the web failed, not the policy: the trainer masks these); engine_error.

Not here: a paged-attention kernel, preemption when the pool runs out (size it with `train.py --dry_run=True`), prefix
caching across groups, speculative decoding, beam search. Bench (decode step vs the bandwidth floor):
`python bench/generate.py [--device=cuda]`; tests: `python -m pytest tests/test_engine.py tests/test_rollout.py`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from model import KVCache


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256  # per turn
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclass
class Finished:
    """A row that stopped generating this turn; it stays parked (cache intact) until append() or release()."""
    slot: int
    tokens: list[int]  # the turn's new tokens, including the stop token / the token that completed a stop string
    logprobs: list[float]  # log-prob of each under the sampling distribution
    reason: str  # "stop_token" | "stop_string" | "length" | "context"


FREE, DECODING, PARKED = 0, 1, 2


@dataclass
class Slot:
    """One row of the engine: its state, where its KV lives, and the turn it is sampling."""
    state: int = FREE
    blocks: list[int] = field(default_factory=list)  # physical KV blocks, in position order (some may be shared)
    cached: int = 0  # tokens in the cache
    pending: int | None = None  # last sampled token, not yet in the cache
    sampling: SamplingParams | None = None
    gen: torch.Generator | None = None  # the row's own random stream (see row_seed)
    tokens: list[int] = field(default_factory=list)  # this turn's sampled tokens
    logprobs: list[float] = field(default_factory=list)


def memory_check(nbytes: int, device: torch.device) -> None:
    """Fail with numbers (asked vs free) instead of an opaque OOM when the KV cache cannot fit."""
    if (free := free_memory(device)) is not None and nbytes > 0.9 * free:
        raise MemoryError(f"KV cache needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on "
                          f"{device}: lower n_slots (rows) or max_len, or pass kv_tokens")


def free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":  # memory torch's allocator holds but does not use (a previous engine's pool) is free
        held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + held
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def row_seed(seed: int, key) -> int:
    """The seed of one row's random stream, from the engine seed and the row's key (e.g. (question, sample))."""
    return int.from_bytes(hashlib.sha256(repr((seed, key)).encode()).digest()[:8], "little") >> 1


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits (B, V), row i under params[i] with noise from its own generator gens[i]:
    (tokens (B,), logprobs (B,)) on the device. Settings are all decided on the host from `params`: no host sync."""
    logits = logits.float()
    V, dev = logits.shape[-1], logits.device
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    scaled = logits / temp[:, None]  # (B, V)
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V): the distribution the trainer recomputes
    tokens = logits.argmax(-1)  # (B,): greedy rows draw nothing
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if drawn:
        idx = torch.tensor(drawn, device=dev)
        filt = scaled[idx]  # (b, V)
        sp = [params[i] for i in drawn]
        if any(p.top_k > 0 or p.top_p < 1 for p in sp):
            top_p = torch.tensor([p.top_p for p in sp], device=dev)
            top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in sp], device=dev)
            sorted_logits, order = filt.sort(dim=-1, descending=True)  # (b, V)
            probs = sorted_logits.softmax(-1)
            # drop a token when the mass before it already reaches top_p (the first token always stays)
            drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
            drop |= torch.arange(V, device=dev)[None] >= top_k[:, None]
            filt = torch.empty_like(filt).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        # Gumbel-max: argmax(logit - log E), E ~ Exp(1), is a draw from softmax(logit) (torch.multinomial's own
        # trick), with each row's uniforms from its own generator. u = 0 gives E = inf: that token is never taken.
        u = torch.stack([torch.rand(V, generator=gens[i], device=dev) for i in drawn])  # (b, V)
        tokens[idx] = (filt - torch.log(-torch.log(u))).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class Engine:
    """Slots over one paged KV cache (see the module docstring); only ever calls `model(...)` (plain or FSDP2).
    block_size: tokens per KV block. kv_tokens: tokens the pool holds, all rows together (None: every row can reach
    max_len, i.e. n_slots x max_len, capped on CUDA to what fits in the free memory). cuda_graphs: capture the
    decode step per (batch, blocks) bucket and replay it (CUDA only; CPU is always eager)."""

    def __init__(self, model, n_slots: int, max_len: int, *, decode=None, seed: int = 0, prefill_tokens: int = 8192,
                 block_size: int = 16, kv_tokens: int | None = None, cuda_graphs: bool = False):
        p = next(model.parameters())
        self.model, self.n_slots, self.max_len, self.decode, self.seed = model, n_slots, max_len, decode, seed
        self.device, self.prefill_tokens, self.block_size = p.device, prefill_tokens, block_size
        cfg = model.config
        self.max_blocks = -(-max_len // block_size)  # table width: blocks of a row at max_len
        per_block = KVCache.nbytes_for(cfg, block_size, p.dtype)
        if kv_tokens is None:
            kv_tokens = n_slots * self.max_blocks * block_size
            free = free_memory(self.device) if self.device.type == "cuda" else None
            if free is not None:  # like vLLM: leave room for activations, take what fits
                kv_tokens = min(kv_tokens, max(0, int(0.85 * free) - 2**30) // per_block * block_size)
        n_blocks = -(-kv_tokens // block_size) + 1  # + block 0, the scratch block pads and padding rows write to
        memory_check(n_blocks * per_block, self.device)
        self.cache = KVCache.allocate(cfg, n_blocks, block_size, p.dtype, self.device, zero=False)
        self._zero([0])
        self.refs = [0] * n_blocks  # rows holding each block
        self.free_blocks = list(range(n_blocks - 1, 0, -1))  # a stack: pop() hands out the lowest ids first
        # Device mirror of every row's block list, 0 (scratch) past its end, so pad writes never reach another row.
        self.table = torch.zeros(n_slots, self.max_blocks, dtype=torch.long, device=self.device)
        self.slots = [Slot() for _ in range(n_slots)]
        self.n_admitted = 0  # rows admitted so far: the key of rows submitted without seeds
        self._done: list[Finished] = []  # rows stopped since the last step() (a first token can already stop)
        self._pieces: dict[int, str] = {}  # token id -> its text alone (stop-string pre-check)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict = {}  # (batch bucket, table width) -> captured graph
        n = self._buckets(n_slots, 1)[0]  # the decode step's buffers, for every bucket (a view of the first rows)
        self._static = {k: torch.zeros(n, w, dtype=torch.long, device=self.device)
                        for k, w in (("tok", 1), ("pos", 1), ("table", self.max_blocks))}
        self._static["out"] = torch.zeros(n, cfg.vocab_size, dtype=p.dtype, device=self.device)
        # one memory pool for all captured graphs: the buckets never run at once
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    n_free = property(lambda self: sum(s.state == FREE for s in self.slots))
    n_decoding = property(lambda self: sum(s.state == DECODING for s in self.slots))

    def length(self, slot: int) -> int:
        """Tokens of the row's sequence so far (cache + the pending sampled token)."""
        s = self.slots[slot]
        return s.cached + (s.pending is not None)

    def release(self, slot: int) -> None:
        for b in self.slots[slot].blocks:  # a shared prompt block goes back when its last row lets go
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_blocks.append(b)
        self.slots[slot] = Slot()
        self.table[slot] = 0

    def _alloc(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise RuntimeError(f"KV cache pool exhausted: {n} blocks asked, {len(self.free_blocks)} free of "
                               f"{self.cache.n_blocks - 1} ({self.block_size} tokens each): lower n_slots, or "
                               f"raise kv_tokens (Engine(..., kv_tokens=...))")
        out = [self.free_blocks.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        self._zero(out)
        return out

    def _zero(self, blocks: list[int]) -> None:
        """Zero blocks as they are handed out: the pool is allocated untouched (memory follows the blocks in use)."""
        if blocks:
            idx = torch.tensor(blocks, device=self.device)
            self.cache.k[:, idx] = 0
            self.cache.v[:, idx] = 0

    def _grant(self, grants: list[tuple[int, list[int]]]) -> None:
        """Append blocks to rows' block lists (each row once) and mirror them in the device table (one index_put)."""
        new = [(slot, len(self.slots[slot].blocks) + j, b) for slot, blocks in grants for j, b in enumerate(blocks)]
        for slot, blocks in grants:
            self.slots[slot].blocks = self.slots[slot].blocks + blocks
        if new:
            rows, cols, vals = zip(*new)  # (row, table column, block) of each new entry
            self.table[list(rows), list(cols)] = torch.tensor(vals, device=self.device)

    def _reserve(self, slots: list[int], lengths: list[int]) -> None:
        """Give each slot the blocks to hold `lengths` tokens; all or nothing (a pool error changes no state)."""
        need = [max(0, -(-n // self.block_size) - len(self.slots[s].blocks)) for s, n in zip(slots, lengths)]
        new = self._alloc(sum(need))
        self._grant([(s, new[i - k : i]) for s, k, i in zip(slots, need, itertools.accumulate(need))])

    def _share(self, src: int, dst: list[int]) -> None:
        """dst rows take src's prompt: its full blocks by reference, a private copy of a partly filled last block
        (each row writes its own next tokens there)."""
        s, bs = self.slots[src], self.block_size
        full = s.blocks[: s.cached // bs]
        copies = self._alloc(len(dst)) if s.cached % bs else []
        if copies:
            last = s.blocks[len(full)]
            idx = torch.tensor(copies, device=self.device)
            self.cache.k[:, idx] = self.cache.k[:, last : last + 1]  # (L, n, bs, Hkv, D)
            self.cache.v[:, idx] = self.cache.v[:, last : last + 1]
        for b in full:
            self.refs[b] += len(dst)
        self._grant([(d, full + copies[i : i + 1]) for i, d in enumerate(dst)])
        for d in dst:
            self.slots[d].cached = s.cached

    @torch.no_grad()
    def _prefill(self, seqs: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Write each token list into its slot at its cursor (blocks reserved); return the last-token logits (B, V)."""
        out, bs, i = [], self.block_size, 0
        while i < len(seqs):
            # Chunks bounded by a padded-token budget so a big batch of long prompts does not blow up activations.
            j = i + 1
            while j < len(seqs) and max(map(len, seqs[i:j + 1])) * (j + 1 - i) <= self.prefill_tokens:
                j += 1
            chunk, rows = seqs[i:j], slots[i:j]
            T = max(len(s) for s in chunk)
            # (submit and append have checked that every row fits max_len; a chunk is one append or prompts at 0)
            starts = [self.slots[r].cached for r in rows]
            toks = torch.tensor([list(s) + [0] * (T - len(s)) for s in chunk], device=self.device)  # (B, T)
            # Right padding: pads take the positions after a row's own tokens, so its real tokens never see them;
            # they write into the row's own last block or the scratch block (table entries past its end are 0).
            pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)  # (B, T)
            last = torch.tensor([len(s) - 1 for s in chunk], device=self.device)[:, None]  # (B, 1)
            width = -(-(max(starts) + T) // bs)
            table = self.table[torch.tensor(rows, device=self.device), :width]  # (B, nb)
            logits = self.model(toks, positions=pos, cache=self.cache, block_table=table, logits_at=last)
            for r, s in zip(rows, chunk):
                self.slots[r].cached += len(s)
            out.append(logits[:, 0])  # (B, V)
            i = j
        return torch.cat(out)  # (B, V)

    def submit(self, prompt: list[int], sampling: SamplingParams, n: int = 1, seeds: list | None = None) -> list[int]:
        """Prefill `prompt` once into n free slots (a GRPO group); the rows start decoding. Returns the slots.
        seeds: one key per row (e.g. (seed, question, sample)) seeding its random stream; default: the admission
        counter, deterministic for a given order of submits."""
        return self.submit_many([prompt], sampling, n, seeds)[0]

    def submit_many(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1,
                    seeds: list | None = None) -> list[list[int]]:
        """Like submit for several prompts at once: one ragged prefill for all of them; seeds prompt-major."""
        self._check(sampling)
        free = [i for i, s in enumerate(self.slots) if s.state == FREE]
        if len(free) < n * len(prompts):
            raise RuntimeError(f"{len(prompts)} prompts x {n} need {n * len(prompts)} free slots, {len(free)} free")
        if bad := [len(p) for p in prompts if not 0 < len(p) < self.max_len]:
            raise ValueError(f"prompt of {bad[0]} tokens does not fit max_len={self.max_len}")
        if seeds is not None and len(seeds) != n * len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {n * len(prompts)} rows")
        blocks = sum(-(-len(p) // self.block_size) + (n - 1) * (len(p) % self.block_size > 0) for p in prompts)
        if blocks > len(self.free_blocks):
            self._alloc(blocks)  # raises with the numbers, before any state changes
        groups = [free[i * n : (i + 1) * n] for i in range(len(prompts))]
        heads = [g[0] for g in groups]
        self._reserve(heads, [len(p) for p in prompts])
        logits = self._prefill(prompts, heads)  # (P, V)
        for g in groups:
            self._share(g[0], g[1:])
        rows = [s for g in groups for s in g]
        for r, key in zip(rows, seeds if seeds is not None else [None] * len(rows)):
            key = ("admission", self.n_admitted) if key is None else key
            self.slots[r].gen = torch.Generator(self.device).manual_seed(row_seed(self.seed, key))
            self.n_admitted += 1
        self._sample(rows, logits.repeat_interleave(n, dim=0), sampling)
        return groups

    def append(self, slot: int, tokens: list[int], sampling: SamplingParams) -> None:
        """Append forced tokens to a parked row (prefilled at its own offset); the row decodes a new turn."""
        s = self.slots[slot]
        if s.state != PARKED:
            raise RuntimeError(f"slot {slot} is not parked")
        self._check(sampling)
        seq = ([s.pending] if s.pending is not None else []) + list(tokens)
        if s.cached + len(seq) >= self.max_len:
            raise ValueError(f"slot {slot}: {self.length(slot)} + {len(tokens)} tokens exceed max_len={self.max_len}")
        self._reserve([slot], [s.cached + len(seq)])
        s.pending = None
        self._sample([slot], self._prefill([seq], [slot]), sampling)

    def _check(self, sampling: SamplingParams) -> None:
        if sampling.stop_strings and self.decode is None:  # never silently ignore a stop the caller asked for
            raise ValueError("stop_strings need the engine's `decode` (e.g. Engine(..., decode=tokenizer.decode))")

    def _sample(self, rows: list[int], logits: torch.Tensor, new_turn: SamplingParams | None = None) -> None:
        """Sample one token per row (the first of a new turn under `new_turn`), bring tokens and logprobs to the
        host in one transfer, park rows that stop."""
        slots = [self.slots[r] for r in rows]
        for s in slots if new_turn else []:
            s.state, s.sampling, s.tokens, s.logprobs = DECODING, new_turn, [], []
        toks, lps = sample(logits, [s.sampling for s in slots], [s.gen for s in slots])
        both = torch.stack([toks.double(), lps.double()]).tolist()  # one host sync per step
        for r, s, t, lp in zip(rows, slots, map(int, both[0]), both[1]):
            s.pending = t
            s.tokens.append(t)
            s.logprobs.append(lp)
            if reason := self._stop_reason(s, t):
                s.state = PARKED
                self._done.append(Finished(r, s.tokens, s.logprobs, reason))

    def _stop_reason(self, s: Slot, t: int) -> str | None:
        sp = s.sampling
        if t in sp.stop_token_ids:
            return "stop_token"
        if sp.stop_strings:
            # Decode only when t could complete a stop string: its text holds a stop string's last char (or is part
            # of a multi-byte char, or a stop string ends in whitespace a tokenizer may strip from a lone token).
            if (piece := self._pieces.get(t)) is None:
                piece = self._pieces[t] = self.decode([t])
            if "\ufffd" in piece or any(x[-1] in piece or x[-1].isspace() for x in sp.stop_strings):
                tail = self.decode(s.tokens[-(max(map(len, sp.stop_strings)) + 2):])  # a token holds >= 1 char
                if any(x in tail for x in sp.stop_strings):
                    return "stop_string"
        if len(s.tokens) >= sp.max_new_tokens:
            return "length"
        if s.cached + 1 >= self.max_len:  # the pending token needs the last cache position
            return "context"
        return None

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One decode step for all decoding rows; returns the rows that stopped (also those stopped at admission)."""
        rows = [i for i, s in enumerate(self.slots) if s.state == DECODING]
        if rows:
            self._decode(rows)
        done, self._done = self._done, []
        return done

    def _decode(self, rows: list[int]) -> None:
        """The decode forward over static buffers, eager or (cuda_graphs) a graph replay. A bucket's padding rows run
        on the scratch block (token 0 at position 0, a table of zeros), so they write and read nothing real."""
        slots = [self.slots[r] for r in rows]
        self._reserve(rows, [s.cached + 1 for s in slots])  # the pending token may open a new block
        B, width = len(rows), max(len(s.blocks) for s in slots)
        Bb, W = self._buckets(B, width) if self.cuda_graphs else (B, width)
        st = self._static
        # Logits go to the one static output, so a graph keeps no (Bb, V) tensor of its own alive.
        run = lambda: st["out"][:Bb].copy_(self.model(  # noqa: E731
            st["tok"][:Bb], positions=st["pos"][:Bb], cache=self.cache, block_table=st["table"][:Bb, :W])[:, -1])
        if self.cuda_graphs and (Bb, W) not in self._graphs:
            for v in st.values():  # the warm-up really runs: make it write to the scratch block only
                v.zero_()
            self._graphs[(Bb, W)] = self._capture(run)
        for v in (st["tok"], st["pos"], st["table"]):
            v[B:Bb].zero_()
        st["tok"][:B, 0] = torch.tensor([s.pending for s in slots], device=self.device)
        st["pos"][:B, 0] = torch.tensor([s.cached for s in slots], device=self.device)
        st["table"][:B, :W] = self.table[torch.tensor(rows, device=self.device), :W]
        (self._graphs[(Bb, W)].replay if self.cuda_graphs else run)()
        for s in slots:
            s.cached += 1
        self._sample(rows, st["out"][:B])  # (B, V)

    def _buckets(self, B: int, width: int) -> tuple[int, int]:
        """Graph sizes: batch 1, 2, 4, 8, then multiples of 16; table width a power of two (<= max_blocks)."""
        Bb = next(b for b in (1, 2, 4, 8) if b >= B) if B <= 8 else -(-B // 16) * 16
        return Bb, min(self.max_blocks, 1 << (width - 1).bit_length())

    def _capture(self, run):
        """Warm `run` up on a side stream (lazy inits, cuBLAS workspaces), then capture it in a CUDA graph."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):  # tool threads go on
            run()
        return graph


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             stop_token_ids=(), seed: int = 0, *, top_k: int = 0, stop_strings=(), decode=None,
             n_slots: int | None = None, max_len: int | None = None, return_logprobs: bool = False, **engine_kw):
    """New token ids for each prompt (ending with the stop token when one was hit); continuous batching over
    `n_slots` rows (default: all prompts at once, at most 64). Prompt i samples from the stream keyed i, whatever
    n_slots is. engine_kw: Engine options (block_size, kv_tokens, cuda_graphs)."""
    sp = SamplingParams(temperature, top_p, top_k, max_new_tokens, tuple(stop_token_ids), tuple(stop_strings))
    if not prompts:
        return []
    n_slots = n_slots or max(1, min(len(prompts), 64))
    max_len = max_len or max(len(p) for p in prompts) + max_new_tokens + 1
    eng = Engine(model, n_slots, max_len, decode=decode, seed=seed, **engine_kw)
    out, owner, queue = [None] * len(prompts), {}, list(range(len(prompts)))  # owner: slot -> prompt index
    while queue or owner:
        take, queue = queue[:eng.n_free], queue[eng.n_free:]
        for i, g in zip(take, eng.submit_many([prompts[i] for i in take], sp, seeds=take) if take else []):
            owner[g[0]] = i
        for f in eng.step():
            i = owner.pop(f.slot)
            out[i] = (f.tokens, f.logprobs) if return_logprobs else f.tokens
            eng.release(f.slot)
    return out


# =====================================================================================================================
# Part 2: the research-agent loop

@dataclass
class Turn:
    """One assistant turn and what followed it."""
    text: str                      # the sampled tokens of this turn, decoded (for reading and parsing only)
    tool: str | None               # "web_search" | "browse_webpage" | None
    args: dict | None              # the parsed arguments, e.g. {"query": [...]}
    observation: str | None        # the text appended after this turn (tool result or error message)
    error: str | None              # why the call was rejected, or why the trajectory ended here
    n_tokens: int                  # sampled tokens in this turn
    gen_s: float                   # wall time from the row (re)starting to this turn finishing
    tool_s: float                  # wall time of the tool call (0 when none ran)


@dataclass
class Trajectory:
    question: str
    group: int                     # index of the question in rollout()'s input list (the caller holds its gold)
    tokens: list[int] = field(default_factory=list)  # prompt + turns + observations, exactly the engine's cache
    loss_mask: list[int] = field(default_factory=list)  # 1 exactly on sampled tokens
    logprobs: list[float] = field(default_factory=list)  # sampled-token logprobs, 0.0 where loss_mask is 0
    prompt_len: int = 0
    turns: list[Turn] = field(default_factory=list)
    answer: str | None = None
    end_reason: str = ""           # one of END_REASONS (see the module docstring)
    stats: dict = field(default_factory=lambda: dict(n_search=0, n_browse=0, n_bad_calls=0, n_turns=0))


END_REASONS = ("answer", "format_error", "bad_call", "max_turns", "context_limit", "tool_failure", "engine_error")


@dataclass
class RolloutConfig:
    protocol: str = "tags"             # "tags" | "dr"
    max_turns: int = 10                # generation turns (reference 10)
    max_new_tokens: int = 512          # per turn (reference 2000)
    max_len: int = 8192                # context budget per row = engine cache length
    temperature: float = 1.0
    top_p: float = 1.0
    n_slots: int = 64                  # rows decoding at once (fewer are allocated when there is less work)
    on_bad_call: str = "error_observation"   # or "end" (reference: a malformed call is a format error)
    date: str | None = None            # today's date in the system prompt; None = the real date
    tool_threads: int = 32             # concurrent tool calls (each blocks on the web)
    min_turn_tokens: int = 64          # an observation must leave this much room for the next turn
    prompt: str = "reference"          # system prompt: "reference" (the paper's, ~440 tokens) | "short" (~40 tokens)
    # forced text opening turn i (loss mask 0), e.g. ("<search>", "<answer>") or "<search>,<answer>": a scaffold for
    # models too small to find the format alone (SmolLM2-135M); () = none, the reference
    turn_prefixes: tuple | str = ()
    turn_prefix_every: str = ""        # forced text opening EVERY turn, before turn_prefixes[i] (reference: "<think>")
    example: str = ""                  # "question|query|answer": a worked example before the question (example_turns)


# ------------------------------------------------------------------------------------------------ prompt
ARG_KEY = {"web_search": "query", "browse_webpage": "url_list"}
TOOLS = [  # JSON schemas, as the reference shows them: one list-of-strings argument each (ARG_KEY)
    {"name": name, "description": what, "parameters": {"type": "object", "required": [ARG_KEY[name]], "properties": {
        ARG_KEY[name]: {"type": "array", "items": {"type": "string"}, "description": arg}}}}
    for name, what, arg in [
        ("web_search", "Search the web. Returns the title, URL and snippet of the top results for each query. "
                       "Give at most 3 queries per call.", "Search queries."),
        ("browse_webpage", "Read web pages found by your most recent web_search and return the information in them "
                           "that is relevant to the question. Only URLs from the most recent search can be read.",
         "URLs to read.")]]

_CALL_FORMAT = {
    "dr": ('<tool_call>{"name": "web_search", "arguments": {"query": ["first query", "second query"]}}</tool_call>\n'
           '<tool_call>{"name": "browse_webpage", "arguments": {"url_list": ["https://..."]}}</tool_call>'),
    "tags": ("<search>first query | second query</search>   (runs web_search; separate queries with |)\n"
             "<browse>https://... | https://...</browse>   (runs browse_webpage; separate URLs with |)")}
_SHORT_CALLS = {  # search only: placeholder words are what a small model copies ("its url" became every query)
    "dr": 'Search with <tool_call>{"name": "web_search", "arguments": {"query": ["query"]}}</tool_call>.',
    "tags": "Search with <search>query</search>."}


def system_prompt(protocol: str, date: str | None = None, style: str = "reference") -> str:
    """The reference system prompt's content in our own words, with the tools rendered as JSON schemas; or, with
    style="short", three sentences (~30 tokens) for small models and CPU budgets: search and the answer tag."""
    if style == "short":
        return (f"You answer questions by searching the web. {_SHORT_CALLS[protocol]} "
                "Answer with <answer>answer</answer>.")
    if style == "closed_book":  # the no-tools baseline (eval.py --agent=closed_book)
        return "You answer questions. Answer with <answer>answer</answer>."
    if style != "reference":
        raise ValueError(f"prompt style must be 'reference', 'short' or 'closed_book', got {style!r}")
    date = date or _dt.date.today().isoformat()
    tools = "\n".join(json.dumps(t) for t in TOOLS)
    return (f"You are a Deep AI Research Assistant. Today is {date}.\n"
            "Answer the user's question accurately. Think step by step, search the web and read web pages until you "
            "are confident of the answer; do not guess when you can look it up.\n\n"
            f"# Tools\nYou can use these tools (JSON schemas):\n{tools}\n\n"
            "# How to reply\n"
            "Every reply starts with your reasoning inside <think> </think>. After it, do exactly one of:\n"
            f"1. call one tool, written as:\n{_CALL_FORMAT[protocol]}\n"
            "2. give the final answer: <answer>your answer</answer>\n"
            "Tool results come back to you inside <tool_response> </tool_response>.\n"
            "Keep the final answer short: a name, date, number or short phrase, not a sentence. "
            "Answer yes/no questions with yes or no.")


def render_prompt(tokenizer, question: str, protocol: str, date: str | None = None, style: str = "reference",
                  example: list[dict] = ()) -> list[int]:
    """Prompt token ids through the chat template: system, the example's turns, the question, the assistant header."""
    sys_text, msgs = system_prompt(protocol, date, style), [*example, {"role": "user", "content": question}]
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": sys_text}, *msgs], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001  templates without a system role raise (jinja TemplateError): merge into user
        msgs[0] = {"role": "user", "content": f"{sys_text}\n\nQuestion: {msgs[0]['content']}"}
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def example_turns(example: str, protocol: str, session) -> list[dict]:
    """One worked example as chat turns, from "question|query|answer": the question, a search call, the real
    observation of that search (through the same browser, so it looks exactly like the ones the policy will see),
    and the answer. A format demonstration for small models; its question must not be one it is scored on."""
    question, query, answer = (x.strip() for x in example.split("|"))
    ask, reply = {"role": "user", "content": question}, {"role": "assistant", "content": f"<answer>{answer}</answer>"}
    if not query:  # a closed-book example: the question and its answer only
        return [ask, reply]
    call = (f"<search>{query}</search>" if protocol == "tags" else
            "<tool_call>" + json.dumps({"name": "web_search", "arguments": {"query": [query]}}) + "</tool_call>")
    return [ask, {"role": "assistant", "content": call},
            {"role": "user", "content": f"<tool_response>\n{session.web_search([query])}\n</tool_response>"}, reply]


@dataclass
class ObsFrame:
    """The forced text around an observation: `before` closes the assistant turn and opens the tool/user turn,
    `after` closes it and opens the next assistant turn. Taken from the chat template once per rollout."""
    before: str
    after: str
    before_ids: list[int]
    after_ids: list[int]


def obs_frame(tokenizer) -> ObsFrame:
    mark_a, mark_o = "\x00ASSISTANT\x00", "\x00OBSERVATION\x00"
    role = "tool" if re.search(r"""['"]tool['"]""", tokenizer.chat_template or "") else "user"  # the template's own
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark_a},
            {"role": role, "content": mark_o}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    before, after = text[text.index(mark_a) + len(mark_a):].split(mark_o)
    if "<tool_response>" not in before:  # templates without tool support: wrap it ourselves, like Qwen2.5 does
        before, after = before + "<tool_response>\n", "\n</tool_response>" + after
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return ObsFrame(before, after, enc(before), enc(after))


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """eos plus the end-of-turn tokens chat models emit (Qwen2.5-Instruct stops on either of two)."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>") if t in vocab}
    return tuple(sorted(ids | ({tokenizer.eos_token_id} - {None})))  # a tokenizer may have no eos


# ------------------------------------------------------------------------------------------------ parsing
@dataclass
class Action:
    """What a turn asks for: kind is "answer", "call", "bad_call" or "none"."""
    kind: str
    tool: str | None = None
    args: dict | None = None
    answer: str | None = None
    error: str | None = None


STOP_STRINGS = {"dr": ("</tool_call>", "</answer>"), "tags": ("</search>", "</browse>", "</answer>")}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def parse_turn(text: str, protocol: str) -> Action:
    """What one turn of the policy (only its own text) asks for. The text is read up to its first closing tag (of a
    call or an answer), where the engine stopped the turn: the stop string can fire inside a token that carries more
    (SmolLM2 tokenises "</search>," as "</", "search", ">,"). An answer with no stop string hit (eos) still counts."""
    call_tags = ("tool_call",) if protocol == "dr" else ("search", "browse")
    ends = [i + len(c) for c in (*(f"</{t}>" for t in call_tags), "</answer>") if (i := text.find(c)) >= 0]
    body = text[:min(ends)] if ends else text.rstrip()
    for tag in call_tags:
        if body.endswith(close := f"</{tag}>"):
            start = body.rfind(f"<{tag}>")
            if start < 0:
                return Action("bad_call", error=f"{close} without <{tag}>")
            return _parse_call(tag, body[start + len(tag) + 2:len(body) - len(close)].strip())
    if m := _ANSWER.search(body):
        return Action("answer", answer=m.group(1).strip())
    for tag in call_tags:
        if f"<{tag}>" in body:
            return Action("bad_call", error=f"<{tag}> is not closed")
    return Action("none", error="the turn has neither a tool call nor an answer")


def _parse_call(tag: str, inner: str) -> Action:
    """A closed call's tool and arguments: JSON under `dr`, `q1 | q2` under `tags`; a lone string where a list is
    asked for is accepted (it is unambiguous)."""
    if tag == "tool_call":
        try:
            call = json.loads(inner)
        except json.JSONDecodeError as e:
            return Action("bad_call", error=f"tool call is not valid JSON ({e.msg})")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Action("bad_call", error='tool call must be {"name": ..., "arguments": {...}}')
        name, arguments = call["name"], call.get("arguments")
        if name not in ARG_KEY:
            return Action("bad_call", error=f"unknown tool '{name}' (use web_search or browse_webpage)")
        if not isinstance(arguments, dict):
            return Action("bad_call", tool=name, error=f"{name}: 'arguments' must be an object")
        value = arguments.get(ARG_KEY[name])
    else:
        name, value = ("web_search" if tag == "search" else "browse_webpage"), inner.split("|")
    key, value = ARG_KEY[name], [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return Action("bad_call", tool=name, error=f"{name}: '{key}' must be a list of strings")
    value = [v.strip() for v in value if v.strip()]
    return Action("call", tool=name, args={key: value}) if value else Action("bad_call", tool=name,
                                                                             error=f"{name}: empty '{key}'")


def bad_call_message(error: str, protocol: str) -> str:
    """The short observation a malformed call gets under on_bad_call='error_observation'."""
    how = ('<tool_call>{"name": ..., "arguments": {...}}</tool_call>' if protocol == "dr"
           else "<search>query</search> or <browse>url</browse>")
    return f"Error: {error}. Call a tool as {how}, or give the final answer as <answer>...</answer>."


def run_tool(session, tool: str, args: dict) -> tuple[str, float, bool]:
    """Run one call on a browser session: (text, seconds, failed: a browse.Observation's `.failed`, the web's fault).
    Sessions should not raise; an exception anyway is a tool failure, so one row cannot take the rollout down."""
    t0 = time.perf_counter()
    try:
        obs = session.web_search(args["query"]) if tool == "web_search" else session.browse_webpage(args["url_list"])
        text, failed = str(obs), bool(getattr(obs, "failed", False))  # text: a plain str, JSON-safe in records
    except Exception as e:  # noqa: BLE001
        text, failed = f"Error: {tool} failed ({type(e).__name__}: {e})", True
    return text, time.perf_counter() - t0, failed


def _defang(text: str, specials: list[str]) -> str:
    """Web text that spells a control token (`<|im_end|>`) must not become that token: break it up."""
    for s in filter(None, specials):
        text = text.replace(s, s[:1] + " " + s[1:])
    return text


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class _Row:
    """Loop-side state of one live trajectory (slot -> _Row); its current turn is traj.turns[-1]."""
    traj: Trajectory
    session: object
    t_start: float                     # when the trajectory was admitted
    t_turn: float                      # when the current turn started decoding


def _extend(t: Trajectory, tokens: list[int], logprobs: list[float] | None = None) -> None:
    """Add sampled tokens (with their logprobs: loss mask 1) or forced ones (no logprobs: mask 0) to a trajectory."""
    t.tokens += tokens
    t.loss_mask += [int(logprobs is not None)] * len(tokens)
    t.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)


def rollout(model, tokenizer, questions: list[str], browser, cfg: RolloutConfig, group_size: int = 1, seed: int = 0,
            *, engine=None) -> list[Trajectory]:
    """Run the agent on every question `group_size` times; returns trajectories question-major
    (question i's rows are [i*G, (i+1)*G), each with `group` = i: the caller scores them against its own gold
    answers). `engine` overrides the Engine built here (tests, benchmarks)."""
    if cfg.protocol not in STOP_STRINGS:
        raise ValueError(f"protocol must be 'tags' or 'dr', got {cfg.protocol!r}")
    if cfg.on_bad_call not in ("end", "error_observation"):
        raise ValueError(f"on_bad_call must be 'end' or 'error_observation', got {cfg.on_bad_call!r}")
    G = group_size
    if engine is None:
        n_slots = min(cfg.n_slots, len(questions) * G)
        if n_slots < G:
            raise ValueError(f"n_slots={cfg.n_slots} cannot hold a group of {G}")
        engine = Engine(model, n_slots=n_slots, max_len=cfg.max_len,
                        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False), seed=seed)
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              stop_token_ids=stop_token_ids(tokenizer), stop_strings=STOP_STRINGS[cfg.protocol])
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    frame = obs_frame(tokenizer)
    # after a turn that closed itself (its stop token is eos/<|im_end|>), the frame goes on without closing it twice
    closed = {t: tokenizer.decode([t]) for t in sampling.stop_token_ids}
    opening = {t: enc(frame.before[len(c):]) for t, c in closed.items() if frame.before.startswith(c)}
    example = example_turns(cfg.example, cfg.protocol, browser.session("")) if cfg.example else []
    tp = cfg.turn_prefixes.split(",") if isinstance(cfg.turn_prefixes, str) else list(map(str, cfg.turn_prefixes))
    # turn i opens with turn_prefix_every + turn_prefixes[i]; the last entry covers every later turn
    prefixes = [(p, enc(p)) for p in ((cfg.turn_prefix_every or "") + p for p in [*tp, ""])]
    prefix = lambda i: prefixes[min(i, len(prefixes) - 1)]  # noqa: E731  (text, ids)
    specials = list(getattr(tokenizer, "all_special_tokens", []))
    out: list[Trajectory | None] = [None] * (len(questions) * G)
    queue = deque(range(len(questions)))
    rows: dict[int, _Row] = {}
    futures: dict[Future, int] = {}   # tool call in flight -> slot

    def finish(slot: int, end_reason: str, answer: str | None = None, error: str | None = None) -> None:
        row = rows.pop(slot)
        engine.release(slot)
        t = row.traj
        if error:  # added to the turn's own error (a bad call's, say)
            t.turns[-1].error = "; ".join(filter(None, [t.turns[-1].error, error]))
        t.end_reason, t.answer = end_reason, answer
        t.stats.update(n_turns=len(t.turns), wall_s=time.perf_counter() - row.t_start,
                       gen_s=sum(x.gen_s for x in t.turns), tool_s=sum(x.tool_s for x in t.turns))

    def resume(slot: int, observation: str) -> None:
        """Append the forced observation tokens to the parked row, or end it when they would not fit."""
        t = rows[slot].traj
        t.turns[-1].observation = observation
        forced = (opening.get(t.tokens[-1], frame.before_ids) + enc(_defang(observation, specials))
                  + frame.after_ids + prefix(len(t.turns))[1])
        if len(t.tokens) + len(forced) + cfg.min_turn_tokens > cfg.max_len:
            return finish(slot, "context_limit", error="observation does not fit in the context budget")
        try:
            engine.append(slot, forced, sampling)
        except (RuntimeError, ValueError) as e:  # the engine refused the row: end it, keep the others going
            return finish(slot, "engine_error", error=f"engine: {type(e).__name__}: {e}")
        _extend(t, forced)
        rows[slot].t_turn = time.perf_counter()

    def on_finished(fin: Finished) -> None:
        row = rows[fin.slot]
        t = row.traj
        _extend(t, fin.tokens, fin.logprobs)
        text = prefix(len(t.turns))[0] + tokenizer.decode(fin.tokens, skip_special_tokens=True)
        act = parse_turn(text, cfg.protocol)
        turn = Turn(text=text, tool=act.tool, args=act.args, observation=None, error=act.error,
                    n_tokens=len(fin.tokens), gen_s=time.perf_counter() - row.t_turn, tool_s=0.0)
        t.turns.append(turn)
        if act.kind == "answer":
            return finish(fin.slot, "answer", act.answer)
        if fin.reason == "context":
            turn.error = "context budget exhausted while generating"
            return finish(fin.slot, "context_limit")
        if act.kind == "none":
            if fin.reason == "length":
                turn.error = f"no tool call or answer within max_new_tokens={cfg.max_new_tokens}"
            return finish(fin.slot, "format_error")
        t.stats["n_bad_calls"] += act.kind == "bad_call"
        if act.kind == "bad_call" and cfg.on_bad_call == "end":
            return finish(fin.slot, "bad_call")
        if len(t.turns) >= cfg.max_turns:  # no turn left to read the observation: do not run the call
            return finish(fin.slot, "max_turns")
        if act.kind == "bad_call":
            return resume(fin.slot, bad_call_message(act.error, cfg.protocol))
        t.stats["n_search" if act.tool == "web_search" else "n_browse"] += 1
        futures[pool.submit(run_tool, row.session, act.tool, act.args)] = fin.slot

    def on_tool_done(fut: Future) -> None:
        slot, (text, seconds, failed) = futures.pop(fut), fut.result()
        turn = rows[slot].traj.turns[-1]
        turn.tool_s = seconds
        if failed:  # the web, not the policy, failed: end here (the trainer keeps it out of the loss)
            turn.observation, turn.error = text, "the tool failed (infrastructure)"
            return finish(slot, "tool_failure")
        resume(slot, text)

    def admit() -> None:
        """Queued questions take free slots, a whole group at a time (its prompt is prefilled once)."""
        while queue and engine.n_free >= G:
            qi = queue.popleft()
            prompt = render_prompt(tokenizer, questions[qi], cfg.protocol, cfg.date, cfg.prompt, example)
            first = prompt + prefix(0)[1]  # the first turn's forced prefix rides with the prompt's prefill
            trajs = [Trajectory(questions[qi], qi, prompt_len=len(prompt)) for _ in range(G)]
            out[qi * G : (qi + 1) * G] = trajs
            for tr in trajs:
                _extend(tr, first)
            if len(first) + cfg.min_turn_tokens > cfg.max_len:  # nothing to decode: never occupy a slot
                for tr in trajs:
                    tr.end_reason = "context_limit"
                continue
            # one random stream per trajectory, keyed (seed, question, sample): same run whatever order calls end in
            now = time.perf_counter()
            for slot, tr in zip(engine.submit(first, sampling, n=G, seeds=[(seed, qi, g) for g in range(G)]), trajs):
                rows[slot] = _Row(traj=tr, session=browser.session(questions[qi]), t_start=now, t_turn=now)

    with ThreadPoolExecutor(max_workers=cfg.tool_threads, thread_name_prefix="tool") as pool:
        while queue or rows:
            admit()
            if queue and not rows:
                raise ValueError(f"the engine has {engine.n_free} free slots, a group needs {G}")
            # A live row decodes, waits on a tool, or stopped on the first token that submit()/append() sampled:
            # the engine queued it as done, and step() returns it (with no forward when no row decodes).
            if engine.n_decoding or len(rows) > len(futures):
                done = engine.step()
                for fin in done:
                    on_finished(fin)
                if not done and not engine.n_decoding:  # a row is unaccounted for: fail rather than spin
                    raise RuntimeError(f"rows {sorted(rows)} are neither decoding nor waiting on a tool")
            elif futures:  # every live row waits on the web: block until one call returns
                wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in [f for f in futures if f.done()]:
                on_tool_done(fut)
    return out
