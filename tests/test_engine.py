"""The generation engine (rollout.py, first half: sample, Engine, generate) against plain forwards and transformers.

What is checked: greedy tokens on ragged batches equal a no-cache argmax loop and transformers' `generate`; the
logits of a row in a ragged batch, and after park + append, equal the row run alone / re-prefilled; seeds,
temperature, top-k and top-p; stop token ids, stop strings (also one spanning two tokens), per-row max_new_tokens
and the end of the cache, with their `reason`; group sharing (submit with n=G) against G separate prefills;
continuous batching (a released slot takes a new prompt mid-run); returned logprobs; the KV-cache memory check.
Paged cache: block sizes 1, 4, 16 and max_len (= the contiguous cache) agree on a scenario with ragged prompts, a
shared group, park/append, slot and block reuse and a row at the cache's end; shared blocks are refcounted and freed
with the group's last row; the books balance over 3,000 random operations; a full pool is an error with numbers.
Same seed, same run: per-row seeds make a row's tokens independent of its batch, and two rollouts with different
tool latencies give the same trajectories. The CUDA-graph path's buffers and buckets run on CPU with a stand-in
graph; the real graphs are compared with eager on CUDA (skipped without a GPU).

Models: the conftest tiny random checkpoints in fp32 (tiny_qwen2, tiny_llama), plus "sharp" variants made with
conftest's make_tiny_checkpoint and a larger init (initializer_range=0.5): the default init gives near-uniform logits
and a greedy row repeats one token forever, which would hide position or cache bugs; the sharp models give a
different token at almost every step.
Run: python -m pytest -x -q tests/test_engine.py        (CPU, offline, ~30 s; the GPU tests: add -m gpu on CUDA)
"""

import random
import threading
import time
from collections import Counter

import pytest
import torch

from conftest import make_tiny_checkpoint
from model import Transformer
from rollout import FREE, PARKED, WAITING, Engine, SamplingParams, generate, memory_check

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
LENGTHS = (5, 17, 9, 30, 1, 12)  # ragged prompts; 1 = a single-token prompt
# cached vs no-cache attention sums in another order: fp32 noise ~1.5e-4 on the sharp models (logit std ~4);
# a wrong position or cache row shows up as O(1) differences
VS_PLAIN = dict(atol=3e-4, rtol=0)


def assert_same_logits(got, want):
    """Logits of one row computed in two batch compositions (shapes) by the cached path. CPU kernels block and
    vectorise the sums differently for different batch shapes, so fp32 results differ by a few dozen ulps of the
    largest logit: measured 1.2e-4 on the sharp models, whose logits reach |21| (ulp 1.9e-6 there). The tolerance
    is relative to that scale, 1e-5 x max|logit| (~2e-4 here), not a fixed 1e-4; a wrong position, block or mask
    moves logits by O(1)."""
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; tiny matmuls gain nothing from threads
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def sharp_qwen2(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharp_qwen2"), "qwen2", tie=True, seed=1,
                                initializer_range=0.5, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharp_llama"), "llama", tie=False, seed=2,
                                initializer_range=0.5)


_models: dict = {}


def load(path) -> Transformer:
    if path not in _models:
        _models[path] = Transformer.from_pretrained(path).eval()  # fp32
    return _models[path]


@pytest.fixture(scope="module")
def model(sharp_qwen2):
    return load(sharp_qwen2)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def plain_logits(model, seq: list[int]) -> torch.Tensor:
    """No-cache forward of one sequence: (T, V) fp32 logits, on the CPU."""
    return model(torch.tensor([seq], device=next(model.parameters()).device))[0].float().cpu()


