"""Generation engine and research-agent loop: everything that turns a policy into trajectories.

Part 1, the engine (this section). One KV cache preallocated for all layers (`model.KVCache`, an argument of
`model(...)`), with a cursor per row, so rows of different lengths share a batch. A row (slot) is free, decoding or
parked. `submit` prefills prompts in one ragged call and copies a group's prompt into G slots (prefill once for a
GRPO group); `step` decodes one token for every decoding row; a row that hits a stop id, a stop string, its token
limit or the end of its cache is parked with its cache intact; `append` adds forced tokens (a tool observation) to a
parked row, prefilling only them at that row's own offset, and the row decodes a new turn; `release` frees the slot
for the next prompt (continuous batching). Every sampled token comes with its log-probability under the sampling
distribution (temperature applied, before top-p/top-k truncation, which is what the trainer recomputes).

A row's last sampled token is "pending": it is returned at once but enters the cache only with the next forward
(the next decode step, or the prefill of an `append`), so a turn's stop token costs no extra forward.

What it deliberately does not do: paged attention, speculative decoding, beam search, CUDA graphs (the eager
decode step is a single `model(...)` call over a contiguous block of rows, so wrapping it later is easy).

Run: `python -m pytest tests/test_engine.py`; benchmark: `python bench/generate.py` (CPU) or
`python bench/generate.py --device=cuda --shape=qwen2.5-0.5b --dtype=bfloat16`.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def memory_check(nbytes: int, device: torch.device) -> None:
    """Fail with numbers (asked vs free) instead of an opaque OOM when the KV cache cannot fit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return
    if nbytes > 0.9 * free:
        raise MemoryError(f"KV cache needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on "
                          f"{device}: lower n_slots (rows) or max_len")


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits (B, V) with per-row settings; returns (tokens (B,), logprobs (B,))."""
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # (B, V)
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V): the distribution the trainer recomputes
    filt = scaled
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, idx = scaled.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
        k = torch.where(top_k > 0, top_k, logits.shape[-1])
        drop |= torch.arange(logits.shape[-1], device=logits.device)[None] >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filt = torch.empty_like(scaled).scatter_(-1, idx, sorted_logits)
    probs = filt.softmax(-1)
    drawn = torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # (B,)
    tokens = torch.where(greedy, logits.argmax(-1), drawn)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class Engine:
    """Slots over one KV cache; see the section docstring. Only ever calls `model(...)` (plain or FSDP2)."""

    def __init__(self, model, n_slots: int, max_len: int, *, decode=None, seed: int = 0, prefill_tokens: int = 8192):
        p = next(model.parameters())
        self.model, self.n_slots, self.max_len, self.decode = model, n_slots, max_len, decode
        self.device, self.prefill_tokens = p.device, prefill_tokens
        cfg = model.config
        self.cache_bytes = KVCache.nbytes_for(cfg, n_slots, max_len, p.dtype)
        memory_check(self.cache_bytes, self.device)
        self.cache = KVCache.allocate(cfg, n_slots, max_len, p.dtype, self.device)
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.state = [FREE] * n_slots
        self.cached = [0] * n_slots  # tokens in the cache
        self.pending: list[int | None] = [None] * n_slots  # last sampled token, not yet in the cache
        self.sampling: list[SamplingParams | None] = [None] * n_slots
        self.turn_tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.turn_logprobs: list[list[float]] = [[] for _ in range(n_slots)]
        self.n_forward = 0  # forwards run (prefill + decode), for benchmarks
        self._done: list[Finished] = []  # rows stopped since the last step() (a first token can already stop)

    # -------------------------------------------------------------------------------------------- bookkeeping
    @property
    def n_free(self) -> int:
        return self.state.count(FREE)

    @property
    def n_decoding(self) -> int:
        return self.state.count(DECODING)

    def length(self, slot: int) -> int:
        """Tokens of the row's sequence so far (cache + the pending sampled token)."""
        return self.cached[slot] + (self.pending[slot] is not None)

    def release(self, slot: int) -> None:
        self.state[slot], self.cached[slot], self.pending[slot] = FREE, 0, None
        self.turn_tokens[slot], self.turn_logprobs[slot] = [], []

    # ---------------------------------------------------------------------------------------------- prefill
    @torch.no_grad()
    def _prefill(self, seqs: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Write each token list into its slot at the slot's cursor; return the last-token logits (B, V)."""
        out = []
        # Chunks bounded by a padded-token budget so a big batch of long prompts does not blow up activations.
        i = 0
        while i < len(seqs):
            j, longest = i, 0
            while j < len(seqs) and (j == i or max(longest, len(seqs[j])) * (j - i + 1) <= self.prefill_tokens):
                longest = max(longest, len(seqs[j]))
                j += 1
            chunk, rows = seqs[i:j], slots[i:j]
            T = max(len(s) for s in chunk)
            start = torch.tensor([self.cached[r] for r in rows], device=self.device)
            if int(start.max()) + T > self.max_len:
                raise ValueError(f"prefill of {T} tokens at offset {int(start.max())} exceeds max_len={self.max_len}")
            toks = torch.zeros(len(chunk), T, dtype=torch.long, device=self.device)
            for b, s in enumerate(chunk):
                toks[b, : len(s)] = torch.tensor(s, device=self.device)
            # Right padding: pads take the positions after a row's own tokens, so its real tokens never see them.
            pos = start[:, None] + torch.arange(T, device=self.device)  # (B, T)
            last = torch.tensor([len(s) - 1 for s in chunk], device=self.device)[:, None]  # (B, 1)
            logits = self.model(toks, positions=pos, cache=self.cache,
                                rows=torch.tensor(rows, device=self.device), logits_at=last)  # (B, 1, V)
            self.n_forward += 1
            for r, s in zip(rows, chunk):
                self.cached[r] += len(s)
            out.append(logits[:, 0])
            i = j
        return torch.cat(out)  # (B, V)

    def _copy_rows(self, src: int, dst: list[int]) -> None:
        n = self.cached[src]
        idx = torch.tensor(dst, device=self.device)
        self.cache.k[:, idx, :, :n] = self.cache.k[:, src : src + 1, :, :n]
        self.cache.v[:, idx, :, :n] = self.cache.v[:, src : src + 1, :, :n]
        for d in dst:
            self.cached[d] = n

    def submit(self, prompt: list[int], sampling: SamplingParams, n: int = 1) -> list[int]:
        """Prefill `prompt` once into n free slots (a GRPO group); the rows start decoding. Returns the slots."""
        return self.submit_many([prompt], sampling, n)[0]

    def submit_many(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[list[int]]:
        """Like submit for several prompts at once: one ragged prefill for all of them."""
        free = [s for s in range(self.n_slots) if self.state[s] == FREE]
        if len(free) < n * len(prompts):
            raise RuntimeError(f"{len(prompts)} prompts x {n} need {n * len(prompts)} free slots, {len(free)} free")
        for p in prompts:
            if not 0 < len(p) < self.max_len:
                raise ValueError(f"prompt of {len(p)} tokens does not fit max_len={self.max_len}")
        groups = [free[i * n : (i + 1) * n] for i in range(len(prompts))]
        for g in groups:
            for s in g:
                self.release(s)
        logits = self._prefill(prompts, [g[0] for g in groups])  # (P, V)
        for g in groups:
            if n > 1:
                self._copy_rows(g[0], g[1:])
        rows = [s for g in groups for s in g]
        self._start_turn(rows, logits.repeat_interleave(n, dim=0), sampling)
        return groups

    def append(self, slot: int, tokens: list[int], sampling: SamplingParams) -> None:
        """Append forced tokens to a parked row (prefilled at its own offset); the row decodes a new turn."""
        if self.state[slot] != PARKED:
            raise RuntimeError(f"slot {slot} is not parked")
        seq = ([self.pending[slot]] if self.pending[slot] is not None else []) + list(tokens)
        if self.cached[slot] + len(seq) >= self.max_len:
            raise ValueError(f"slot {slot}: {self.length(slot)} + {len(tokens)} tokens exceed max_len={self.max_len}")
        self.pending[slot] = None
        logits = self._prefill([seq], [slot])
        self._start_turn([slot], logits, sampling)

    # ----------------------------------------------------------------------------------------------- decode
    def _params(self, rows: list[int]):
        sp = [self.sampling[r] for r in rows]
        t = torch.tensor([s.temperature for s in sp], device=self.device)
        p = torch.tensor([s.top_p for s in sp], device=self.device)
        k = torch.tensor([s.top_k for s in sp], device=self.device)
        return t, p, k

    def _start_turn(self, rows: list[int], logits: torch.Tensor, sampling: SamplingParams) -> None:
        for r in rows:
            self.state[r], self.sampling[r] = DECODING, sampling
            self.turn_tokens[r], self.turn_logprobs[r] = [], []
        toks, lps = sample(logits, *self._params(rows), self.gen)
        self._accept(rows, toks.tolist(), lps.tolist())

    def _accept(self, rows, toks, lps) -> None:
        """Record one sampled token per row and park the rows that must stop."""
        for r, t, lp in zip(rows, toks, lps):
            self.pending[r] = t
            self.turn_tokens[r].append(t)
            self.turn_logprobs[r].append(lp)
            reason = self._stop_reason(r, t)
            if reason:
                self.state[r] = PARKED
                self._done.append(Finished(r, self.turn_tokens[r], self.turn_logprobs[r], reason))

    def _stop_reason(self, r: int, t: int) -> str | None:
        sp = self.sampling[r]
        if t in sp.stop_token_ids:
            return "stop_token"
        if sp.stop_strings and self.decode is not None:
            longest = max(len(s) for s in sp.stop_strings)
            tail = self.decode(self.turn_tokens[r][-(longest + 2):])  # a token holds >= 1 char: enough context
            if any(s in tail for s in sp.stop_strings):
                return "stop_string"
        if len(self.turn_tokens[r]) >= sp.max_new_tokens:
            return "length"
        if self.cached[r] + 1 >= self.max_len:  # the pending token needs the last cache position
            return "context"
        return None

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One decode step for all decoding rows; returns the rows that stopped (also those stopped at admission)."""
        rows = [s for s in range(self.n_slots) if self.state[s] == DECODING]
        if rows:
            self._decode(rows)
        done, self._done = self._done, []
        return done

    def _decode(self, rows: list[int]) -> None:
        # Decode the contiguous block 0..max(rows): rows=None lets attention read the cache in place (no gather);
        # parked/free rows inside the block compute a throwaway token written past their own cursor.
        B = rows[-1] + 1
        toks = torch.tensor([self.pending[s] if self.state[s] == DECODING else 0 for s in range(B)],
                            device=self.device)[:, None]  # (B, 1)
        pos = torch.tensor([min(self.cached[s], self.max_len - 1) for s in range(B)], device=self.device)
        kv_len = max(self.cached[s] for s in rows) + 1
        logits = self.model(toks, positions=pos[:, None], cache=self.cache, kv_len=kv_len)[:, -1]  # (B, V)
        self.n_forward += 1
        for s in rows:
            self.cached[s] += 1
        sel = torch.tensor(rows, device=self.device)
        t, lp = sample(logits[sel], *self._params(rows), self.gen)
        self._accept(rows, t.tolist(), lp.tolist())


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             stop_token_ids=(), seed: int = 0, *, top_k: int = 0, stop_strings=(), decode=None,
             n_slots: int | None = None, max_len: int | None = None, return_logprobs: bool = False):
    """New token ids for each prompt (ending with the stop token when one was hit); continuous batching over
    `n_slots` rows (default: all prompts at once, at most 64)."""
    sp = SamplingParams(temperature, top_p, top_k, max_new_tokens, tuple(stop_token_ids), tuple(stop_strings))
    n_slots = n_slots or max(1, min(len(prompts), 64))
    max_len = max_len or max(len(p) for p in prompts) + max_new_tokens + 1
    eng = Engine(model, n_slots, max_len, decode=decode, seed=seed)
    out: list = [None] * len(prompts)
    owner: dict[int, int] = {}
    queue = list(range(len(prompts)))
    while queue or owner:
        free = eng.n_free
        if queue and free:
            take, queue = queue[:free], queue[free:]
            for i, g in zip(take, eng.submit_many([prompts[i] for i in take], sp)):
                owner[g[0]] = i
        for f in eng.step():
            i = owner.pop(f.slot)
            out[i] = (f.tokens, f.logprobs) if return_logprobs else f.tokens
            eng.release(f.slot)
    return out
