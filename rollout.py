"""Generation engine and research-agent loop: everything that turns a policy into trajectories.

Part 1, the engine (`Engine`, `generate`): a paged KV cache (`model.KVCache`: one pool of `block_size`-token blocks, a
block table, a length per row and a refcount per block, so memory follows the tokens rows hold). Its pieces, in
reading order: the block pool (`BlockPool`: refcounts, free list, share, release), admission (`submit`: a GRPO group
shares its prompt's full blocks by reference; `keep_prefix`: the head all of a rollout's prompts share, the system
prompt and worked example, is prefilled once and held; `append`: forced tokens at the row's own offset), prefill,
sampling, the decode step (`step`), and the CUDA-graph capture of that step. A row is free, decoding, parked (its turn
ended, waiting for `append` or `release`) or waiting (it has tokens to prefill before it can go on). A row's last
sampled token enters the cache with the next forward, so a stop token costs no forward. Each token comes with its
log-prob under the sampling distribution (temperature applied, before top-p/top-k: what the trainer recomputes). Each
row samples by Gumbel-max from its own generator seeded from (engine seed, row key), so its tokens do not depend on
which rows share its batches or when tool calls return (logits still differ in the last bits with the batch: a
near-tie can flip a token, rarely on CPU, more often in bf16).

Running out of blocks is normal: `can_admit` says whether the free blocks cover a new group's prompt and one turn,
and when a decode step needs a block that is not free, the engine preempts a row (a parked one first, then the
newest decoding one): its blocks go back to the pool, and it is resumed later by re-prefilling its exact tokens, so
its sampled tokens and its random stream are unchanged. CUDA graphs are off by default (`cuda_graphs=False`): the
GPU test (`test_cuda_graphs_match_eager`) and the bench have not yet passed on a device with the training path.

Part 2, the agent loop (`rollout()`): every row decodes a turn; a turn that ends in a tool call parks its row while
the call runs in a thread pool and the others decode; the observation, wrapped in the chat template's tool turn and
the next assistant header, is appended as forced tokens. A finished trajectory frees its slots for the next question.
What a finished turn means is one pure function, `decide_turn`. `Trajectory.tokens` is exactly the cache content,
`loss_mask` is 1 exactly on sampled tokens (with their `logprobs`): nothing is re-rendered or re-tokenised, and only
the policy's own turn text is parsed, so web text cannot end a trajectory or fake an answer. Protocols: `dr` (the
reference's `<tool_call>{JSON}</tool_call>`) and `tags` (`<search>q1 | q2</search>`, which small models learn
faster), described in the system text. End reasons (exactly one each, END_REASONS): answer; max_turns (a call after
the last turn is not run); bad_call (a malformed call under on_bad_call="end"; "error_observation" answers it and
goes on); format_error (neither call nor answer); context_limit; tool_failure (the web failed, not the policy: the
trainer masks these); engine_error. `scripted_trajectory` builds, with no model, the trajectory a policy writing
given turn texts would get, through the same code.

Not here: a paged-attention kernel, automatic prefix caching (one kept prefix only), swapping preempted rows to host
memory (they are re-prefilled), speculative decoding, beam search. Bench (decode step vs the bandwidth floor):
`python bench/generate.py [--device=cuda]`; tests: `python -m pytest tests/test_engine.py tests/test_rollout.py`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import itertools
import json
import os
import re
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

import torch

from model import KVCache
from reward import normalize


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


FREE = 0
DECODING = 1
PARKED = 2
WAITING = 3  # has tokens to prefill (preempted, or appended to while the pool was full) before it can go on


@dataclass
class Slot:
    """One row of the engine: its state, its tokens, where their KV lives, and the turn it is sampling."""
    state: int = FREE
    blocks: list[int] = field(default_factory=list)  # physical KV blocks, in position order (some may be shared)
    seq: list[int] = field(default_factory=list)  # every token of the row that belongs in the cache, in order
    cached: int = 0  # how many of seq are in the cache (0 after a preemption)
    pending: int | None = None  # last sampled token, not yet in the cache
    sampling: SamplingParams | None = None
    new_turn: SamplingParams | None = None  # a waiting row that starts a turn under these once prefilled
    gen: torch.Generator | None = None  # the row's own random stream (see row_seed)
    admitted: int = 0  # admission order: preemption takes the newest row, resumption the oldest
    tokens: list[int] = field(default_factory=list)  # this turn's sampled tokens
    logprobs: list[float] = field(default_factory=list)


def blocks_for(n_tokens: int, block_size: int) -> int:
    """Blocks that hold n_tokens positions (ceiling division)."""
    return -(-n_tokens // block_size)


def memory_check(nbytes: int, device: torch.device) -> None:
    """Fail with numbers (asked vs free) instead of an opaque OOM when the KV cache cannot fit."""
    free = free_memory(device)
    if free is not None and nbytes > 0.9 * free:
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
    vocab_size = logits.shape[-1]
    device = logits.device
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    scaled = logits / temperature[:, None]  # (B, V)
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V): the distribution the trainer recomputes
    tokens = logits.argmax(-1)  # (B,): greedy rows draw nothing
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if drawn:
        drawn_idx = torch.tensor(drawn, device=device)
        filtered = scaled[drawn_idx]  # (b, V)
        drawn_params = [params[i] for i in drawn]
        if any(p.top_k > 0 or p.top_p < 1 for p in drawn_params):
            top_p = torch.tensor([p.top_p for p in drawn_params], device=device)
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in drawn_params], device=device)
            sorted_logits, order = filtered.sort(dim=-1, descending=True)  # (b, V)
            probs = sorted_logits.softmax(-1)
            # drop a token when the mass before it already reaches top_p (the first token always stays)
            drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
            drop |= torch.arange(vocab_size, device=device)[None] >= top_k[:, None]
            kept = sorted_logits.masked_fill(drop, float("-inf"))
            filtered = torch.empty_like(filtered).scatter_(-1, order, kept)
        # Gumbel-max: argmax(logit - log E), E ~ Exp(1), is a draw from softmax(logit) (torch.multinomial's own
        # trick), with each row's uniforms from its own generator. u = 0 gives E = inf: that token is never taken.
        uniforms = torch.stack([torch.rand(vocab_size, generator=gens[i], device=device) for i in drawn])  # (b, V)
        tokens[drawn_idx] = (filtered - torch.log(-torch.log(uniforms))).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def stop_reason(turn_tokens: list[int], sampling: SamplingParams, seq_len: int, max_len: int, decode,
                pieces: dict[int, str] | None = None) -> str | None:
    """Why a turn stops after its last token (None: it goes on). seq_len: the row's tokens so far, this one
    included. decode(ids) -> text is needed for stop strings; pieces caches each token's text alone, so the whole
    tail is decoded only when the token could complete a stop string (shared by the engine and scripted turns)."""
    token = turn_tokens[-1]
    if token in sampling.stop_token_ids:
        return "stop_token"
    if sampling.stop_strings:
        piece = pieces.get(token) if pieces is not None else None
        if piece is None:
            piece = decode([token])
            if pieces is not None:
                pieces[token] = piece
        # the token could complete a stop string when its text holds a stop string's last char (or is part of a
        # multi-byte char, or a stop string ends in whitespace a tokenizer may strip from a lone token)
        could_complete = "\ufffd" in piece or any(s[-1] in piece or s[-1].isspace() for s in sampling.stop_strings)
        if could_complete:
            tail_len = max(map(len, sampling.stop_strings)) + 2  # a token holds >= 1 char
            tail = decode(turn_tokens[-tail_len:])
            if any(s in tail for s in sampling.stop_strings):
                return "stop_string"
    if len(turn_tokens) >= sampling.max_new_tokens:
        return "length"
    if seq_len >= max_len:  # the pending token takes the last cache position
        return "context"
    return None


# ------------------------------------------------------------------------------------------------ the block pool
class BlockPool:
    """The paged cache's books: a refcount per block (a GRPO group's prompt blocks are held by all its rows), the
    free list, and the device block table, which mirrors each row's block list (0, the scratch block, past its end,
    so pad writes never reach another row). Block 0 is never handed out: pads and padding rows write there."""

    def __init__(self, cache: KVCache, n_rows: int, max_blocks: int, device: torch.device):
        self.cache = cache
        self.device = device
        self.refs = [0] * cache.n_blocks  # rows holding each block
        self.free = list(range(cache.n_blocks - 1, 0, -1))  # a stack: pop() hands out the lowest ids first
        self.table = torch.zeros(n_rows, max_blocks, dtype=torch.long, device=device)
        self.zero([0])

    @property
    def n_free(self) -> int:
        return len(self.free)

    def check(self, n: int) -> None:
        """Raise, with the numbers, when n blocks are not free (before any state changes)."""
        if n > len(self.free):
            block_size = self.cache.k.shape[2]
            raise RuntimeError(f"KV cache pool exhausted: {n} blocks asked, {len(self.free)} free of "
                               f"{self.cache.n_blocks - 1} ({block_size} tokens each): lower n_slots, or "
                               f"raise kv_tokens (Engine(..., kv_tokens=...))")

    def take(self, n: int) -> list[int]:
        """n fresh blocks, held once each, zeroed."""
        self.check(n)
        blocks = [self.free.pop() for _ in range(n)]
        for block in blocks:
            self.refs[block] = 1
        self.zero(blocks)
        return blocks

    def share(self, blocks: list[int], n_more: int) -> None:
        """n_more rows now hold these blocks too (by reference, not copied)."""
        for block in blocks:
            self.refs[block] += n_more

    def drop(self, blocks: list[int]) -> None:
        """A row lets go of its blocks; a shared block goes back to the free list when its last row lets go."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free.append(block)

    def zero(self, blocks: list[int]) -> None:
        """Zero blocks as they are handed out: the pool is allocated untouched (memory follows the blocks in use)."""
        if blocks:
            idx = torch.tensor(blocks, device=self.device)
            self.cache.k[:, idx] = 0
            self.cache.v[:, idx] = 0

    def copy(self, src: int, dst: list[int]) -> None:
        """Copy block src's keys and values into each block of dst."""
        idx = torch.tensor(dst, device=self.device)
        self.cache.k[:, idx] = self.cache.k[:, src : src + 1]  # (L, n, bs, Hkv, D)
        self.cache.v[:, idx] = self.cache.v[:, src : src + 1]

    def mirror(self, entries: list[tuple[int, int, int]]) -> None:
        """Write (row, table column, block) entries into the device table in one index_put."""
        if entries:
            rows, cols, blocks = zip(*entries)
            self.table[list(rows), list(cols)] = torch.tensor(blocks, device=self.device)

    def clear_row(self, row: int) -> None:
        self.table[row] = 0