@torch.no_grad()
def argmax_loop(model, prompt: list[int], n: int) -> list[int]:
    """The reference greedy decoder: a full forward of the whole sequence for every new token, no cache."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(plain_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def run(eng: Engine, slots) -> dict:
    """Step until every slot in `slots` has finished its turn; returns slot -> Finished."""
    done: dict = {}
    for _ in range(10_000):
        for f in eng.step():
            assert f.slot not in done, "a slot finished twice in one turn"
            done[f.slot] = f
        if all(s in done for s in slots):
            return done
    raise AssertionError("engine did not finish")


class Recorder(torch.nn.Module):
    """Wraps a model for the engine and keeps, for every call, {slot: fp32 logits of the row's last token}. The
    slot of a batch row is the engine row whose block table it was given (unique: group rows differ in their last
    block)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls, self.engine = inner, inner.config, [], None

    def forward(self, tokens, positions=None, cache=None, block_table=None, logits_at=None):
        out = self.inner(tokens, positions=positions, cache=cache, block_table=block_table, logits_at=logits_at)
        tables = self.engine.table[:, : block_table.shape[1]]
        slots = [int((tables == row).all(1).nonzero()[0, 0]) for row in block_table]
        self.calls.append({s: out[b, -1].float().clone() for b, s in enumerate(slots)})
        return out


def recorded(model, **kw) -> tuple[Engine, Recorder]:
    rec = Recorder(model)
    rec.engine = Engine(rec, **kw)
    return rec.engine, rec


# ------------------------------------------------------------------------------------------------ greedy parity

@pytest.mark.parametrize("which", ["sharp_qwen2", "sharp_llama", "tiny_qwen2", "tiny_llama"])
def test_greedy_ragged_matches_argmax_loop_and_transformers(which, request):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(which)
    model, n = load(path), 12
    prompts = make_prompts()
    ours = generate(model, prompts, n, temperature=0.0)  # all six ragged prompts in one batch
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run all n tokens, as ours does without stop ids
    for p, got in zip(prompts, ours):
        assert got == argmax_loop(model, p, n)
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=n, do_sample=False, pad_token_id=0)
        assert got == ids[0, len(p):].tolist()
    if which.startswith("sharp"):  # the check has teeth: rows are not one repeated token
        assert all(len(set(o)) > n // 2 for o in ours), ours


def test_greedy_independent_of_batching(model):
    prompts = make_prompts()
    alone = [generate(model, [p], 10, temperature=0.0)[0] for p in prompts]
    assert generate(model, prompts, 10, temperature=0.0) == alone
    assert generate(model, prompts, 10, temperature=0.0, n_slots=2) == alone  # continuous batching, 2 slots


# ------------------------------------------------------------------------------------------------ logits

@pytest.mark.parametrize("prefill_tokens", [8192, 24])  # 24: the ragged prefill is split into several chunks
def test_ragged_batch_logits_equal_row_alone(model, prefill_tokens):
    prompts, n = make_prompts((5, 17, 9)), 6
    sp = SamplingParams(temperature=0.0, max_new_tokens=n)
    eng, rec = recorded(model, n_slots=3, max_len=64, prefill_tokens=prefill_tokens)
    slots = [g[0] for g in eng.submit_many(prompts, sp)]
    done = run(eng, slots)
    for s, p in zip(slots, prompts):
        batch = torch.stack([c[s] for c in rec.calls if s in c])[: n]  # prefill, then one per decode step
        assert batch.shape[0] == n
        solo, solo_rec = recorded(model, n_slots=1, max_len=64)
        solo.submit(p, sp)
        assert run(solo, [0])[0].tokens == done[s].tokens
        alone = torch.stack([c[0] for c in solo_rec.calls])[: n]
        assert_same_logits(batch, alone)
        # and both equal a plain causal forward over prompt + generated tokens
        full = plain_logits(model, p + done[s].tokens)[len(p) - 1: len(p) - 1 + n]
        torch.testing.assert_close(batch, full, **VS_PLAIN)


def test_park_append_equals_reprefill(model):
    """Row 0 parks after 3 tokens while row 1 keeps decoding (row 0 sits inside the decoded block); forced tokens
    appended to row 0 give the same logits and continuation as prefilling the whole sequence from scratch."""
    pa, pb = make_prompts((7, 11), seed=4)
    forced = make_prompts((6,), seed=5)[0]
    eng, rec = recorded(model, n_slots=2, max_len=96)
    a = eng.submit(pa, SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    b = eng.submit(pb, SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    assert (a, b) == (0, 1)
    first = run(eng, [a])[a]
    assert first.reason == "length" and len(first.tokens) == 3
    for _ in range(4):  # row 1 decodes while row 0 is parked
        assert eng.step() == []
    assert eng.length(a) == len(pa) + 3  # the last sampled token is pending, counted in the length
    eng.append(a, forced, SamplingParams(temperature=0.0, max_new_tokens=5))
    appended = rec.calls[-1][a]  # the append's prefill: logits after the last forced token
    assert eng.length(a) == len(pa) + 3 + len(forced) + 1
    seq = pa + first.tokens + forced
    torch.testing.assert_close(appended, plain_logits(model, seq)[-1], **VS_PLAIN)
    fresh, fresh_rec = recorded(model, n_slots=1, max_len=96)
    fresh.submit(seq, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert_same_logits(appended, fresh_rec.calls[0][0])
    done = run(eng, [a, b])
    assert done[a].tokens == run(fresh, [0])[0].tokens == argmax_loop(model, seq, 5)
    assert first.tokens == argmax_loop(model, pa, 3)
    assert done[b].tokens == argmax_loop(model, pb, 12)  # the parked row did not disturb its neighbour
    # a second turn on the same row: append again (row 1 is parked now)
    eng.append(a, forced[:2], SamplingParams(temperature=0.0, max_new_tokens=4))
    seq2 = seq + done[a].tokens + forced[:2]
    assert run(eng, [a])[a].tokens == argmax_loop(model, seq2, 4)


# ------------------------------------------------------------------------------------------------ sampling

def test_seed_determinism_and_temperature_zero(model):
    prompts = make_prompts((5, 9, 13))
    s1 = generate(model, prompts, 8, temperature=1.0, seed=1)
    assert s1 == generate(model, prompts, 8, temperature=1.0, seed=1)
    s2 = generate(model, prompts, 8, temperature=1.0, seed=2)
    assert all(a != b for a, b in zip(s1, s2))
    greedy = [argmax_loop(model, p, 8) for p in prompts]
    assert s1 != greedy
    assert generate(model, prompts, 8, temperature=0.0, seed=1) == greedy
    assert generate(model, prompts, 8, temperature=0.0, seed=2) == greedy
    assert generate(model, prompts, 8, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, prompts, 8, temperature=1.0, top_p=1e-6, seed=4) == greedy


def ranks_and_nucleus(model, prompt, tokens, temperature, top_p):
    """For each sampled token: its rank in the logits that produced it, and the size of the top_p nucleus there."""
    logits = plain_logits(model, prompt + tokens)[len(prompt) - 1: -1] / temperature  # (n, V)
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    ranks = (order == torch.tensor(tokens)[:, None]).float().argmax(-1)
    nucleus = (probs.cumsum(-1) < top_p - 1e-4).sum(-1) + 1  # smallest prefix reaching top_p (fp slack)
    return ranks, nucleus


def test_top_k_and_top_p_restrict_support(model):
    prompts, n, temp = make_prompts((4, 8, 12, 16)), 16, 1.5
    topk = generate(model, prompts, n, temperature=temp, top_k=3, seed=5)
    ranks = torch.cat([ranks_and_nucleus(model, p, t, temp, 1.0)[0] for p, t in zip(prompts, topk)])
    assert ranks.max() <= 2 and ranks.max() > 0  # inside the top 3, and not just greedy

    free = generate(model, prompts, n, temperature=temp, seed=6)
    nuc = generate(model, prompts, n, temperature=temp, top_p=0.5, seed=6)
    outside_free = outside_nuc = 0
    for p, tf, tn in zip(prompts, free, nuc):
        r, size = ranks_and_nucleus(model, p, tf, temp, 0.5)
        outside_free += int((r >= size).sum())
        r, size = ranks_and_nucleus(model, p, tn, temp, 0.5 + 2e-4)  # +slack: never reject a boundary token
        outside_nuc += int((r >= size).sum())
        assert (r > 0).any() or size.max() == 1
    assert outside_free > 0  # unrestricted sampling does leave the nucleus: the check below can fail
    assert outside_nuc == 0


def test_logprobs_are_temperature_scaled_log_softmax(model):
    prompts = make_prompts((6, 14, 3))
    for temp, top_k in [(1.0, 0), (0.7, 0), (1.3, 20)]:  # with top-k: logprob before truncation (documented)
        out = generate(model, prompts, 8, temperature=temp, top_k=top_k, seed=7, return_logprobs=True)
        for p, (toks, lps) in zip(prompts, out):
            assert len(lps) == len(toks) == 8
            logits = plain_logits(model, p + toks)[len(p) - 1: -1]  # (8, V)
            want = torch.log_softmax(logits / temp, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lps), want, atol=1e-4, rtol=0)
            if temp != 1.0:  # the temperature matters: unscaled log-softmax would differ
                unscaled = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
                assert (unscaled - want).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ stopping

def test_stop_token_ids_and_per_row_lengths(model):
    pa, pb, pc = make_prompts((6, 10, 4), seed=8)
    ref_a, ref_b, ref_c = (argmax_loop(model, p, 12) for p in (pa, pb, pc))
    j = next(i for i in range(3, 12) if ref_a[i] not in ref_a[:i])  # first occurrence at index j
    eng = Engine(model, n_slots=4, max_len=64)
    a = eng.submit(pa, SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(ref_a[j], 7)))[0]
    b = eng.submit(pb, SamplingParams(temperature=0.0, max_new_tokens=9))[0]
    c = eng.submit(pc, SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    # a stop id that is the very first sampled token: the row stops at admission and comes out of the next step
    d = eng.submit(pb, SamplingParams(temperature=0.0, max_new_tokens=9, stop_token_ids=(ref_b[0],)))[0]
    first = eng.step()
    assert any(f.slot == d and f.tokens == ref_b[:1] and f.reason == "stop_token" for f in first)
    done = run(eng, [a, b, c])
    assert done[a].tokens == ref_a[: j + 1] and done[a].reason == "stop_token"
    assert done[b].tokens == ref_b[:9] and done[b].reason == "length"
    assert done[c].tokens == ref_c[:3] and done[c].reason == "length"
    assert len(done[a].logprobs) == len(done[a].tokens)
    # generate(): the returned tokens end with the stop token
    assert generate(model, [pa], 12, temperature=0.0, stop_token_ids=(ref_a[j],)) == [ref_a[: j + 1]]


def test_stop_strings(model, tok):
    prompt = make_prompts((8,), seed=9)[0]
    ref = argmax_loop(model, prompt, 40)
    pieces = [tok.decode([t]) for t in ref]
    text_upto = lambda k: tok.decode(ref[:k])  # noqa: E731

    def first_stop(s):  # the token index that completes `s` in the decoded turn
        return next(k for k in range(len(ref)) if s in text_upto(k + 1))

    # a stop string spanning two tokens: the end of one printable token and the start of the next
    spans = [pieces[i][-2:] + pieces[i + 1][:2] for i in range(2, len(ref) - 1)
             if pieces[i].isascii() and pieces[i + 1].isascii() and pieces[i].strip() and pieces[i + 1].strip()]
    span = next(s for s in spans if s not in pieces[first_stop(s)])  # not inside a single token
    k = first_stop(span)
    assert span not in text_upto(k) and span not in pieces[k] and k >= 1
    one = next(p for p in pieces[k + 2:] if p.isascii() and len(p.strip()) >= 3).strip()  # inside one token
    k1 = first_stop(one)
    assert k1 > k + 1

    eng = Engine(model, n_slots=3, max_len=96, decode=tok.decode)
    s_span = eng.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=40, stop_strings=(span,)))[0]
    s_one = eng.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=40, stop_strings=("\x00\x01", one)))[0]
    s_none = eng.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=40))[0]
    done = run(eng, [s_span, s_one, s_none])
    assert done[s_span].tokens == ref[: k + 1] and done[s_span].reason == "stop_string"
    assert done[s_one].tokens == ref[: k1 + 1] and done[s_one].reason == "stop_string"
    assert done[s_none].tokens == ref and done[s_none].reason == "length"
    assert generate(model, [prompt], 40, temperature=0.0, stop_strings=(span,), decode=tok.decode) == [ref[: k + 1]]


