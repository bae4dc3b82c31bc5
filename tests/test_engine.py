"""rollout.py, part 1: the engine is exact (vs a no-cache loop and transformers), seeded, stops where it should.
Tiny random checkpoints from conftest, float32, CPU. Run: pytest tests/test_engine.py -q
"""

import pytest
import torch

from model import Transformer
from rollout import Engine, SamplingParams, generate

PROMPTS = [[5, 17, 300], [9, 8, 7, 6, 5, 4, 3, 2, 1], list(range(100, 117)), [42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def model(tiny_qwen2):
    torch.manual_seed(0)
    return Transformer.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@torch.no_grad()
def logprobs_alone(model, seq: list[int], start: int, temperature: float = 1.0) -> list[float]:
    """log p(seq[t] | seq[:t]) for t >= start from one no-cache forward of the row alone."""
    logits = model(torch.tensor([seq]))[0].float() / temperature
    lp = torch.log_softmax(logits, -1)
    return [lp[t - 1, seq[t]].item() for t in range(start, len(seq))]


@torch.no_grad()
def argmax_loop(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def run_until_done(eng: Engine, slots: list[int]) -> dict:
    done = {}
    while len(done) < len(slots):
        for f in eng.step():
            done[f.slot] = f
    return done


def test_greedy_ragged_matches_no_cache_loop_and_transformers(model, tiny_qwen2):
    from transformers import AutoModelForCausalLM
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # no stop: compare all 12 tokens
    for p, got in zip(PROMPTS, out):
        assert got == argmax_loop(model, p, 12)
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert got == ref[0, len(p):].tolist()


def test_ragged_rows_equal_rows_alone(model):
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3, return_logprobs=True)
    for p, (toks, lps) in zip(PROMPTS, out):
        ref = logprobs_alone(model, p + toks, len(p))
        assert torch.allclose(torch.tensor(lps), torch.tensor(ref), atol=1e-4), (lps, ref)


def test_park_append_equals_reprefill(model):
    eng = Engine(model, n_slots=3, max_len=64, seed=1)
    sp = SamplingParams(temperature=0.8, max_new_tokens=5)
    slots = eng.submit_many([PROMPTS[0], PROMPTS[2]], sp)
    first = run_until_done(eng, [s[0] for s in slots])
    assert all(f.reason == "length" for f in first.values())
    s = slots[0][0]
    forced = [7, 700, 70, 7000]
    eng.append(s, forced, sp)  # the other row stays parked, untouched
    again = run_until_done(eng, [s])[s]
    seq = PROMPTS[0] + first[s].tokens + forced + again.tokens
    assert eng.length(s) == len(seq)  # the row holds exactly prompt + turn + forced + turn
    ref = logprobs_alone(model, seq, len(seq) - len(again.tokens), temperature=0.8)
    assert torch.allclose(torch.tensor(again.logprobs), torch.tensor(ref), atol=1e-4)
    ref1 = logprobs_alone(model, PROMPTS[0] + first[s].tokens, len(PROMPTS[0]), temperature=0.8)
    assert torch.allclose(torch.tensor(first[s].logprobs), torch.tensor(ref1), atol=1e-4)


def test_seeds_and_truncation(model):
    a = generate(model, PROMPTS, 10, temperature=1.0, seed=0)
    assert a == generate(model, PROMPTS, 10, temperature=1.0, seed=0)
    assert a != generate(model, PROMPTS, 10, temperature=1.0, seed=1)
    greedy = generate(model, PROMPTS, 10, temperature=0.0, seed=0)
    assert greedy == generate(model, PROMPTS, 10, temperature=0.0, seed=123)
    assert generate(model, PROMPTS, 10, temperature=1.0, seed=5, top_k=1) == greedy
    assert generate(model, PROMPTS, 10, temperature=1.0, seed=5, top_p=1e-6) == greedy


def test_stop_ids_strings_and_length(model, tok):
    greedy = generate(model, [PROMPTS[1]], 12, temperature=0.0)[0]
    stop = greedy[4]
    cut = greedy[:greedy.index(stop) + 1]
    assert generate(model, [PROMPTS[1]], 12, temperature=0.0, stop_token_ids=[stop])[0] == cut
    # a stop string made of the end of one token and the start of the next one
    texts = [tok.decode([t]) for t in greedy]
    k = next(i for i in range(2, 11) if texts[i] and texts[i + 1])
    s = texts[k][-1] + texts[k + 1][0]
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    first = next(j for j in range(1, 13) if s in tok.decode(greedy[:j]))
    eng = Engine(model, 1, 64, decode=decode)
    (slot,), = eng.submit_many([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=(s,)))
    f = run_until_done(eng, [slot])[slot]
    assert f.reason == "stop_string" and f.tokens == greedy[:first]
    eng.release(slot)
    (slot,), = eng.submit_many([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=3))
    f = run_until_done(eng, [slot])[slot]
    assert f.reason == "length" and f.tokens == greedy[:3]


def test_context_limit(model):
    eng = Engine(model, 1, max_len=len(PROMPTS[2]) + 4)
    (slot,), = eng.submit_many([PROMPTS[2]], SamplingParams(temperature=0.0, max_new_tokens=50))
    f = run_until_done(eng, [slot])[slot]
    assert f.reason == "context" and len(f.tokens) <= 5


def test_group_sharing_equals_separate_prefills(model):
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    eng = Engine(model, 6, 64)
    group = eng.submit(PROMPTS[2], sp, n=3)
    alone = [eng.submit(PROMPTS[2], sp, n=1)[0] for _ in range(3)]
    done = run_until_done(eng, group + alone)
    ref = done[alone[0]]
    for s in group + alone:
        assert done[s].tokens == ref.tokens
        assert torch.allclose(torch.tensor(done[s].logprobs), torch.tensor(ref.logprobs), atol=1e-5)
    # sampled rows of a group differ from each other (each row draws its own tokens)
    eng2 = Engine(model, 4, 64, seed=0)
    g = eng2.submit(PROMPTS[2], SamplingParams(temperature=1.0, max_new_tokens=8), n=4)
    rows = run_until_done(eng2, g)
    assert len({tuple(rows[s].tokens) for s in g}) > 1


def test_continuous_batching_slot_reuse(model):
    many = PROMPTS * 2
    wide = generate(model, many, 9, temperature=0.0)
    narrow = generate(model, many, 9, temperature=0.0, n_slots=2)  # slots freed and refilled while others decode
    assert narrow == wide


def test_memory_check_message(model):
    with pytest.raises(MemoryError, match=r"KV cache needs .* GiB but only .* GiB is free"):
        Engine(model, n_slots=100_000, max_len=1_000_000)