# ------------------------------------------------------------------------------------------------ the engine
class Engine:
    """Slots over one paged KV cache (see the module docstring); only ever calls `model(...)` (plain or FSDP2).
    block_size: tokens per KV block. kv_tokens: tokens the pool holds, all rows together (None: every row can reach
    max_len, i.e. n_slots x max_len, capped on CUDA to what fits in the free memory; at least one row at max_len).
    cuda_graphs: capture the decode step per (batch, blocks) bucket and replay it (CUDA only; CPU is always eager;
    off by default until verified on a GPU)."""

    def __init__(self, model, n_slots: int, max_len: int, *, decode=None, seed: int = 0, prefill_tokens: int = 8192,
                 block_size: int = 16, kv_tokens: int | None = None, cuda_graphs: bool = False):
        first_param = next(model.parameters())
        model_cfg = model.config
        self.model = model
        self.n_slots = n_slots
        self.max_len = max_len
        self.decode = decode
        self.seed = seed
        self.device = first_param.device
        self.prefill_tokens = prefill_tokens
        self.block_size = block_size
        self.max_blocks = blocks_for(max_len, block_size)  # table width: blocks of a row at max_len
        block_bytes = KVCache.nbytes_for(model_cfg, block_size, first_param.dtype)
        if kv_tokens is None:
            kv_tokens = n_slots * self.max_blocks * block_size
            free = free_memory(self.device) if self.device.type == "cuda" else None
            if free is not None:  # like vLLM: leave room for activations, take what fits
                kv_tokens = min(kv_tokens, max(0, int(0.85 * free) - 2**30) // block_bytes * block_size)
        if blocks_for(kv_tokens, block_size) < self.max_blocks:  # preemption needs one row to fit alone
            raise MemoryError(f"the KV pool ({kv_tokens} tokens) cannot hold one row of max_len={max_len}: "
                              f"raise kv_tokens or free GPU memory, or lower max_len")
        n_blocks = blocks_for(kv_tokens, block_size) + 1  # + block 0, the scratch block
        memory_check(n_blocks * block_bytes, self.device)
        self.cache = KVCache.allocate(model_cfg, n_blocks, block_size, first_param.dtype, self.device, zero=False)
        self.pool = BlockPool(self.cache, n_slots, self.max_blocks, self.device)
        self.slots = [Slot() for _ in range(n_slots)]
        self.n_admitted = 0  # rows admitted so far: the key of rows submitted without seeds, and their order
        self._kept: tuple[list[int], list[int]] | None = None  # keep_prefix's (tokens, the blocks holding them)
        self._done: list[Finished] = []  # rows stopped since the last step() (a first token can already stop)
        self._pieces: dict[int, str] = {}  # token id -> its text alone (stop-string pre-check)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict = {}  # (batch bucket, table width) -> captured graph
        biggest_batch = self._buckets(n_slots, 1)[0]  # the decode step's buffers: every bucket is a view of them
        self._static = {
            "tok": torch.zeros(biggest_batch, 1, dtype=torch.long, device=self.device),
            "pos": torch.zeros(biggest_batch, 1, dtype=torch.long, device=self.device),
            "table": torch.zeros(biggest_batch, self.max_blocks, dtype=torch.long, device=self.device),
            "out": torch.zeros(biggest_batch, model_cfg.vocab_size, dtype=first_param.dtype, device=self.device),
        }
        # one memory pool for all captured graphs: the buckets never run at once
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # The pool's books, under the names the tests and benches read.
    @property
    def refs(self) -> list[int]:
        return self.pool.refs

    @property
    def free_blocks(self) -> list[int]:
        return self.pool.free

    @property
    def table(self) -> torch.Tensor:
        return self.pool.table

    @property
    def n_free(self) -> int:
        return sum(s.state == FREE for s in self.slots)

    @property
    def n_decoding(self) -> int:
        return sum(s.state == DECODING for s in self.slots)

    @property
    def n_waiting(self) -> int:
        return sum(s.state == WAITING for s in self.slots)

    def length(self, slot: int) -> int:
        """Tokens of the row's sequence so far (cache + the pending sampled token)."""
        row = self.slots[slot]
        return len(row.seq) + (row.pending is not None)

    def reseed(self, seed: int) -> None:
        """Rows submitted from now on draw from streams keyed by this seed (a reused engine changes no token)."""
        self.seed = seed

    # -------------------------------------------------------------------------------------------- row blocks
    def _reserve(self, slots: list[int], lengths: list[int]) -> None:
        """Give each slot the blocks to hold `lengths` tokens; all or nothing (a pool error changes no state)."""
        need = [max(0, blocks_for(n, self.block_size) - len(self.slots[s].blocks)) for s, n in zip(slots, lengths)]
        new_blocks = self.pool.take(sum(need))
        ends = itertools.accumulate(need)
        self._grant([(slot, new_blocks[end - n : end]) for slot, n, end in zip(slots, need, ends)])

    def _grant(self, grants: list[tuple[int, list[int]]]) -> None:
        """Append blocks to rows' block lists (each row once) and mirror them in the device table."""
        entries = []
        for slot, blocks in grants:
            start = len(self.slots[slot].blocks)
            entries += [(slot, start + j, block) for j, block in enumerate(blocks)]
            self.slots[slot].blocks = self.slots[slot].blocks + blocks
        self.pool.mirror(entries)

    def _share(self, src: int, dst: list[int]) -> None:
        """dst rows take src's prompt: its full blocks by reference, a private copy of a partly filled last block
        (each row writes its own next tokens there)."""
        source = self.slots[src]
        full = source.blocks[: source.cached // self.block_size]
        copies = self.pool.take(len(dst)) if source.cached % self.block_size else []
        if copies:
            self.pool.copy(source.blocks[len(full)], copies)
        self.pool.share(full, len(dst))
        self._grant([(row, full + copies[i : i + 1]) for i, row in enumerate(dst)])
        for row in dst:
            self.slots[row].cached = source.cached
            self.slots[row].seq = list(source.seq)

    def release(self, slot: int) -> None:
        self.pool.drop(self.slots[slot].blocks)
        self.slots[slot] = Slot()
        self.pool.clear_row(slot)

    def _evict(self, slot: int) -> None:
        """Preempt a row: its blocks go back to the pool; its tokens stay, to be re-prefilled when it resumes."""
        row = self.slots[slot]
        self.pool.drop(row.blocks)
        self.pool.clear_row(slot)
        row.blocks = []
        row.cached = 0
        if row.state == DECODING:  # a parked row stays parked: append() makes it wait
            row.state = WAITING
            row.new_turn = None

    def _victim(self, decoding: list[int], keep: int | None = None) -> int | None:
        """The row to preempt: the newest idle row (parked, or waiting) holding blocks, else the newest row of
        `decoding`; never `keep`."""
        idle = [i for i, s in enumerate(self.slots) if s.state in (PARKED, WAITING) and s.blocks and i != keep]
        candidates = idle or [i for i in decoding if self.slots[i].blocks and i != keep]
        if not candidates:
            return None
        return max(candidates, key=lambda i: self.slots[i].admitted)

    # -------------------------------------------------------------------------------------------- a kept prefix
    def keep_prefix(self, tokens: list[int]) -> int:
        """Prefill the full blocks of `tokens` once and hold them: a prompt submitted later that starts with them
        takes those blocks by reference and prefills only the rest (rollout() keeps the system prompt and worked
        example that all its questions share). Returns how many tokens are kept: 0 when `tokens` fill no block, no
        slot is free, or holding them would leave the pool too small for a group it takes now (one row at max_len
        plus a partial block per other slot). The blocks hold this model's keys and values: drop_prefix() before
        the weights change."""
        self.drop_prefix()
        n_blocks = min(len(tokens), self.max_len - 1) // self.block_size
        free_slots = [i for i, s in enumerate(self.slots) if s.state == FREE]
        if n_blocks == 0 or not free_slots or self.pool.n_free - n_blocks < self.max_blocks + self.n_slots - 1:
            return 0
        slot = free_slots[0]
        kept = list(tokens[: n_blocks * self.block_size])
        self._reserve([slot], [len(kept)])
        self.slots[slot].seq = kept
        try:
            self._prefill([slot])
        except BaseException:
            self.release(slot)
            raise
        blocks = self.slots[slot].blocks
        self.slots[slot] = Slot()  # the engine holds the blocks now (refcount 1), not a row
        self.pool.clear_row(slot)
        self._kept = (kept, blocks)
        return len(kept)

    def drop_prefix(self) -> None:
        """Let go of the kept prefix: its blocks go back to the pool once no row holds them."""
        if self._kept is not None:
            self.pool.drop(self._kept[1])
            self._kept = None

    def _reuse_kept(self, slot: int) -> None:
        """A new row whose tokens start with the kept prefix holds its blocks by reference: they are cached."""
        if self._kept is None:
            return
        tokens, blocks = self._kept
        row = self.slots[slot]
        if len(row.seq) > len(tokens) and row.seq[: len(tokens)] == tokens:
            self.pool.share(blocks, 1)
            self._grant([(slot, list(blocks))])
            row.cached = len(tokens)

    # -------------------------------------------------------------------------------------------- admission
    def group_blocks(self, prompt_len: int, n: int) -> int:
        """Blocks a group of n rows sharing a prompt of prompt_len tokens takes at submit."""
        partial_last = prompt_len % self.block_size > 0  # each row but the first copies a partly filled block
        return blocks_for(prompt_len, self.block_size) + (n - 1) * partial_last

    def can_admit(self, prompt_len: int, n: int, new_tokens: int) -> bool:
        """Whether n free slots and the free blocks cover a group's prompt plus one turn of new_tokens per row;
        never while a preempted row waits (it goes first). An idle engine takes any group whose prompt fits: its
        rows are preempted as they grow, so a pool smaller than a group's turn still runs it."""
        if self.n_free < n or self.n_waiting:
            return False
        if self.n_free == self.n_slots:
            return self.group_blocks(prompt_len, n) <= self.pool.n_free
        turn_end = min(prompt_len + new_tokens, self.max_len)
        shared = prompt_len // self.block_size  # full prompt blocks, held once for the group
        row_blocks = blocks_for(turn_end, self.block_size)
        return row_blocks + (n - 1) * (row_blocks - shared) <= self.pool.n_free

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
        n_rows = n * len(prompts)
        if len(free) < n_rows:
            raise RuntimeError(f"{len(prompts)} prompts x {n} need {n_rows} free slots, {len(free)} free")
        too_long = [len(p) for p in prompts if not 0 < len(p) < self.max_len]
        if too_long:
            raise ValueError(f"prompt of {too_long[0]} tokens does not fit max_len={self.max_len}")
        if seeds is not None and len(seeds) != n_rows:
            raise ValueError(f"{len(seeds)} seeds for {n_rows} rows")
        self.pool.check(sum(self.group_blocks(len(p), n) for p in prompts))
        groups = [free[i * n : (i + 1) * n] for i in range(len(prompts))]
        heads = [group[0] for group in groups]
        for head, prompt in zip(heads, prompts):
            self.slots[head].seq = list(prompt)
            self._reuse_kept(head)
        self._reserve(heads, [len(p) for p in prompts])
        logits = self._prefill(heads)  # (P, V)
        for group in groups:
            self._share(group[0], group[1:])
        rows = [slot for group in groups for slot in group]
        keys = seeds if seeds is not None else [None] * len(rows)
        for slot, key in zip(rows, keys):
            row = self.slots[slot]
            if key is None:
                key = ("admission", self.n_admitted)
            row.gen = torch.Generator(self.device).manual_seed(row_seed(self.seed, key))
            row.admitted = self.n_admitted
            self.n_admitted += 1
            self._start_turn(row, sampling)
        self._sample(rows, logits.repeat_interleave(n, dim=0))
        return groups

    def append(self, slot: int, tokens: list[int], sampling: SamplingParams) -> None:
        """Append forced tokens to a parked row (prefilled at its own offset); the row decodes a new turn. When the
        pool cannot take them now, the row waits and step() prefills it once blocks free up."""
        row = self.slots[slot]
        if row.state != PARKED:
            raise RuntimeError(f"slot {slot} is not parked")
        self._check(sampling)
        forced = ([row.pending] if row.pending is not None else []) + list(tokens)
        if len(row.seq) + len(forced) >= self.max_len:
            raise ValueError(f"slot {slot}: {self.length(slot)} + {len(tokens)} tokens exceed max_len={self.max_len}")
        row.seq = row.seq + forced
        row.pending = None
        row.state = WAITING
        row.new_turn = sampling
        self._resume_waiting(may_evict=False)

    def _check(self, sampling: SamplingParams) -> None:
        if sampling.stop_strings and self.decode is None:  # never silently ignore a stop the caller asked for
            raise ValueError("stop_strings need the engine's `decode` (e.g. Engine(..., decode=tokenizer.decode))")

    def _resume_waiting(self, may_evict: bool) -> None:
        """Prefill waiting rows, oldest first, while the free blocks cover them (may_evict: preempt parked rows to
        make room for the oldest; the step does when nothing decodes, so a lone row always goes on). A row that
        was appended to starts its new turn; a preempted row decodes on from its pending token."""
        waiting = sorted((i for i, s in enumerate(self.slots) if s.state == WAITING),
                         key=lambda i: self.slots[i].admitted)
        chosen = []
        free = self.pool.n_free
        for slot in waiting:
            row = self.slots[slot]
            need = max(0, blocks_for(len(row.seq), self.block_size) - len(row.blocks))
            while need > free and may_evict and not chosen:
                victim = self._victim([], keep=slot)
                if victim is None:
                    break
                self._evict(victim)
                free = self.pool.n_free
            if need > free:
                break  # first come, first served: a later row does not jump ahead
            chosen.append(slot)
            free -= need
        if not chosen:
            return
        self._reserve(chosen, [len(self.slots[slot].seq) for slot in chosen])
        logits = self._prefill(chosen)  # (B, V)
        turn_starts = [i for i, slot in enumerate(chosen) if self.slots[slot].new_turn is not None]
        for slot in chosen:
            row = self.slots[slot]
            row.state = DECODING
            if row.new_turn is not None:
                self._start_turn(row, row.new_turn)
                row.new_turn = None
        if turn_starts:
            self._sample([chosen[i] for i in turn_starts], logits[turn_starts])

    # -------------------------------------------------------------------------------------------- prefill
    @torch.no_grad()
    def _prefill(self, slots: list[int]) -> torch.Tensor:
        """Write each row's uncached tokens into its cache at its cursor (blocks reserved); return the last-token
        logits (B, V)."""
        seqs = [self.slots[slot].seq[self.slots[slot].cached :] for slot in slots]
        starts = [self.slots[slot].cached for slot in slots]
        out = []
        start = 0
        while start < len(seqs):
            # Chunks bounded by a padded-token budget so a big batch of long prompts does not blow up activations,
            # and by max_len: every row's pads must stay inside its block table (a resumed row at 0 next to an
            # append at a high offset would push the append's pads past it).
            end = start + 1
            while end < len(seqs):
                longest = max(map(len, seqs[start : end + 1]))
                if longest * (end + 1 - start) > self.prefill_tokens:
                    break
                if max(starts[start : end + 1]) + longest > self.max_len:
                    break
                end += 1
            out.append(self._prefill_chunk(seqs[start:end], slots[start:end]))
            start = end
        return torch.cat(out)  # (B, V)

    def _prefill_chunk(self, chunk: list[list[int]], rows: list[int]) -> torch.Tensor:
        """One forward over a ragged chunk of rows; returns each row's last-token logits (B, V)."""
        width_tokens = max(len(seq) for seq in chunk)
        # (submit and append have checked that every row fits max_len; _prefill that the pads do too)
        starts = [self.slots[row].cached for row in rows]
        padded = [list(seq) + [0] * (width_tokens - len(seq)) for seq in chunk]
        tokens = torch.tensor(padded, device=self.device)  # (B, T)
        # Right padding: pads take the positions after a row's own tokens, so its real tokens never see them;
        # they write into the row's own last block or the scratch block (table entries past its end are 0).
        offsets = torch.arange(width_tokens, device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + offsets  # (B, T)
        last = torch.tensor([len(seq) - 1 for seq in chunk], device=self.device)[:, None]  # (B, 1)
        width = blocks_for(max(starts) + width_tokens, self.block_size)
        table = self.pool.table[torch.tensor(rows, device=self.device), :width]  # (B, nb)
        logits = self.model(tokens, positions=positions, cache=self.cache, block_table=table, logits_at=last)
        for row, seq in zip(rows, chunk):
            self.slots[row].cached += len(seq)
        return logits[:, 0]  # (B, V)

    # -------------------------------------------------------------------------------------------- sampling
    def _start_turn(self, row: Slot, sampling: SamplingParams) -> None:
        row.state = DECODING
        row.sampling = sampling
        row.tokens = []
        row.logprobs = []

    def _sample(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample one token per row under its turn's settings, bring tokens and logprobs to the host in one
        transfer, park rows that stop."""
        slots = [self.slots[r] for r in rows]
        tokens, logprobs = sample(logits, [s.sampling for s in slots], [s.gen for s in slots])
        both = torch.stack([tokens.double(), logprobs.double()]).tolist()  # one host sync per step
        for slot, row, token, logprob in zip(rows, slots, map(int, both[0]), both[1]):
            row.pending = token
            row.tokens.append(token)
            row.logprobs.append(logprob)
            reason = stop_reason(row.tokens, row.sampling, len(row.seq) + 1, self.max_len, self.decode, self._pieces)
            if reason:
                row.state = PARKED
                self._done.append(Finished(slot, row.tokens, row.logprobs, reason))

    # -------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One decode step for all decoding rows (after resuming waiting rows the pool can take); returns the rows
        that stopped (also those stopped at admission)."""
        self._resume_waiting(may_evict=not self.n_decoding)
        rows = self._make_room([i for i, s in enumerate(self.slots) if s.state == DECODING])
        if rows:
            self._decode(rows)
        done = self._done
        self._done = []
        return done

    def _make_room(self, rows: list[int]) -> list[int]:
        """Preempt rows until the pool covers every decoding row's next position; returns the rows that decode."""
        while True:
            need = sum(max(0, blocks_for(self.slots[r].cached + 1, self.block_size) - len(self.slots[r].blocks))
                       for r in rows)
            if need <= self.pool.n_free:
                return rows
            victim = self._victim(rows)
            if victim is None:  # cannot happen: the pool holds a row at max_len, and one row is left
                raise RuntimeError(f"no row to preempt for {need} blocks ({self.pool.n_free} free)")
            self._evict(victim)
            rows = [r for r in rows if r != victim]

    def _decode(self, rows: list[int]) -> None:
        """The decode forward over static buffers, eager or (cuda_graphs) a graph replay. A bucket's padding rows run
        on the scratch block (token 0 at position 0, a table of zeros), so they write and read nothing real."""
        slots = [self.slots[r] for r in rows]
        self._reserve(rows, [s.cached + 1 for s in slots])  # the pending token may open a new block
        batch = len(rows)
        width = max(len(s.blocks) for s in slots)
        if self.cuda_graphs:
            batch_bucket, width_bucket = self._buckets(batch, width)
        else:
            batch_bucket = batch
            width_bucket = width
        static = self._static
        forward = functools.partial(self._decode_forward, batch_bucket, width_bucket)
        if self.cuda_graphs and (batch_bucket, width_bucket) not in self._graphs:
            for buffer in static.values():  # the warm-up really runs: make it write to the scratch block only
                buffer.zero_()
            self._graphs[(batch_bucket, width_bucket)] = self._capture(forward)
        for name in ("tok", "pos", "table"):
            static[name][batch:batch_bucket].zero_()
        static["tok"][:batch, 0] = torch.tensor([s.pending for s in slots], device=self.device)
        static["pos"][:batch, 0] = torch.tensor([s.cached for s in slots], device=self.device)
        static["table"][:batch, :width_bucket] = self.pool.table[torch.tensor(rows, device=self.device), :width_bucket]
        if self.cuda_graphs:
            self._graphs[(batch_bucket, width_bucket)].replay()
        else:
            forward()
        for row in slots:
            row.seq.append(row.pending)
            row.cached += 1
        self._sample(rows, static["out"][:batch])  # (B, V)

    def _decode_forward(self, batch: int, width: int) -> None:
        """The decode forward on the first `batch` rows of the static buffers; logits go to the one static output,
        so a graph keeps no (B, V) tensor of its own alive."""
        static = self._static
        logits = self.model(static["tok"][:batch], positions=static["pos"][:batch], cache=self.cache,
                            block_table=static["table"][:batch, :width])
        static["out"][:batch].copy_(logits[:, -1])

    # -------------------------------------------------------------------------------------------- CUDA graphs
    def _buckets(self, batch: int, width: int) -> tuple[int, int]:
        """Graph sizes: batch 1, 2, 4, 8, then multiples of 16; table width a power of two (<= max_blocks)."""
        if batch <= 8:
            batch_bucket = next(b for b in (1, 2, 4, 8) if b >= batch)
        else:
            batch_bucket = blocks_for(batch, 16) * 16
        return batch_bucket, min(self.max_blocks, 1 << (width - 1).bit_length())

    def _capture(self, forward):
        """Warm `forward` up on a side stream (lazy inits, cuBLAS workspaces), then capture it in a CUDA graph."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):  # tool threads go on
            forward()
        return graph


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             stop_token_ids=(), seed: int = 0, *, top_k: int = 0, stop_strings=(), decode=None,
             n_slots: int | None = None, max_len: int | None = None, return_logprobs: bool = False, **engine_kw):
    """New token ids for each prompt (ending with the stop token when one was hit); continuous batching over
    `n_slots` rows (default: all prompts at once, at most 64). Prompt i samples from the stream keyed i, whatever
    n_slots is. engine_kw: Engine options (block_size, kv_tokens, cuda_graphs)."""
    sampling = SamplingParams(temperature, top_p, top_k, max_new_tokens, tuple(stop_token_ids), tuple(stop_strings))
    if not prompts:
        return []
    n_slots = n_slots or max(1, min(len(prompts), 64))
    max_len = max_len or max(len(p) for p in prompts) + max_new_tokens + 1
    engine = Engine(model, n_slots, max_len, decode=decode, seed=seed, **engine_kw)
    out = [None] * len(prompts)
    owner = {}  # slot -> prompt index
    queue = deque(range(len(prompts)))
    while queue or owner:
        taken = []
        while queue and engine.n_free > len(taken) and not engine.n_waiting:
            taken.append(queue.popleft())
        if taken:
            groups = engine.submit_many([prompts[i] for i in taken], sampling, seeds=taken)
            for prompt_index, group in zip(taken, groups):
                owner[group[0]] = prompt_index
        for finished in engine.step():
            prompt_index = owner.pop(finished.slot)
            out[prompt_index] = (finished.tokens, finished.logprobs) if return_logprobs else finished.tokens
            engine.release(finished.slot)
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
    stats: dict = field(default_factory=lambda: {"n_search": 0, "n_browse": 0, "n_bad_calls": 0, "n_turns": 0})


END_REASONS = ("answer", "format_error", "bad_call", "max_turns", "context_limit", "tool_failure", "engine_error")


@dataclass
class RolloutConfig:
    """The agent loop's settings. Defaults: the embedded offline run (a 135M model on a CPU, train.py's default);
    the paper's values are train.py's DEEPRESEARCHER_AGENT. train.py's and eval.py's configs inherit these fields."""
    protocol: str = "tags"             # "tags" | "dr"
    max_turns: int = 5                 # generation turns (reference 10): a three-name comparison needs 3 searches
    max_new_tokens: int = 40           # per turn (reference 2000): a query (the longest research question as a query:
                                       # 39 tokens) or a short answer
    max_len: int = 1536                # context budget per row = engine cache length (reference 32768): 4 searches
    temperature: float = 0.7           # the paper: 1.0; a 135M model at 1.0 mostly writes noise
    top_p: float = 1.0
    n_slots: int = 32                  # rows decoding at once, per rank (fewer when a rollout has fewer rows)
    on_bad_call: str = "error_observation"   # or "end" (reference: a malformed call is a format error)
    date: str = ""                     # the date in the system prompt; "" = today (tests fix it)
    tool_threads: int = 32             # concurrent tool calls (each blocks on the web)
    min_turn_tokens: int = 64          # an observation must leave this much room for the next turn
    prompt: str = "short"              # system prompt: "reference" (the paper's, ~440 tokens) | "short" (~40 tokens)
    # forced text opening turn i (loss mask 0), e.g. ("<search>", "<answer>") or "<search>,<answer>": a scaffold for
    # models too small to find the format alone (SmolLM2-135M); "" = none, the reference
    turn_prefixes: str = "<search>"
    turn_prefix_every: str = ""        # forced text opening EVERY turn, before turn_prefixes[i] (reference: "<think>")
    # "question|query|answer": a worked example before the question, its search run live (example_turns; without
    # it a 135M model never writes an <answer> tag); "" = none, the reference
    example: str = "What is the capital of Norway?|capital of Norway|Oslo"
    # decode through CUDA graphs (CUDA only). Off until the GPU test (test_cuda_graphs_match_eager) and the bench
    # have passed on a device through the training path; build one engine per run (make_engine) so they are captured
    # once, not per rollout
    cuda_graphs: bool = False
    # tokens the KV pool holds, all rows together (0: n_slots x max_len, capped on CUDA to what is free when the
    # engine is built). Rows that outgrow it are preempted and resumed, not failed. An engine kept for a whole run
    # (make_engine) should get an explicit budget on a GPU, so the training step keeps its memory
    kv_tokens: int = 0


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
    system_text = system_prompt(protocol, date, style)
    messages = [*example, {"role": "user", "content": question}]
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": system_text}, *messages], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001  templates without a system role raise (jinja TemplateError): merge into user
        messages[0] = {"role": "user", "content": f"{system_text}\n\nQuestion: {messages[0]['content']}"}
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def search_call(query: str, protocol: str) -> str:
    """One web_search call for one query, written as the policy writes it under `protocol`."""
    if protocol == "tags":
        return f"<search>{query}</search>"
    return "<tool_call>" + json.dumps({"name": "web_search", "arguments": {"query": [query]}}) + "</tool_call>"


def example_turns(example: str, protocol: str, session) -> list[dict]:
    """One worked example as chat turns, from "question|query|answer" (or "question|query 1;query 2|answer": one
    search per query, e.g. a two-hop example): the question, each search call and the real observation of that search
    (through the same browser, so it looks exactly like the ones the policy will see), and the answer. A format
    demonstration for small models; its question must not be one it is scored on."""
    question, queries, answer = (part.strip() for part in example.split("|"))
    turns = [{"role": "user", "content": question}]
    for query in [query.strip() for query in queries.split(";") if query.strip()]:  # none: a closed-book example
        observation = session.web_search([query])
        turns.append({"role": "assistant", "content": search_call(query, protocol)})
        turns.append({"role": "user", "content": f"<tool_response>\n{observation}\n</tool_response>"})
    turns.append({"role": "assistant", "content": f"<answer>{answer}</answer>"})
    return turns


@dataclass
class ObsFrame:
    """The forced text around an observation: `before` closes the assistant turn and opens the tool/user turn,
    `after` closes it and opens the next assistant turn. Taken from the chat template once per rollout."""
    before: str
    after: str
    before_ids: list[int]
    after_ids: list[int]


def obs_frame(tokenizer) -> ObsFrame:
    assistant_mark = "\x00ASSISTANT\x00"
    observation_mark = "\x00OBSERVATION\x00"
    role = "tool" if re.search(r"""['"]tool['"]""", tokenizer.chat_template or "") else "user"  # the template's own
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": assistant_mark},
                {"role": role, "content": observation_mark}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text[text.index(assistant_mark) + len(assistant_mark):].split(observation_mark)
    if "<tool_response>" not in before:  # templates without tool support: wrap it ourselves, like Qwen2.5 does
        before = before + "<tool_response>\n"
        after = "\n</tool_response>" + after
    before_ids = tokenizer.encode(before, add_special_tokens=False)
    after_ids = tokenizer.encode(after, add_special_tokens=False)
    return ObsFrame(before, after, before_ids, after_ids)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """eos plus the end-of-turn tokens chat models emit (Qwen2.5-Instruct stops on either of two)."""
    vocab = tokenizer.get_vocab()
    names = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
    ids = {vocab[name] for name in names if name in vocab}
    if tokenizer.eos_token_id is not None:  # a tokenizer may have no eos
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


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
    closings = [f"</{tag}>" for tag in call_tags] + ["</answer>"]
    ends = [text.find(closing) + len(closing) for closing in closings if closing in text]
    body = text[:min(ends)] if ends else text.rstrip()
    for tag in call_tags:
        closing = f"</{tag}>"
        if body.endswith(closing):
            start = body.rfind(f"<{tag}>")
            if start < 0:
                return Action("bad_call", error=f"{closing} without <{tag}>")
            return _parse_call(tag, body[start + len(tag) + 2:len(body) - len(closing)].strip())
    answer_match = _ANSWER.search(body)
    if answer_match:
        return Action("answer", answer=answer_match.group(1).strip())
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
        except json.JSONDecodeError as error:
            return Action("bad_call", error=f"tool call is not valid JSON ({error.msg})")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Action("bad_call", error='tool call must be {"name": ..., "arguments": {...}}')
        name = call["name"]
        arguments = call.get("arguments")
        if name not in ARG_KEY:
            return Action("bad_call", error=f"unknown tool '{name}' (use web_search or browse_webpage)")
        if not isinstance(arguments, dict):
            return Action("bad_call", tool=name, error=f"{name}: 'arguments' must be an object")
        value = arguments.get(ARG_KEY[name])
    else:
        name = "web_search" if tag == "search" else "browse_webpage"
        value = inner.split("|")
    key = ARG_KEY[name]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return Action("bad_call", tool=name, error=f"{name}: '{key}' must be a list of strings")
    value = [item.strip() for item in value if item.strip()]
    if not value:
        return Action("bad_call", tool=name, error=f"{name}: empty '{key}'")
    return Action("call", tool=name, args={key: value})


def bad_call_message(error: str, protocol: str) -> str:
    """The short observation a malformed call gets under on_bad_call='error_observation'."""
    if protocol == "dr":
        how = '<tool_call>{"name": ..., "arguments": {...}}</tool_call>'
    else:
        how = "<search>query</search> or <browse>url</browse>"
    return f"Error: {error}. Call a tool as {how}, or give the final answer as <answer>...</answer>."


def run_tool(session, tool: str, args: dict) -> tuple[str, float, bool]:
    """Run one call on a browser session: (text, seconds, failed: a browse.Observation's `.failed`, the web's fault).
    Sessions should not raise; an exception anyway is a tool failure, so one row cannot take the rollout down."""
    started = time.perf_counter()
    try:
        if tool == "web_search":
            observation = session.web_search(args["query"])
        else:
            observation = session.browse_webpage(args["url_list"])
        text = str(observation)  # a plain str, JSON-safe in records
        failed = bool(getattr(observation, "failed", False))
    except Exception as error:  # noqa: BLE001
        text = f"Error: {tool} failed ({type(error).__name__}: {error})"
        failed = True
    return text, time.perf_counter() - started, failed


def defang(text: str, specials: list[str]) -> str:
    """Web text that spells a control token (`<|im_end|>`) must not become that token: break it up."""
    for special in filter(None, specials):
        text = text.replace(special, special[:1] + " " + special[1:])
    return text


# ------------------------------------------------------------------------------------------------ what a turn means
OUTCOMES = ("answer", "tool_call", "bad_call", "max_turns", "context_limit", "format_error")


@dataclass
class Decision:
    """What a finished turn means for its trajectory (see decide_turn)."""
    outcome: str                     # one of OUTCOMES
    action: Action                   # the parse of the turn's own text
    end_reason: str | None           # the trajectory ends with this turn, for this reason (END_REASONS); None: goes on
    turn_error: str | None           # recorded on the turn
    observation: str | None = None   # a bad call answered with an error message: the text appended next
    counts_bad_call: bool = False    # a malformed call the trajectory's stats count (n_bad_calls)


def decide_turn(n_turns: int, text: str, stop: str, cfg: RolloutConfig) -> Decision:
    """What a finished turn means, from the number of turns so far (this one included), the turn's text (its forced
    prefix + what the policy wrote) and why the engine stopped it (Finished.reason). The order of the checks is the
    rule: when every turn is forced to open <think> (the reference's set-up), a turn that does not close it ends the
    trajectory (reward.format_ok scores it -1 under dr); an answer counts even when the context ran out; a turn cut
    by the context ends the trajectory; neither a call nor an answer is a format error; a malformed call ends it
    under on_bad_call="end"; a call after the last turn is not run; a malformed call under "error_observation" is
    answered with an error message; else the call runs."""
    action = parse_turn(text, cfg.protocol)
    if "<think>" in cfg.turn_prefix_every and "</think>" not in text.lower():  # the reference's rule: its turns
        return Decision("format_error", action, "format_error", "no </think> in this turn")  # open <think>, forced
    if action.kind == "answer":
        return Decision("answer", action, "answer", action.error)
    if stop == "context":
        return Decision("context_limit", action, "context_limit", "context budget exhausted while generating")
    if action.kind == "none":
        error = action.error
        if stop == "length":
            error = f"no tool call or answer within max_new_tokens={cfg.max_new_tokens}"
        return Decision("format_error", action, "format_error", error)
    is_bad_call = action.kind == "bad_call"
    if is_bad_call and cfg.on_bad_call == "end":
        return Decision("bad_call", action, "bad_call", action.error, counts_bad_call=True)
    if n_turns >= cfg.max_turns:  # no turn left to read the observation: do not run the call
        return Decision("max_turns", action, "max_turns", action.error, counts_bad_call=is_bad_call)
    if is_bad_call:
        message = bad_call_message(action.error, cfg.protocol)
        return Decision("bad_call", action, None, action.error, observation=message, counts_bad_call=True)
    return Decision("tool_call", action, None, action.error)


# ------------------------------------------------------------------------------------------------ building a trajectory
@dataclass
class Framing:
    """Everything the loop writes around the policy's own tokens, built once per rollout (make_framing)."""
    cfg: RolloutConfig
    tokenizer: object
    sampling: SamplingParams          # what a turn samples under (stop tokens and strings of the protocol)
    frame: ObsFrame                   # the chat frame around an observation
    reopen: dict[int, list[int]]      # stop token -> the frame's opening after that token already closed the turn
    prefixes: list[tuple[str, list[int]]]  # (text, ids) forced at the start of turn i; the last covers later turns
    example: list[dict]               # the worked example's chat turns (example_turns), or none
    specials: list[str]               # control tokens web text must not spell (defang)
    decode_raw: object                # token ids -> text with special tokens (stop strings are checked on it)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prefix(self, turn: int) -> tuple[str, list[int]]:
        return self.prefixes[min(turn, len(self.prefixes) - 1)]


def check_config(cfg: RolloutConfig) -> None:
    if cfg.protocol not in STOP_STRINGS:
        raise ValueError(f"protocol must be 'tags' or 'dr', got {cfg.protocol!r}")
    if cfg.on_bad_call not in ("end", "error_observation"):
        raise ValueError(f"on_bad_call must be 'end' or 'error_observation', got {cfg.on_bad_call!r}")


def make_framing(tokenizer, browser, cfg: RolloutConfig) -> Framing:
    check_config(cfg)
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              stop_token_ids=stop_token_ids(tokenizer), stop_strings=STOP_STRINGS[cfg.protocol])
    frame = obs_frame(tokenizer)
    # after a turn that closed itself (its stop token is eos/<|im_end|>), the frame goes on without closing it twice
    reopen = {}
    for token in sampling.stop_token_ids:
        closing = tokenizer.decode([token])
        if frame.before.startswith(closing):
            reopen[token] = tokenizer.encode(frame.before[len(closing):], add_special_tokens=False)
    example = example_turns(cfg.example, cfg.protocol, browser.session("")) if cfg.example else []
    if isinstance(cfg.turn_prefixes, str):
        listed = cfg.turn_prefixes.split(",")
    else:
        listed = [str(text) for text in cfg.turn_prefixes]
    # turn i opens with turn_prefix_every + turn_prefixes[i]; the last entry ("") covers every later turn
    texts = [(cfg.turn_prefix_every or "") + text for text in [*listed, ""]]
    prefixes = [(text, tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    specials = list(getattr(tokenizer, "all_special_tokens", []))
    decode_raw = functools.partial(tokenizer.decode, skip_special_tokens=False)
    return Framing(cfg, tokenizer, sampling, frame, reopen, prefixes, example, specials, decode_raw)


def _extend(traj: Trajectory, tokens: list[int], logprobs: list[float] | None = None) -> None:
    """Add sampled tokens (with their logprobs: loss mask 1) or forced ones (no logprobs: mask 0) to a trajectory."""
    traj.tokens += tokens
    traj.loss_mask += [int(logprobs is not None)] * len(tokens)
    traj.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)


def start_trajectories(framing: Framing, question: str, group: int, n: int) -> list[Trajectory]:
    """n trajectories of one question holding its prompt and the first turn's forced prefix (what the engine
    prefills, once for the group); ended as context_limit at once when no turn fits after them."""
    cfg = framing.cfg
    prompt = render_prompt(framing.tokenizer, question, cfg.protocol, cfg.date, cfg.prompt, framing.example)
    first = prompt + framing.prefix(0)[1]  # the first turn's forced prefix rides with the prompt's prefill
    trajs = [Trajectory(question, group, prompt_len=len(prompt)) for _ in range(n)]
    for traj in trajs:
        _extend(traj, first)
        if len(first) + cfg.min_turn_tokens > cfg.max_len:  # nothing to decode: never takes a slot
            traj.end_reason = "context_limit"
    return trajs


def record_turn(framing: Framing, traj: Trajectory, tokens: list[int], logprobs: list[float], stop: str,
                gen_s: float) -> Decision:
    """Add a finished turn's sampled tokens and its Turn record to the trajectory; returns what the turn means."""
    _extend(traj, tokens, logprobs)
    text = framing.prefix(len(traj.turns))[0] + framing.tokenizer.decode(tokens, skip_special_tokens=True)
    decision = decide_turn(len(traj.turns) + 1, text, stop, framing.cfg)
    action = decision.action
    traj.turns.append(Turn(text=text, tool=action.tool, args=action.args, observation=None, error=decision.turn_error,
                           n_tokens=len(tokens), gen_s=gen_s, tool_s=0.0))
    traj.stats["n_bad_calls"] += decision.counts_bad_call
    if decision.outcome == "tool_call":
        traj.stats["n_search" if action.tool == "web_search" else "n_browse"] += 1
    return decision


def record_tool_result(traj: Trajectory, text: str, seconds: float, failed: bool, wall_s: float) -> bool:
    """Put a tool call's result on the last turn; a failed call (the web's fault, not the policy's) ends the
    trajectory as tool_failure (the trainer keeps it out of the loss). Returns whether it ended."""
    turn = traj.turns[-1]
    turn.tool_s = seconds
    if not failed:
        return False
    turn.observation = text
    turn.error = "the tool failed (infrastructure)"
    end_trajectory(traj, "tool_failure", wall_s)
    return True


def next_turn_tokens(framing: Framing, traj: Trajectory, observation: str, wall_s: float) -> list[int] | None:
    """The forced tokens after a turn: the chat frame around the observation and the next turn's prefix. None when
    they would leave no room for a turn: the trajectory then ends as context_limit."""
    cfg = framing.cfg
    traj.turns[-1].observation = observation
    opening = framing.reopen.get(traj.tokens[-1], framing.frame.before_ids)
    body = framing.encode(defang(observation, framing.specials))
    forced = opening + body + framing.frame.after_ids + framing.prefix(len(traj.turns))[1]
    if len(traj.tokens) + len(forced) + cfg.min_turn_tokens > cfg.max_len:
        end_trajectory(traj, "context_limit", wall_s, error="observation does not fit in the context budget")
        return None
    return forced


def end_trajectory(traj: Trajectory, end_reason: str, wall_s: float, answer: str | None = None,
                   error: str | None = None) -> None:
    if error:  # added to the turn's own error (a bad call's, say)
        traj.turns[-1].error = "; ".join(filter(None, [traj.turns[-1].error, error]))
    traj.end_reason = end_reason
    traj.answer = answer
    traj.stats.update(n_turns=len(traj.turns), wall_s=wall_s, gen_s=sum(turn.gen_s for turn in traj.turns),
                      tool_s=sum(turn.tool_s for turn in traj.turns))


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class Row:
    """One live trajectory of the loop (engine slot -> Row): its record, its browser session, its tool call."""
    traj: Trajectory
    session: object
    started: float                    # when the trajectory was admitted
    turn_started: float               # when the current turn started decoding
    tool_call: Future | None = None   # the call in flight while the row waits on the web


def make_engine(model, tokenizer, cfg: RolloutConfig, seed: int = 0, n_rows: int | None = None) -> Engine:
    """The engine rollout() runs on: cfg.n_slots rows (fewer when n_rows, one rollout's rows, is smaller) of up to
    cfg.max_len tokens, a pool of cfg.kv_tokens, CUDA graphs when cfg.cuda_graphs. Build one per run and pass it to
    every rollout(engine=...): each rollout reseeds it with its own seed, so reuse changes no sampled token, and
    graphs are captured once."""
    n_slots = cfg.n_slots if n_rows is None else min(cfg.n_slots, n_rows)
    decode_raw = functools.partial(tokenizer.decode, skip_special_tokens=False)
    kv_tokens = cfg.kv_tokens or None  # 0: every row can reach max_len (capped on CUDA to what is free)
    return Engine(model, n_slots=n_slots, max_len=cfg.max_len, decode=decode_raw, seed=seed, kv_tokens=kv_tokens,
                  cuda_graphs=cfg.cuda_graphs)


def rollout(model, tokenizer, questions: list[str], browser, cfg: RolloutConfig, group_size: int = 1, seed: int = 0,
            *, engine=None) -> list[Trajectory]:
    """Run the agent on every question `group_size` times; returns trajectories question-major
    (question i's rows are [i*G, (i+1)*G), each with `group` = i: the caller scores them against its own gold
    answers). `engine`: a reused engine (make_engine), or a stand-in (tests, benchmarks); None builds one here."""
    framing = make_framing(tokenizer, browser, cfg)
    if not questions:
        return []
    if engine is None:
        engine = make_engine(model, tokenizer, cfg, seed, n_rows=len(questions) * group_size)
    if engine.n_slots < group_size:
        raise ValueError(f"the engine has {engine.n_slots} slots, a group needs {group_size}: raise n_slots")
    engine.reseed(seed)  # every row's random stream is keyed by this rollout's seed, whatever engine runs it
    trajs = [traj for index, question in enumerate(questions)
             for traj in start_trajectories(framing, question, index, group_size)]
    queue = deque(index for index in range(len(questions)) if not trajs[index * group_size].end_reason)
    rows: dict[int, Row] = {}
    with ThreadPoolExecutor(max_workers=cfg.tool_threads, thread_name_prefix="tool") as tool_pool:
        try:
            if len(queue) > 1:  # the prompts' shared head (system prompt, worked example): prefilled once
                # (commonprefix compares any sequences item by item, token lists too)
                engine.keep_prefix(os.path.commonprefix([trajs[index * group_size].tokens for index in queue]))
            while queue or rows:
                # admission: whole groups, while the engine has slots and blocks for a prompt and a turn
                while queue and engine.can_admit(len(trajs[queue[0] * group_size].tokens), group_size,
                                                 cfg.max_new_tokens):
                    index = queue.popleft()
                    group = trajs[index * group_size : (index + 1) * group_size]
                    rows.update(admit_group(engine, framing, browser, group, seed))
                if queue and not rows:
                    raise RuntimeError(f"an empty engine cannot take a group of {group_size}: {engine.n_free} free "
                                       f"slots; raise n_slots or the KV pool (kv_tokens)")
                # A live row decodes, waits on a tool, or stopped on the first token that submit()/append() sampled:
                # the engine queued it as done, and step() returns it (with no forward when no row decodes).
                if any(row.tool_call is None for row in rows.values()):
                    finished_turns = engine.step()
                    for finished in finished_turns:
                        if on_turn_end(engine, framing, rows[finished.slot], finished, tool_pool):
                            close_row(engine, rows, finished.slot)
                    if not finished_turns and not engine.n_decoding:  # a row is unaccounted for: fail, not spin
                        raise RuntimeError(f"rows {sorted(rows)} are neither decoding nor waiting on a tool")
                else:  # every live row waits on the web: block until one call returns
                    wait([row.tool_call for row in rows.values()], return_when=FIRST_COMPLETED)
                for slot in [slot for slot, row in rows.items() if row.tool_call is not None and row.tool_call.done()]:
                    if on_tool_done(engine, framing, rows[slot], slot):
                        close_row(engine, rows, slot)
        finally:
            for slot in list(rows):  # an error leaves no slot taken: the engine takes the next rollout
                close_row(engine, rows, slot)
            engine.drop_prefix()  # the next rollout may run on other weights
    return trajs


def admit_group(engine, framing: Framing, browser, group: list[Trajectory], seed: int) -> dict[int, Row]:
    """Prefill a group's prompt once into len(group) slots. One random stream per trajectory, keyed (seed, question,
    sample): the run is the same whatever order tool calls end in."""
    seeds = [(seed, traj.group, sample_index) for sample_index, traj in enumerate(group)]
    slots = engine.submit(group[0].tokens, framing.sampling, n=len(group), seeds=seeds)
    now = time.perf_counter()
    return {slot: Row(traj, browser.session(traj.question), now, now) for slot, traj in zip(slots, group)}


def close_row(engine, rows: dict[int, Row], slot: int) -> None:
    del rows[slot]
    engine.release(slot)


def on_turn_end(engine, framing: Framing, row: Row, finished: Finished, tool_pool) -> bool:
    """A row's turn ended: record it and do what it means (end, run its call in the pool, or answer a bad call).
    Returns whether the trajectory ended."""
    gen_s = time.perf_counter() - row.turn_started
    decision = record_turn(framing, row.traj, finished.tokens, finished.logprobs, finished.reason, gen_s)
    if decision.end_reason:
        end_trajectory(row.traj, decision.end_reason, time.perf_counter() - row.started, decision.action.answer)
        return True
    if decision.outcome == "tool_call":
        row.tool_call = tool_pool.submit(run_tool, row.session, decision.action.tool, decision.action.args)
        return False
    return resume(engine, framing, row, finished.slot, decision.observation)


def on_tool_done(engine, framing: Framing, row: Row, slot: int) -> bool:
    """A row's tool call returned: record it and resume the row, or end it when the web failed."""
    text, seconds, failed = row.tool_call.result()
    row.tool_call = None
    if record_tool_result(row.traj, text, seconds, failed, time.perf_counter() - row.started):
        return True
    return resume(engine, framing, row, slot, text)


def resume(engine, framing: Framing, row: Row, slot: int, observation: str) -> bool:
    """Append the observation's forced tokens to the parked row, which then decodes its next turn; or end it when
    they do not fit, or the engine refuses them. Returns whether the trajectory ended."""
    wall_s = time.perf_counter() - row.started
    forced = next_turn_tokens(framing, row.traj, observation, wall_s)
    if forced is None:
        return True
    try:
        engine.append(slot, forced, framing.sampling)
    except (RuntimeError, ValueError) as error:  # the engine refused the row: end it, keep the others going
        end_trajectory(row.traj, "engine_error", wall_s, error=f"engine: {type(error).__name__}: {error}")
        return True
    _extend(row.traj, forced)
    row.turn_started = time.perf_counter()
    return False


# ------------------------------------------------------------------------------------------------ scripted turns
def scripted_trajectory(tokenizer, question: str, turn_texts: list[str], browser, cfg: RolloutConfig,
                        group: int = 0, framing: Framing | None = None) -> Trajectory:
    """The trajectory a policy writing exactly `turn_texts` would get, with no model: the same prompt, forced
    prefixes, observation frames, tool calls (through browser.session(question)), decisions and end reasons as
    rollout(). turn_texts[i] is what the policy writes after turn i's forced prefix (the prefix is not part of it);
    a text with no stop string ends with the end-of-turn token (eos), and a turn is cut where the engine would cut
    it (max_new_tokens, the context). Its tokens get loss_mask 1 and logprob 0.0. framing: make_framing's, when the
    caller scripts many questions (it runs the worked example's searches once)."""
    framing = framing or make_framing(tokenizer, browser, cfg)
    traj = start_trajectories(framing, question, group, 1)[0]
    if traj.end_reason:
        return traj
    session = browser.session(question)
    started = time.perf_counter()
    for text in turn_texts:
        tokens, stop = scripted_turn(framing, traj, text)
        decision = record_turn(framing, traj, tokens, [0.0] * len(tokens), stop, gen_s=0.0)
        if decision.end_reason:
            end_trajectory(traj, decision.end_reason, time.perf_counter() - started, decision.action.answer)
            return traj
        observation = decision.observation
        if decision.outcome == "tool_call":
            observation, seconds, failed = run_tool(session, decision.action.tool, decision.action.args)
            if record_tool_result(traj, observation, seconds, failed, time.perf_counter() - started):
                return traj
        forced = next_turn_tokens(framing, traj, observation, time.perf_counter() - started)
        if forced is None:
            return traj
        _extend(traj, forced)
    raise ValueError(f"the trajectory goes on after the {len(turn_texts)} turn texts given: end the script with an "
                     f"answer (or a turn with neither a call nor an answer)")


def end_of_turn_token(framing: Framing) -> int:
    """The token a policy ends a turn with when it writes no stop string: eos when it is a stop token, else the
    first stop token."""
    stop_ids = framing.sampling.stop_token_ids
    if not stop_ids:
        raise ValueError("the tokenizer has no stop token to end a scripted turn with")
    eos = framing.tokenizer.eos_token_id
    return eos if eos in stop_ids else stop_ids[0]


def scripted_turn(framing: Framing, traj: Trajectory, text: str) -> tuple[list[int], str]:
    """The tokens a policy writing `text` (then its end-of-turn token) samples, cut where the engine stops the turn,
    and why it stops (Finished.reason)."""
    written = framing.encode(text) + [end_of_turn_token(framing)]
    for count in range(1, len(written) + 1):
        tokens = written[:count]
        reason = stop_reason(tokens, framing.sampling, len(traj.tokens) + count, framing.cfg.max_len,
                             framing.decode_raw)
        if reason:
            return tokens, reason
    raise AssertionError("the end-of-turn token is a stop token")  # unreachable: stop_reason stops on it


# =====================================================================================================================
# Part 3: scripted agents (no model), through the policy's own prompt, tools and token framing
#
# A plan decides what an agent searches and answers; scripted_rollout writes it as the policy would (search_call, the
# forced turn prefixes left out) and replays it through scripted_trajectory, so its record has the same tokens,
# observations and end reason a policy writing those turns would get. eval.py runs them as baselines (--agent=...);
# train.py's warm start trains on the trajectories of question_first (the default) or oracle.

def script_texts(queries: list[str], answer: str, protocol: str, prefixes: list[str]) -> list[str]:
    """The turn texts of an agent that searches `queries`, one per turn, then answers: what the policy itself writes
    after each turn's forced text `prefixes[i]` (the last covers later turns). Under the dr protocol each turn opens
    with a short reasoning closed by </think>, as its format check asks."""
    full_texts = [search_call(query, protocol) for query in queries] + [f"<answer>{answer}</answer>"]
    if protocol == "dr":
        full_texts = [f"<think>Next step.</think>{text}" for text in full_texts]
    texts = []
    for turn, full_text in enumerate(full_texts):
        forced = prefixes[min(turn, len(prefixes) - 1)]
        if not full_text.startswith(forced):
            raise ValueError(f"a scripted turn {full_text!r} does not start with the forced text {forced!r}: "
                             f"a scripted agent needs turn prefixes that a search or an answer can start with")
        texts.append(full_text[len(forced):])
    return texts


def first_title_plan(example: dict, session) -> tuple[list[str], str]:
    """The no-model baseline: search the question as it is, answer the first result's title."""
    session.web_search([example["question"]])
    first = next(iter(session.urls.values()), None)  # the results, in rank order
    return [example["question"]], first.title if first else ""


def oracle_plan(example: dict, session) -> tuple[list[str], str]:
    """The ceiling on this web: an agent that knows which articles hold the answer (the data's oracle_queries, one
    search each) and reads perfectly: it answers the gold answer when the gold is in what its searches showed it,
    else says it does not know. Not a baseline to beat: the most that searching these articles can give."""
    queries = example.get("oracle_queries") or [example["question"]]
    seen = [str(session.web_search([query])) for query in queries]
    return queries, answer_if_shown(example, seen)


def answer_if_shown(example: dict, observations: list[str]) -> str:
    """What a scripted agent that reads perfectly answers: the gold answer when one of its observations shows it,
    else "unknown" (never a guess)."""
    gold = example["answers"][0]
    return gold if normalize(gold) in normalize(" ".join(observations)) else "unknown"


def question_first_plan(example: dict, session) -> tuple[list[str], str]:
    """The oracle's knowledge on a path a policy can take without it: search the question as it is, then each
    supporting article (oracle_queries, titles) that no search so far returned, and a bridge question's bridge entity
    whatever was shown (that hop is the research); answer the gold when the searches showed it, else say it does not
    know. On this web the question's own search returns a bridge's first article on ~95% of the bridges, a read
    question's article on ~98%, all three articles of a comparison on ~30%."""
    question = example["question"]
    queries = [question]
    seen = [str(session.web_search([question]))]
    titles = {result.title for result in session.urls.values()}
    for query in example.get("oracle_queries") or []:
        if query == question or (query in titles and query != example.get("bridge")):
            continue
        queries.append(query)
        seen.append(str(session.web_search([query])))
        titles |= {result.title for result in session.urls.values()}
    return queries, answer_if_shown(example, seen)


PLANS = {"first_title": first_title_plan, "oracle": oracle_plan, "question_first": question_first_plan}


def rule_config(cfg: RolloutConfig) -> RolloutConfig:
    """The loop settings for a scripted baseline: a rule, not a model's attempt at it, so the policy's turn budget
    never cuts it (a whole question as a query can be longer than a policy's turn). Demonstrations to train on keep
    the policy's own settings instead."""
    return replace(cfg, max_turns=max(cfg.max_turns, 8), max_new_tokens=max(cfg.max_new_tokens, 256),
                   max_len=max(cfg.max_len, 8192))


def scripted_rollout(plan, tokenizer, examples: list[dict], browser, cfg: RolloutConfig) -> list[Trajectory]:
    """A no-model agent over `examples` (dicts with question, answers, oracle_queries): the plan runs its searches in
    a scratch session to decide its script, then the script is replayed for the record (the web is deterministic or
    cached, so both see the same results). Trajectory.group is the example's index."""
    framing = make_framing(tokenizer, browser, cfg)
    prefixes = [text for text, _ in framing.prefixes]
    trajs = []
    for group, example in enumerate(examples):
        queries, answer = plan(example, browser.session(example["question"]))
        texts = script_texts(queries, answer, cfg.protocol, prefixes)
        trajs.append(scripted_trajectory(tokenizer, example["question"], texts, browser, cfg, group, framing))
    return trajs