def test_stop_strings_decoded_only_when_a_token_could_end_one(model, tok):
    """The tail of a turn is decoded only for tokens whose text holds a stop string's last char."""
    prompt = make_prompts((8,), seed=9)[0]
    ref = argmax_loop(model, prompt, 30)
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    eng = Engine(model, n_slots=1, max_len=64, decode=decode)
    stop = "\x00\x01"  # never produced: the turn runs to its length
    s = eng.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=30, stop_strings=(stop,)))[0]
    assert run(eng, [s])[s].tokens == ref
    pieces = {t: tok.decode([t]) for t in ref}
    expected = sum(stop[-1] in pieces[t] or "\ufffd" in pieces[t] for t in ref)
    assert sum(n > 1 for n in calls) <= expected < 30  # tails decoded: only where a piece could end the stop
    assert sum(n == 1 for n in calls) == len(set(ref))  # each token's own text decoded once, then cached


def test_stop_strings_without_decode_fail_loudly(model):
    """A stop string the engine cannot check (no `decode`) must be an error, not silently ignored."""
    with pytest.raises((ValueError, RuntimeError)):
        generate(model, make_prompts((5,)), 8, temperature=0.0, stop_strings=("a",))
    eng = Engine(model, n_slots=1, max_len=32)  # decode=None
    with pytest.raises((ValueError, RuntimeError)):
        eng.submit([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=8, stop_strings=("a",)))


def test_context_limit(model):
    prompt = make_prompts((10,), seed=10)[0]
    eng = Engine(model, n_slots=1, max_len=16)
    s = eng.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=100))[0]
    f = run(eng, [s])[s]
    assert f.reason == "context" and f.tokens == argmax_loop(model, prompt, 16 - 10)
    assert eng.length(s) == 16
    with pytest.raises(ValueError):  # a parked row at the end of its cache takes no more tokens
        eng.append(s, [5], GREEDY)


def test_misuse_fails_fast(model):
    eng = Engine(model, n_slots=2, max_len=32)
    with pytest.raises(ValueError):
        eng.submit(list(range(3, 40)), GREEDY)  # longer than the cache
    with pytest.raises(RuntimeError):
        eng.submit([5, 6], GREEDY, n=3)  # more rows than slots
    s = eng.submit([5, 6], GREEDY)[0]
    with pytest.raises(RuntimeError):
        eng.append(s, [7], GREEDY)  # decoding, not parked


def test_generate_no_prompts(model):
    assert generate(model, [], 8, temperature=0.0) == []


# ------------------------------------------------------------------------------------------------ groups, batching

def row_kv(eng: Engine, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n cached positions of a row, read through its block list: (L, n, Hkv, D) keys and values."""
    blocks = eng.slots[slot].blocks
    k = eng.cache.k[:, blocks].flatten(1, 2)[:, :n]  # (L, n, Hkv, D)
    v = eng.cache.v[:, blocks].flatten(1, 2)[:, :n]
    return k, v


def test_group_sharing_equals_separate_prefills(model):
    prompt, other = make_prompts((13, 6), seed=11)
    ref = argmax_loop(model, prompt, 10)
    eng = Engine(model, n_slots=5, max_len=64, block_size=4)
    group = eng.submit(prompt, GREEDY, n=4)
    o = eng.submit(other, GREEDY)[0]
    assert len(set(group + [o])) == 5 and eng.n_free == 0 and eng.n_decoding == 5
    # 13 tokens = 3 full blocks shared by reference + a private copy of the 1-token last block per row
    full = eng.slots[group[0]].blocks[:3]
    assert all(eng.slots[s].blocks[:3] == full for s in group) and all(eng.refs[b] == 4 for b in full)
    assert len({eng.slots[s].blocks[3] for s in group}) == 4
    sep = Engine(model, n_slots=4, max_len=64, block_size=4)
    singles = [sep.submit(prompt, GREEDY)[0] for _ in range(4)]
    L = len(prompt)  # the shared/copied blocks hold what separate prefills write
    for g, s in zip(group, singles):
        for got, want in zip(row_kv(eng, g, L), row_kv(sep, s, L)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    done = run(eng, group + [o])
    assert all(done[s].tokens == ref for s in group)
    assert done[o].tokens == argmax_loop(model, other, 10)
    for s in group[:3]:  # the shared blocks stay until the group's last row lets go
        eng.release(s)
    assert all(eng.refs[b] == 1 for b in full) and not set(full) & set(eng.free_blocks)
    eng.release(group[3])
    assert set(full) <= set(eng.free_blocks)


def test_kept_prefix_is_prefilled_once_and_changes_no_token(model):
    """keep_prefix: prompts that start with the kept tokens hold its full blocks by reference and prefill only the
    rest; their greedy tokens are those of plain prefills, a prompt that does not start with it is prefilled whole,
    and once every row and the prefix are let go, every block is free. A pool that could then not take a row at
    max_len keeps nothing."""
    head = make_prompts((21,), seed=21)[0]  # 5 full blocks of 4 and one token left over
    tails = make_prompts((3, 7), seed=22)
    other = make_prompts((9,), seed=23)[0]
    prompts = [head + tails[0], head + tails[1], other]
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, tokens, **kw):
            calls.append(tokens.shape[1])
            return self.inner(tokens, **kw)

    eng = Engine(Counting(), n_slots=4, max_len=64, block_size=4)
    assert eng.keep_prefix(head) == 20
    kept = eng._kept[1]
    assert calls == [20] and all(eng.refs[b] == 1 for b in kept)
    slots = [eng.submit(prompt, GREEDY, n=n) for prompt, n in zip(prompts, (2, 1, 1))]
    assert calls[1:] == [4, 8, 9]  # 24 - 20, 28 - 20, and the other prompt whole
    assert eng.slots[slots[0][0]].blocks[:5] == kept and eng.slots[slots[1][0]].blocks[:5] == kept
    assert all(eng.refs[b] == 4 for b in kept)  # the engine, the group's two rows, the second prompt's row
    done = run(eng, [s for group in slots for s in group])
    for prompt, group in zip(prompts, slots):
        assert [done[s].tokens for s in group] == [argmax_loop(model, prompt, 10)] * len(group)
    for slot in range(eng.n_slots):
        eng.release(slot)
    assert all(eng.refs[b] == 1 for b in kept) and not set(kept) & set(eng.free_blocks)
    eng.drop_prefix()
    check_blocks(eng)
    assert len(eng.free_blocks) == eng.cache.n_blocks - 1
    tight = Engine(model, n_slots=4, max_len=64, block_size=4, kv_tokens=64 + 3 * 4)
    assert tight.keep_prefix(head) == 0 and tight._kept is None


def test_submit_many_groups_of_several_prompts(model):
    """submit_many(prompts, n=G): one ragged prefill, each prompt's cache copied into its own G rows."""
    prompts = make_prompts((11, 4, 7), seed=15)
    eng = Engine(model, n_slots=7, max_len=48)
    groups = eng.submit_many(prompts, GREEDY, n=2)
    assert [len(g) for g in groups] == [2, 2, 2] and len({s for g in groups for s in g}) == 6
    done = run(eng, [s for g in groups for s in g])
    for p, g in zip(prompts, groups):
        ref = argmax_loop(model, p, 10)
        assert [done[s].tokens for s in g] == [ref, ref]


def test_group_sharing_sampled(model):
    prompt = make_prompts((13,), seed=12)[0]
    sp = SamplingParams(temperature=1.0, max_new_tokens=8)

    def group_run(seed):
        eng = Engine(model, n_slots=4, max_len=64, seed=seed)
        slots = eng.submit(prompt, sp, n=4)
        done = run(eng, slots)
        return [done[s] for s in slots]

    rows = group_run(13)
    assert len({tuple(f.tokens) for f in rows}) == 4  # a group samples independent rows
    assert [f.tokens for f in group_run(13)] == [f.tokens for f in rows]
    for f in rows:  # every row's logprobs are those of the prompt's true continuation: the copied cache is right
        logits = plain_logits(model, prompt + f.tokens)[len(prompt) - 1: -1]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(f.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(f.logprobs), want, atol=1e-4, rtol=0)
    # One generator, rows drawn in slot order: the group and 4 separate submits of the prompt get the same draws.
    sep = Engine(model, n_slots=4, max_len=64, seed=13)
    slots = [sep.submit(prompt, sp)[0] for _ in range(4)]
    got = run(sep, slots)
    assert [got[s].tokens for s in slots] == [f.tokens for f in rows]


def test_continuous_batching_released_slot_takes_new_prompt(model):
    pa, pb, pc = make_prompts((9, 15, 4), seed=14)
    eng = Engine(model, n_slots=2, max_len=64)
    a = eng.submit(pa, SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    b = eng.submit(pb, SamplingParams(temperature=0.0, max_new_tokens=14))[0]
    fa = run(eng, [a])[a]
    eng.release(a)
    assert eng.n_free == 1 and eng.length(a) == 0
    assert eng.step() == [] and eng.n_decoding == 1  # row b decodes next to a free slot
    c = eng.submit(pc, SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    assert c == a  # the released slot is reused while b is mid-turn
    done = run(eng, [b, c])
    assert fa.tokens == argmax_loop(model, pa, 3)
    assert done[b].tokens == argmax_loop(model, pb, 14)
    assert done[c].tokens == argmax_loop(model, pc, 6)


# ------------------------------------------------------------------------------------------------ paged cache

def scenario(model, block_size: int, **engine_kw) -> dict:
    """Ragged prompts, a sampled group sharing its prompt, park + append (on a group row too), release and reuse of
    slots and blocks, a row that runs into the end of its cache. Returns every turn's (tokens, logprobs)."""
    pa, pb, pc, forced = make_prompts((13, 6, 9, 5), seed=21)
    eng = Engine(model, n_slots=4, max_len=40, block_size=block_size, **engine_kw)
    if engine_kw.get("cuda_graphs") and eng.device.type == "cpu":
        eng.cuda_graphs, eng._capture = True, EagerGraph.capture  # the graph path's buffers and buckets, on CPU
    out = {}
    group = eng.submit(pa, SamplingParams(temperature=1.0, max_new_tokens=7), n=3, seeds=[("a", g) for g in range(3)])
    b = eng.submit(pb, SamplingParams(temperature=0.0, max_new_tokens=5))[0]
    done = run(eng, group + [b])
    out.update({f"group{i}": done[s] for i, s in enumerate(group)}, b=done[b])
    eng.append(b, forced, SamplingParams(temperature=0.0, max_new_tokens=6))
    eng.append(group[1], forced[:3], SamplingParams(temperature=1.0, max_new_tokens=4))
    done = run(eng, [b, group[1]])
    out.update(b2=done[b], group1_2=done[group[1]])
    eng.release(b)
    eng.release(group[0])
    c = eng.submit(pc, SamplingParams(temperature=0.0, max_new_tokens=100))[0]  # takes a released slot
    out["c"] = run(eng, [c])[c]
    for i in range(4):
        if eng.slots[i].state != 0:
            eng.release(i)
    assert len(eng.free_blocks) == eng.cache.n_blocks - 1  # every block back
    return out, (pa, pb, pc, forced)


def test_paged_equals_contiguous_and_plain_forward(model):
    """Block sizes 1, 4, 16 and 40 (= max_len: one block per row, the contiguous cache) give the same tokens and
    logprobs; greedy rows equal the no-cache argmax loop, sampled rows' logprobs equal a plain forward."""
    runs = {bs: scenario(model, bs)[0] for bs in (40, 1, 4, 16)}
    ref, (pa, pb, pc, forced) = runs[40], scenario(model, 40)[1]
    for bs, got in runs.items():
        for k, f in ref.items():
            assert got[k].tokens == f.tokens and got[k].reason == f.reason, (bs, k)
            assert_same_logits(torch.tensor(got[k].logprobs), torch.tensor(f.logprobs))
    assert ref["b"].tokens == argmax_loop(model, pb, 5)
    seq_b = pb + ref["b"].tokens + forced
    assert ref["b2"].tokens == argmax_loop(model, seq_b, 6)
    assert ref["c"].reason == "context" and ref["c"].tokens == argmax_loop(model, pc, 40 - len(pc))
    assert len({tuple(ref[f"group{i}"].tokens) for i in range(3)}) == 3  # the group sampled three different rows
    seq_g = pa + ref["group1"].tokens + forced[:3]
    for prefix, f in [(pa, ref["group0"]), (pa, ref["group2"]), (seq_g, ref["group1_2"])]:
        logits = plain_logits(model, prefix + f.tokens)[len(prefix) - 1: -1]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(f.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(f.logprobs), want, atol=1e-4, rtol=0)


class EagerGraph:
    """Stands in for a captured CUDA graph on CPU: replay() reruns the forward on the static buffers, so the
    engine's bucketing, padding rows and buffer filling are tested here."""

    def __init__(self, run):
        self.replay = run
        run()

    capture = staticmethod(lambda run: EagerGraph(run))


def test_graph_path_buffers_and_buckets_on_cpu(model):
    """The CUDA-graph decode path (static buffers, batch buckets with padding rows on the scratch block, table
    width buckets) run eagerly on CPU gives the eager engine's tokens and logprobs."""
    eager, _ = scenario(model, 4)
    graphed, _ = scenario(model, 4, cuda_graphs=True)
    for k, f in eager.items():
        assert graphed[k].tokens == f.tokens and graphed[k].reason == f.reason, k
        assert_same_logits(torch.tensor(graphed[k].logprobs), torch.tensor(f.logprobs))
    prompts = make_prompts((5, 17, 9, 30, 1, 12, 7, 3, 11, 2, 6, 8, 4, 10, 13, 15, 14, 16, 3, 9), seed=24)
    eng = Engine(model, n_slots=20, max_len=64, cuda_graphs=True)
    eng.cuda_graphs, eng._capture = True, EagerGraph.capture
    slots = [g[0] for g in eng.submit_many(prompts, GREEDY)]
    done = run(eng, slots)  # 20 rows: the 32-row bucket, 12 padding rows
    assert {k[0] for k in eng._graphs} == {32}
    assert [done[s].tokens for s in slots] == generate(model, prompts, 10, temperature=0.0)


def check_blocks(eng: Engine) -> None:
    """Refcounts = rows holding each block, the free list = exactly the unheld blocks, the table mirrors the lists."""
    held = Counter(b for s in eng.slots for b in s.blocks)
    n = eng.cache.n_blocks
    assert 0 not in held and [eng.refs[b] for b in range(1, n)] == [held.get(b, 0) for b in range(1, n)]
    assert sorted(eng.free_blocks) == [b for b in range(1, n) if b not in held]
    for i, s in enumerate(eng.slots):
        row = eng.table[i].tolist()
        assert row[: len(s.blocks)] == s.blocks and not any(row[len(s.blocks):])


def test_block_accounting_no_leak(model):
    """Thousands of random submit (groups too) / append / step / release operations on a pool small enough to run
    out: the books always balance, a pool error at submit changes nothing, decode preempts instead of failing, and
    at the end every block is free again."""
    rng = random.Random(0)
    eng = Engine(model, n_slots=6, max_len=48, block_size=4, kv_tokens=96)  # 24 blocks for 6 x 12 possible
    sp = SamplingParams(temperature=0.0, max_new_tokens=3)
    errors = Counter()
    preempted = 0
    for _ in range(3000):
        op = rng.random()
        parked = [i for i, s in enumerate(eng.slots) if s.state == PARKED]
        used = [i for i, s in enumerate(eng.slots) if s.state != FREE]
        try:
            if op < 0.3 and eng.n_free:
                prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 20))]
                eng.submit(prompt, sp, n=rng.randint(1, min(3, eng.n_free)))
            elif op < 0.5 and parked:
                s, k = rng.choice(parked), rng.randint(1, 8)
                if eng.length(s) + k + 1 < eng.max_len:
                    eng.append(s, [rng.randrange(3, 49152) for _ in range(k)], sp)
            elif op < 0.7 and used:
                eng.release(rng.choice(used))
            else:
                eng.step()
        except RuntimeError as e:
            assert "pool exhausted" in str(e)
            errors[str(e).split(":")[1].split(",")[0]] += 1
        preempted += sum(s.state == WAITING and not s.blocks for s in eng.slots)
        check_blocks(eng)
    for i in range(eng.n_slots):
        eng.release(i)
    check_blocks(eng)
    assert len(eng.free_blocks) == eng.cache.n_blocks - 1 == 24
    assert sum(errors.values()) > 10, errors  # the pool did run out at submit ...
    assert preempted > 10  # ... and rows were preempted (not failed) in decode and append


def test_pool_exhaustion_preempts_and_resumes_exactly(model):
    """Two greedy rows that outgrow a pool of one row's size: the newest is preempted (its blocks freed), resumed
    by re-prefilling its exact tokens once the other is parked, and both decode exactly what they decode alone. A
    group too big for the pool at submit is still a clear error that changes nothing."""
    eng = Engine(model, n_slots=3, max_len=64, block_size=8, kv_tokens=64)  # 8 blocks of 8 tokens: one row's worth
    with pytest.raises(RuntimeError, match=r"pool exhausted: 10 blocks asked, 8 free of 8 \(8 tokens each\)"):
        eng.submit(list(range(3, 63)), GREEDY, n=3)  # 60 tokens: 8 blocks, + 2 private copies of the last one
    assert eng.n_free == 3 and len(eng.free_blocks) == 8  # nothing was taken
    pa, pb = make_prompts((16, 12), seed=23)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=30)
    a = eng.submit(pa, sampling)[0]
    b = eng.submit(pb, sampling)[0]
    done = {}
    waited = False
    for _ in range(200):
        for finished in eng.step():
            done[finished.slot] = finished
        waited = waited or eng.slots[b].state == WAITING
        check_blocks(eng)
        if len(done) == 2:
            break
    assert waited and eng.slots[b].blocks and eng.n_decoding == 0  # b was preempted, then came back
    assert done[a].tokens == argmax_loop(model, pa, 30)
    assert done[b].tokens == argmax_loop(model, pb, 30)
    assert eng.length(a) == 16 + 30 and eng.length(b) == 12 + 30
    forced = make_prompts((5,), seed=24)[0]
    eng.append(a, forced, SamplingParams(temperature=0.0, max_new_tokens=4))  # a was evicted to resume b
    assert run(eng, [a])[a].tokens == argmax_loop(model, pa + done[a].tokens + forced, 4)
    eng.release(a)
    eng.release(b)
    assert len(eng.free_blocks) == 8 and eng.n_free == 3


def test_pool_smaller_than_a_row_fails_at_construction(model):
    with pytest.raises(MemoryError, match="cannot hold one row of max_len=64"):
        Engine(model, n_slots=2, max_len=64, block_size=8, kv_tokens=32)


# ------------------------------------------------------------------------------------------------ same seed, same run

def test_per_row_seeds_make_sampling_independent_of_batching(model):
    """A row keyed k samples the same tokens alone or in a batch, in any slot, next to any neighbour, and as a
    group row; the engine seed still matters."""
    prompts = make_prompts((5, 11, 8, 3), seed=22)
    keys = [(7, i, 0) for i in range(4)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=9)
    eng = Engine(model, n_slots=4, max_len=64, seed=3)
    slots = [g[0] for g in eng.submit_many(prompts, sp, seeds=keys)]
    done = run(eng, slots)
    together = [done[s] for s in slots]
    eng2 = Engine(model, n_slots=3, max_len=64, seed=3)
    for i in reversed(range(4)):  # reverse order, each next to a different neighbour that started earlier
        other = eng2.submit(make_prompts((4 + i,), seed=30 + i)[0], sp)[0]
        eng2.step()
        s = eng2.submit(prompts[i], sp, seeds=[keys[i]])[0]
        d = run(eng2, [s, other])
        assert d[s].tokens == together[i].tokens
        assert_same_logits(torch.tensor(d[s].logprobs), torch.tensor(together[i].logprobs))
        eng2.release(s)
        eng2.release(other)
    g = eng2.submit(prompts[1], sp, n=2, seeds=[(9, 9, 9), keys[1]])  # a group row keyed like row 1
    assert run(eng2, g)[g[1]].tokens == together[1].tokens
    eng3 = Engine(model, n_slots=4, max_len=64, seed=4)
    slots = [x[0] for x in eng3.submit_many(prompts, sp, seeds=keys)]
    d3 = run(eng3, slots)
    assert all(d3[s].tokens != t.tokens for s, t in zip(slots, together))


class Biased(torch.nn.Module):
    """A policy that calls tools: the tiny model's logits (scaled down) plus biases making `</search>` likely
    (after `</`, `search`; after `search`, `>`) and ` par` common; a third of the mass stays on the model's own
    random distribution, so the draws still matter."""

    def __init__(self, inner, ids):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.close, self.search, self.gt, self.word = ids
        self.shapes = []  # (B, T) of every forward: the batch compositions the engine ran

    def forward(self, tokens, positions=None, cache=None, block_table=None, logits_at=None):
        self.shapes.append(tuple(tokens.shape))
        out = self.inner(tokens, positions=positions, cache=cache, block_table=block_table, logits_at=logits_at)
        last = tokens if logits_at is None else tokens.gather(1, logits_at)  # (B, K): the token before each
        bias = torch.zeros_like(out)  # (B, K, V)
        bias[..., self.close] = 11.0  # with the model's logits scaled to std ~1: p ~ 0.25
        bias[..., self.word] = 11.5  # p ~ 0.4
        bias[..., self.search] = torch.where(last == self.close, 30.0, 0.0)
        bias[..., self.gt] = torch.where(last == self.search, 30.0, 0.0)
        return 0.25 * out + bias


class SleepyBrowser:
    """Tool calls that sleep a random latency (none with seed None) and return text that depends only on the call."""

    def __init__(self, seed):
        self.rng, self.lock, self.order = random.Random(seed), threading.Lock(), []
        self.scale = 0.0 if seed is None else 0.15  # a decode step of the tiny model takes a few ms

    def session(self, question):
        return self

    def web_search(self, queries):
        with self.lock:
            delay = self.rng.uniform(0, self.scale)
        time.sleep(delay)
        with self.lock:
            self.order.append(tuple(queries))
        return f"Results for {queries}: nothing useful."

    browse_webpage = web_search


def test_rollout_same_seed_same_run_whatever_the_tool_latency(sharp_qwen2, tok):
    from rollout import RolloutConfig, rollout

    base = load(sharp_qwen2)
    ids = [tok.encode(s, add_special_tokens=False)[0] for s in ("</", "search", ">", " par")]
    policy = Biased(base, ids)
    cfg = RolloutConfig(max_turns=3, max_new_tokens=12, max_len=512, n_slots=4, date="2026-11-30", prompt="short",
                        turn_prefixes=",".join(["<search>"] * 3), temperature=1.0, example="")
    questions = ["Who?", "Where is it?", "When?"]
    runs = []
    for latency_seed in (None, 1):  # instant tools, then random latencies up to 0.15 s
        browser = SleepyBrowser(latency_seed)
        policy.shapes = []
        with torch.no_grad():
            trajs = rollout(policy, tok, questions, browser, cfg, group_size=2, seed=5)
        runs.append((trajs, policy.shapes))
    (t1, shapes1), (t2, shapes2) = runs
    assert sum(t.stats["n_search"] for t in t1) >= 4  # tool calls did run in the pool
    assert shapes1 != shapes2  # ... and the engine ran different batches in the two runs
    assert len({tuple(t.tokens) for t in t1}) == 6  # every row sampled its own trajectory
    for a, b in zip(t1, t2):
        assert a.tokens == b.tokens and a.loss_mask == b.loss_mask and a.end_reason == b.end_reason
        # bitwise equal unless a row's logits saw a different batch shape (CPU kernel blocking: see
        # assert_same_logits); the sampled tokens above are what must not change
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ memory

def test_memory_check_absurd_cache_fails_clearly(model):
    with pytest.raises(MemoryError, match=r"KV cache needs .* GiB .* lower n_slots"):
        Engine(model, n_slots=100_000, max_len=1_000_000)
    with pytest.raises(MemoryError, match="GiB"):
        memory_check(2**62, torch.device("cpu"))
    memory_check(2**20, torch.device("cpu"))  # 1 MiB fits
    Engine(model, n_slots=2, max_len=32)  # a sane cache still builds


# ------------------------------------------------------------------------------------------------ CUDA

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ragged_greedy_and_logprobs(sharp_qwen2):
    model = Transformer.from_pretrained(sharp_qwen2, device="cuda").eval()  # fp32
    prompts = make_prompts()
    assert generate(model, prompts, 10, temperature=0.0) == [argmax_loop(model, p, 10) for p in prompts]
    out = generate(model, prompts, 8, temperature=0.8, seed=3, return_logprobs=True)
    for p, (toks, lps) in zip(prompts, out):
        logits = plain_logits(model, p + toks)[len(p) - 1: -1]
        want = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps), want, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager(sharp_qwen2):
    """Captured decode (buckets 1..32, padding rows, shared prompt blocks, park/append) equals the eager engine."""
    model = Transformer.from_pretrained(sharp_qwen2, device="cuda").eval()  # fp32
    eager, _ = scenario(model, 4)
    graphed, _ = scenario(model, 4, cuda_graphs=True)
    for k, f in eager.items():
        assert graphed[k].tokens == f.tokens and graphed[k].reason == f.reason, k
        torch.testing.assert_close(torch.tensor(graphed[k].logprobs), torch.tensor(f.logprobs), atol=1e-4, rtol=0)
    prompts = make_prompts(tuple(range(3, 23)), seed=24)
    for temp in (0.0, 0.8):  # 20 rows: the 32-row bucket; rows that hit a stop id leave, smaller buckets follow
        kw = dict(temperature=temp, seed=3, return_logprobs=True, n_slots=20, top_p=0.9)
        e = generate(model, prompts, 24, stop_token_ids=(7, 11, 13), **kw)
        g = generate(model, prompts, 24, stop_token_ids=(7, 11, 13), cuda_graphs=True, **kw)
        for (te, le), (tg, lg) in zip(e, g):
            assert te == tg
            torch.testing.assert_close(torch.tensor(lg), torch.tensor(le), atol=1e-4, rtol=0)
