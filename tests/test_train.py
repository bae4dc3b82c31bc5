"""train.py: config parsing, advantages, the loss by hand for each aggregation, masking, no input mutation,
micro-batch invariance, the loop with exact resume (1 process, and 2 gloo processes under torchrun), HF export.

The loop tests run with a small stand-in agent (`fake_rollout` below: sampled tokens from the real model, one
forced "observation" span with loss mask 0, a reward that depends on what was sampled) so they check train.py
alone; `test_tiny_preset_real_agent` runs the real rollout.py/browse.py when they are importable."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parameters_to_vector

import train
from data.models import memory_per_gpu
from reward import reward
from train import (Config, PRESETS, Sample, group_advantages, micro_batches, parse_config, policy_loss,
                   token_logprobs, zero_variance_groups)

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------- config

def test_parse_config_types_presets_and_errors():
    cfg = parse_config(Config, ["--preset=tiny", "--lr=0.5", "--steps=7", "--resume=true", "--out_dir=x"], PRESETS)
    assert cfg.model == "tiny" and cfg.lr == 0.5 and cfg.steps == 7 and cfg.resume == "true" and cfg.out_dir == "x"
    assert train.resume_target(cfg) == "auto" and train.resume_target(Config()) is None
    assert parse_config(Config, [], PRESETS) == Config()
    dr = parse_config(Config, ["--preset=deepresearcher"], PRESETS)
    paper = (dr.batch_size, dr.group_size, dr.lr, dr.kl_coef, dr.entropy_coef, dr.max_turns, dr.max_new_tokens)
    assert paper == (256, 16, 1e-6, 0.001, 0.001, 10, 2000)
    assert dr.warm_start_demos == 0 and dr.group_demo is False  # our departures for small models are off
    # the earlier default, kept as a preset: its table in the README is reproduced by it
    single = parse_config(Config, ["--preset=single_hop"], PRESETS)
    assert (single.data, single.eval_data, single.max_turns, single.max_len, single.steps, single.eval_every) == (
        "data/qa_train.jsonl", "data/qa_dev.jsonl", 3, 1024, 25, 5)
    assert single.warm_start_demos == 0 and single.group_demo is False
    assert Config().warm_start_demos > 0 and Config().group_demo and Config().data == "data/qa_train_research.jsonl"
    with pytest.raises(SystemExit, match="did you mean --kl_coef"):
        parse_config(Config, ["--kl_coeff=0.1"], PRESETS)
    with pytest.raises(SystemExit, match="expects int"):
        parse_config(Config, ["--steps=1.5"], PRESETS)
    with pytest.raises(SystemExit, match="expects true or false"):
        parse_config(Config, ["--overwrite=maybe"], PRESETS)
    with pytest.raises(SystemExit, match="unknown preset"):
        parse_config(Config, ["--preset=huge"], PRESETS)

    # the parser converts to the type of a field's default: every config it reads has plain typed defaults
    import eval as ev
    from data.prepare import Config as PrepareConfig
    for cls in (Config, ev.Config, PrepareConfig):
        assert all(type(f.default) in (bool, int, float, str) for f in dataclasses.fields(cls)), cls
    with pytest.raises(SystemExit, match="--overwrite expects true or false"):
        parse_config(Config, ["--overwrite=maybe"], PRESETS)


# ---------------------------------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, -1.0, 1.0])
    a = group_advantages(r, 2, norm_by_std=False)
    assert torch.allclose(a, torch.tensor([0.5, -0.5, 0.0, 0.0, -1.0, 1.0]))
    s = group_advantages(r, 2, norm_by_std=True)
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert torch.allclose(s[:2], torch.tensor([0.5, -0.5]) / (std + 1e-6))
    assert torch.equal(s[2:4], torch.zeros(2))  # zero variance: zero advantage, not NaN
    assert zero_variance_groups(r, 2).tolist() == [False, True, False]


def test_group_advantages_singleton_group_is_the_reward():
    """verl's compute_grpo_outcome_advantage: a group of one has mean 0 and std 1, so A = r (not 0)."""
    r = torch.tensor([0.5, -1.0, 0.0])
    assert torch.allclose(group_advantages(r, 1, norm_by_std=True), r / (1 + 1e-6))
    assert torch.equal(group_advantages(r, 1, norm_by_std=False), r)


def test_group_advantages_validity_mask():
    """Invalid rows (e.g. the web failed) get 0 and leave their group's mean/std; a group left with < 2 is 0."""
    r = torch.tensor([1.0, 0.0, 0.3, 0.2, 0.9, -1.0, 0.5, 0.5, 0.5])
    valid = torch.tensor([True, True, False, True, False, False, True, True, True])
    before = (r.clone(), valid.clone())
    for norm in (True, False):
        a = group_advantages(r, 3, norm, valid=valid)
        assert torch.allclose(a[:2], group_advantages(r[:2], 2, norm)) and a[2] == 0  # scored over the rest
        assert torch.equal(a[3:6], torch.zeros(3))  # one valid row left: the group is skipped
        assert torch.equal(a[6:], group_advantages(r[6:], 3, norm))
    assert torch.equal(group_advantages(r, 3, valid=torch.ones(9, dtype=torch.bool)), group_advantages(r, 3))
    assert torch.equal(r, before[0]) and torch.equal(valid, before[1])
    zv = zero_variance_groups(r, 3, valid=valid)
    assert zv.tolist() == [False, True, True]  # only the valid rows are compared (one row: no signal)


def test_seq_mean_ignores_sequences_without_sampled_tokens():
    """verl's seq-mean modes divide by the sequences that have tokens; an all-masked row must not dilute the mean."""
    logp, old, mask, adv = _example()
    logp3 = torch.cat([logp, logp[:1]])
    old3 = torch.cat([old, old[:1]])
    mask3 = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)])
    adv3 = torch.cat([adv, torch.tensor([5.0])])
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        two, _ = policy_loss(logp, old, adv, mask, loss_agg=agg, agg_const=4.0)
        three, _ = policy_loss(logp3, old3, adv3, mask3, loss_agg=agg, agg_const=4.0)
        assert three.item() == pytest.approx(two.item(), rel=1e-6), agg


def test_update_global_seq_count_skips_empty_sequences(tiny_qwen2):
    """The mini-batch-wide sequence count (the global denominator) counts only sequences with sampled tokens."""
    from model import Transformer

    g = torch.Generator().manual_seed(3)
    samples = [Sample(torch.randint(0, 49152, (n,), generator=g).tolist(), [0] * 3 + [1] * (n - 3), a, group)
               for group, (n, a) in enumerate(((8, 1.0), (10, -0.5)))]
    empty = Sample(torch.randint(0, 49152, (7,), generator=g).tolist(), [0] * 7, 2.0, 2)
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        params = []
        for batch in (samples, samples + [empty]):
            model = Transformer.from_pretrained(tiny_qwen2)
            cfg = Config(micro_tokens=16, grad_clip=0.0, lr=0.5, loss_agg=agg, loss_agg_const=8.0, cpu_bf16="false")
            train.update(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, cfg, train.Dist(), step=0)
            params.append(parameters_to_vector(model.parameters()).detach())
        assert torch.allclose(params[0], params[1], atol=1e-7), agg


def test_unsharded_restores_each_modules_reshard_setting(tiny_qwen2):
    """FSDP2 keeps the root's parameters after forward (reshard_after_forward False) and reshards the blocks;
    leaving `unsharded` must restore exactly that, not set True everywhere. 1-rank gloo group, in process."""
    import socket

    import torch.distributed as dist

    from model import ModelConfig, Transformer

    def reshards(m):  # FSDP2 keeps post_forward_mesh_info None exactly when a group does not reshard after forward
        return m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_json(tiny_qwen2))
        train.apply_fsdp(model, train.Dist())
        x = torch.randint(0, 100, (1, 5))
        model(x)  # FSDP2's lazy init: the root decides not to reshard after forward
        mods = train.fsdp_modules(model)
        before = [reshards(m) for m in mods]
        assert before == [m is not model for m in mods] and len(mods) == 3  # blocks reshard, the root does not
        with train.unsharded(model):
            assert not any(reshards(m) for m in train.fsdp_modules(model))
            model(x)
        assert [reshards(m) for m in train.fsdp_modules(model)] == before
    finally:
        dist.destroy_process_group()


def test_deepresearcher_presets_keep_the_references_rules():
    """Both deepresearcher presets: a malformed call ends the trajectory (-1), every turn opens with <think>, no
    worked example (the default run's), and one web_search observation shows all 3 queries x 10 results at the
    snippet length, uncut, within obs_chars."""
    import eval as ev
    from browse import BrowseConfig, Browser, SearchResult

    class TenResults:  # Google titles run to ~70 characters and result URLs rarely beyond 100
        def search(self, queries):
            return [[SearchResult("T" * 70, f"https://example.org/{q[:3]}{i}" + "u" * 80, "s" * 300, i + 1)
                     for i in range(10)] for q in queries]

        def close(self):
            pass

    cfgs = [parse_config(Config, ["--preset=deepresearcher"], PRESETS),
            ev.parse_config(ev.Config, ["--preset=deepresearcher"], ev.PRESETS)]
    for cfg in cfgs:
        assert cfg.on_bad_call == "end" and cfg.turn_prefix_every == "<think>" and cfg.turn_prefixes == ""
        assert cfg.example == "" and cfg.prompt == "reference"  # the default run's demonstration is ours, not theirs
        assert cfg.protocol == "dr" and cfg.top_k == 10
        browser = Browser(train.subconfig(BrowseConfig, cfg, reader="extract"), backend=TenResults())
        try:  # the observation the policy sees, through the session it calls
            obs = browser.session("q").web_search([f"{i}" + "q" * 39 for i in range(3)])
        finally:
            browser.close()
        assert "..." not in obs and obs.count("https://example.org/") == 30 and len(obs) <= cfg.obs_chars
        assert cfg.snippet_chars >= 300
        # ~4 characters per token: 3 such observations still fit the context after the prompt and 4 turns
        assert 3 * cfg.obs_chars / 4 + 4 * cfg.max_new_tokens + 1000 < cfg.max_len


# ---------------------------------------------------------------------------------------------------- the loss

def _example():
    # two sequences, 3 positions each; the second sequence's last position is masked (an observation token)
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.6, 0.1]]))
    old = torch.log(torch.tensor([[0.4, 0.4, 0.4], [0.3, 0.4, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    return logp, old, mask, adv


def _per_token_by_hand(clip_low, clip_high):
    # ratios: seq0 = 1.25, 1.0, 0.5 ; seq1 = 1.0, 1.5, (masked)
    # seq0, A=+1: max(-r, -clip(r)) -> r=1.25 clip to 1.2 -> max(-1.25, -1.2) = -1.2 ; r=1 -> -1 ; r=.5 -> clip .8:
    #   max(-0.5, -0.8) = -0.5
    # seq1, A=-2: r=1 -> 2 ; r=1.5 -> max(3, 2*1.2=2.4) = 3
    hi, lo = 1 + clip_high, 1 - clip_low
    s0 = [max(-1.25, -min(max(1.25, lo), hi)), -1.0, max(-0.5, -min(max(0.5, lo), hi))]
    s1 = [2.0, max(3.0, 2 * min(max(1.5, lo), hi))]
    return s0, s1


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_by_hand_each_aggregation(agg):
    logp, old, mask, adv = _example()
    s0, s1 = _per_token_by_hand(0.2, 0.2)
    assert s0 == [-1.2, -1.0, -0.5] and s1 == [2.0, 3.0]
    want = {"token-mean": (sum(s0) + sum(s1)) / 5,
            "seq-mean-token-mean": (sum(s0) / 3 + sum(s1) / 2) / 2,
            "seq-mean-token-sum-norm": (sum(s0) / 4 + sum(s1) / 4) / 2}[agg]
    loss, st = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, loss_agg=agg, agg_const=4.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert st["clipped"].sum().item() == 1  # only seq0 position 0 (r=1.25 > 1.2 with A > 0) is clipped


def test_clip_higher_and_external_norm():
    logp, old, mask, adv = _example()
    s0, s1 = _per_token_by_hand(0.2, 0.28)
    assert s0[0] == -1.25  # 1.25 < 1.28: not clipped any more
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_agg="token-mean", norm=10.0)
    assert loss.item() == pytest.approx((sum(s0) + sum(s1)) / 10, rel=1e-5)


def test_kl_k3_and_entropy_terms_by_hand():
    logp, old, mask, adv = _example()
    ref = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.6, 0.5]]))
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    base, _ = policy_loss(logp, old, adv, mask, loss_agg="token-mean")
    loss, st = policy_loss(logp, old, adv, mask, loss_agg="token-mean", ref_logp=ref, kl_coef=0.1, entropy=ent,
                           entropy_coef=0.01)
    d = (ref - logp)[mask.bool()]
    k3 = (d.exp() - d - 1).sum() / 5
    h = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).sum() / 5
    assert loss.item() == pytest.approx(base.item() + 0.1 * k3.item() - 0.01 * h.item(), rel=1e-5)
    assert (st["kl"] >= 0).all()


def test_mask_zero_tokens_get_exactly_zero_gradient():
    logp, old, mask, adv = _example()
    logp = logp.clone().requires_grad_(True)
    old = old.clone()
    old[1, 2] = float("nan")  # whatever sits at a masked position must not leak into the value or the gradient
    ent = torch.rand(2, 3, requires_grad=True)
    ref = torch.full((2, 3), float("inf"))
    ref[0] = logp.detach()[0]
    ref[1, :2] = logp.detach()[1, :2]
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        logp.grad, ent.grad = None, None
        loss, _ = policy_loss(logp, old, adv, mask, loss_agg=agg, ref_logp=ref, kl_coef=0.1, entropy=ent,
                              entropy_coef=0.01)
        assert torch.isfinite(loss)
        loss.backward()
        assert logp.grad[1, 2].item() == 0.0 and ent.grad[1, 2].item() == 0.0
        assert (logp.grad[mask.bool()] != 0).sum() == 4  # all sampled tokens but the clipped one


def test_token_logprobs_matches_full_softmax_and_masks(tiny_qwen2):
    from model import Transformer

    model = Transformer.from_pretrained(tiny_qwen2)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 49152, (2, 9), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 1], [0, 1, 1, 0, 1, 0, 0, 0, 0]])
    lp, ent = token_logprobs(model, tok, mask, temperature=0.7, with_entropy=True)
    full = torch.log_softmax(model(tok[:, :-1]).float() / 0.7, -1)  # (B, T-1, V)
    want = full.gather(2, tok[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    assert torch.allclose(lp, want, atol=1e-5)
    want_ent = -(full.exp() * full).sum(-1) * mask[:, 1:]
    assert torch.allclose(ent, want_ent, atol=1e-4)
    assert (lp[mask[:, 1:] == 0] == 0).all()
    # gradient of a loss on the log-probs reaches no embedding row of a token that is only ever a masked target
    model.zero_grad()
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_helpers_do_not_mutate_inputs(tiny_qwen2):
    from model import Transformer

    logp, old, mask, adv = _example()
    ent, ref = torch.rand(2, 3), torch.rand(2, 3).log()
    before = [t.clone() for t in (logp, old, mask, adv, ent, ref)]
    policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.1, clip_high=0.3)
    group_advantages(adv, 2)
    zero_variance_groups(adv, 2)
    for a, b in zip(before, (logp, old, mask, adv, ent, ref)):
        assert torch.equal(a, b)
    model = Transformer.from_pretrained(tiny_qwen2)
    tok = torch.randint(0, 100, (2, 6))
    m = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    tc, mc = tok.clone(), m.clone()
    token_logprobs(model, tok, m)
    assert torch.equal(tok, tc) and torch.equal(m, mc)
    samples = [Sample([1, 2, 3, 4], [0, 1, 1, 1], 0.5, 0), Sample([5, 6, 7], [0, 0, 1], -0.5, 1)]
    snap = [dataclasses.replace(s, tokens=list(s.tokens), loss_mask=list(s.loss_mask)) for s in samples]
    cfg = Config(micro_tokens=4)
    out = train.fill_logprobs(model, samples, cfg, train.Dist(), "old_logp")
    assert samples == snap and out[0].old_logp is not None and samples[0].old_logp is None


def _grouped_samples(seed: int, advantages: list[float], prompt: int = 4, group: int = 3) -> list[Sample]:
    """Samples in groups of `group` that share a prompt of `prompt` tokens (loss mask 0) then differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, a in enumerate(advantages):
        if i % group == 0:
            head = torch.randint(0, 49152, (prompt,), generator=g).tolist()
        n = 3 + 2 * i
        mask = [0] * prompt + [int(x) for x in torch.randint(0, 2, (n,), generator=g)]
        mask[prompt] = mask[-1] = 1
        out.append(Sample(head + torch.randint(0, 49152, (n,), generator=g).tolist(), mask, a, i // group))
    return out


def test_micro_batches_respect_budget():
    samples = _grouped_samples(0, [1.0] * 7)  # groups {0,1,2} {3,4,5} {6}; lengths 7, 9, ..., 19
    before = [dataclasses.replace(s) for s in samples]
    for share, budget in ((False, 20), (True, 20), (True, 40), (True, 10_000)):
        batches = micro_batches(samples, budget, share)
        assert sorted(i for rows, _ in batches for i in rows) == list(range(7))
        for rows, P in batches:
            longest = max(len(samples[i].tokens) for i in rows)
            assert P + len(rows) * (longest - P) <= budget or len(rows) == 1
            assert P == (3 if share and len(rows) > 1 else 0)  # the prompt's 4 tokens but the one predicting
            assert share or P == 0
            assert len({i // 3 for i in rows}) == 1 or not share  # a shared pass holds one group
    assert len(micro_batches(samples, 10_000, True)) == 3 and len(micro_batches(samples, 10_000, False)) == 1
    assert micro_batches(samples[:1], 2) == [([0], 0)]
    assert samples == before


def test_update_does_not_depend_on_micro_batching(tiny_qwen2):
    """Same gradient step whatever the token budget: the denominators are mini-batch-wide."""
    from model import Transformer

    samples = _grouped_samples(1, [-2.0, -1.0, 0.5, 1.0, 2.0, 1.5])
    for agg in ("token-mean", "seq-mean-token-mean"):
        params = []
        for budget, share in ((10_000, False), (20, False), (10_000, True), (30, True)):
            model = Transformer.from_pretrained(tiny_qwen2)
            opt = torch.optim.SGD(model.parameters(), lr=1.0)
            cfg = Config(micro_tokens=budget, loss_agg=agg, grad_clip=0.0, lr=1.0, share_prefix=share, cpu_bf16="false")
            m = train.update(model, opt, samples, cfg, train.Dist(), step=0)
            assert m["finite"]
            params.append(parameters_to_vector(model.parameters()).detach())
        for p in params[1:]:
            assert torch.allclose(params[0], p, atol=1e-6, rtol=1e-4)


def test_update_equals_one_step_on_the_full_batch_loss(tiny_qwen2):
    """train.update (micro-batches, zero-advantage rows skipped but counted) == SGD on the plain batch loss."""
    from model import Transformer

    samples = _grouped_samples(2, [1.0, 0.0, -0.5, 0.3, 0.0, -0.8])  # two groups of 3, each with 2 rows to learn
    ours = Transformer.from_pretrained(tiny_qwen2)
    cfg = Config(micro_tokens=40, grad_clip=0.0, lr=0.5, temperature=1.0, cpu_bf16="false")
    train.update(ours, torch.optim.SGD(ours.parameters(), lr=0.5), samples, cfg, train.Dist(), step=0)
    ref = Transformer.from_pretrained(tiny_qwen2)
    batch = train.collate(samples, "cpu")
    logp, _ = token_logprobs(ref, batch.tokens, batch.mask)
    loss, _ = policy_loss(logp, logp.detach(), batch.advantages, batch.mask[:, 1:], loss_agg="token-mean")
    loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    for (k, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), k


def test_dry_run_deepresearcher_estimate():
    cfg = parse_config(Config, ["--preset=deepresearcher", "--world_size=8"], PRESETS)
    printed = []
    m = memory_per_gpu(cfg, 8, say=printed.append)
    assert any("rows at 32768 tokens" in line for line in printed)
    gib = {k: v / 2**30 for k, v in m.items()}
    states = gib["adam state (2 x fp32, sharded)"] + gib["params (fp32, sharded)"] + gib["grads (fp32, sharded)"]
    assert 13 < states < 16  # 7.6 B params x 16 bytes / 8
    assert gib["rollout: unsharded bf16 weights"] == pytest.approx(7.6e9 * 2 / 2**30, rel=0.05)
    assert gib["reference model (bf16, sharded)"] > 0
    assert memory_per_gpu(dataclasses.replace(cfg, kl_coef=0.0), 8, say=None)["reference model (bf16, sharded)"] == 0


# ---------------------------------------------------------------------------------------------------- the loop

@dataclass
class FakeTurn:
    text: str
    tool: str | None = None
    args: dict | None = None
    observation: str | None = None
    error: str | None = None
    n_tokens: int = 0
    gen_s: float = 0.0
    tool_s: float = 0.0


@dataclass
class FakeTrajectory:
    question: str
    group: int
    tokens: list
    loss_mask: list
    logprobs: list
    prompt_len: int
    turns: list
    answer: str | None
    end_reason: str
    stats: dict = field(default_factory=dict)


@dataclass
class FakeRolloutConfig:
    max_turns: int = 2
    max_new_tokens: int = 8
    max_len: int = 1024
    temperature: float = 1.0
    date: str | None = None
    protocol: str = "tags"


@dataclass
class FakeBrowseConfig:
    backend: str = "local"


class FakeBrowser:
    def __init__(self, cfg):
        self.cfg = cfg

    def close(self):
        pass


def gold_answers(questions: list[str]) -> list[list[str]]:
    """The gold answers of questions from the default and the tiny preset's train and dev files (rollout() gets no
    gold: train.py scores)."""
    root = Path(train.__file__).resolve().parent
    paths = (Config.data, Config.eval_data, PRESETS["tiny"]["data"], PRESETS["tiny"]["eval_data"])
    golds = {row["question"]: row["answers"] for path in paths for row in train.load_questions(str(root / path))}
    return [golds[question] for question in questions]


@torch.no_grad()
def fake_rollout(model, tokenizer, questions, browser, cfg, group_size=1, seed=0, engine=None):
    """Sample from the real model (so the update sees real logprobs), with a forced 3-token 'observation' (mask 0)
    in the middle; the answer is right when the first sampled token id is even, so rewards vary."""
    golds = gold_answers(questions)
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    out = []
    n = max(cfg.max_new_tokens // 2, 1)
    for qi, (q, gold) in enumerate(zip(questions, golds)):
        prompt = tokenizer.encode(q)[:12]
        for _ in range(group_size):
            toks, mask = list(prompt), [0] * len(prompt)
            lps = [0.0] * len(prompt)
            for part in range(2):
                for _ in range(n):
                    logits = model(torch.tensor([toks], device=dev), logits_at=torch.tensor([[len(toks) - 1]],
                                                                                              device=dev))
                    p = torch.softmax(logits[0, -1].float().cpu(), -1)
                    toks.append(int(torch.multinomial(p, 1, generator=g)))
                    mask.append(1)
                    lps.append(float(torch.log(p[toks[-1]])))
                if part == 0:
                    toks += [11, 12, 13]  # the "observation": forced, never trained on
                    mask += [0, 0, 0]
                    lps += [0.0, 0.0, 0.0]
            first = toks[len(prompt)]
            ans = gold[0] if first % 2 == 0 else "no idea"
            text = f"<think>t</think><answer>{ans}</answer>" if first % 3 else "<think>oops"
            out.append(FakeTrajectory(q, qi, toks, mask, lps, len(prompt), [FakeTurn(text)], ans,
                                      "answer", {"n_search": 1, "n_browse": 0}))
    return out


def no_engine(model, tokenizer, cfg, seed=0):
    """The fake agent needs no engine (rollout.make_engine's stand-in)."""
    return None


def fake_scripted_rollout(plan, tokenizer, examples, browser, cfg):
    """The fake web has no search: a scripted agent (the first-title shortcut beside the dev F1) answers nothing."""
    return [FakeTrajectory(ex["question"], index, [], [], [], 0, [FakeTurn("<answer>nothing</answer>")], "nothing",
                           "answer", {"n_search": 0, "n_browse": 0}) for index, ex in enumerate(examples)]


def fake_agent():
    return fake_rollout, FakeRolloutConfig, FakeBrowser, FakeBrowseConfig, no_engine, fake_scripted_rollout


# train.py's (and eval.py's) agent seams; a part list of 4 keeps the real make_engine (a real rollout) and a list of 5
# the real scripted_rollout
AGENT_NAMES = ("rollout", "RolloutConfig", "Browser", "BrowseConfig", "make_engine", "scripted_rollout")


def use_agent(monkeypatch, parts, module=train):
    """Swap the agent's module-level names in train.py (or eval.py) for `parts()`: fakes, stubs or the real ones."""
    for name, value in zip(AGENT_NAMES, parts()):
        monkeypatch.setattr(module, name, value)


def test_tool_failures_are_masked_from_the_loss(tmp_path, tiny_qwen2, monkeypatch):
    """A trajectory that ended because the web failed gets no loss weight and leaves its group's mean/std; the
    counts per end reason reach metrics.jsonl."""
    from reward import reward

    seen = {}

    def flaky_rollout(*a, **k):
        trajs = fake_rollout(*a, **k)
        trajs[1] = dataclasses.replace(trajs[1], end_reason="tool_failure")  # group 0, second row
        seen["trajs"] = trajs
        return trajs

    def spy_update(model, optimizer, samples, cfg, d, step, ref_model=None, show_progress=True):
        seen["samples"] = samples
        return real_update(model, optimizer, samples, cfg, d, step, ref_model, show_progress)

    real_update = train.update
    use_agent(monkeypatch, lambda: (flaky_rollout, FakeRolloutConfig, FakeBrowser, FakeBrowseConfig, no_engine))
    monkeypatch.setattr(train, "update", spy_update)
    args = _cfg(tmp_path, tiny_qwen2, steps=1, group_size=3, batch_size=2, eval_every=0)  # no dev rollout after it
    m = train.main(parse_config(Config, args, PRESETS))
    trajs, samples = seen["trajs"], seen["samples"]
    assert len(trajs) == 6 and len(samples) == 5 and samples[1].tokens == trajs[2].tokens  # row 1 is gone
    golds = gold_answers([tr.question for tr in trajs])
    r = torch.tensor([reward([t.text for t in tr.turns], gold).score for tr, gold in zip(trajs, golds)])
    want = torch.cat([group_advantages(r[[0, 2]], 2), group_advantages(r[3:], 3)])
    assert torch.allclose(torch.tensor([s.advantage for s in samples]), want)
    assert m["end_tool_failure"] == 1 and m["end_answer"] == 5 and m["masked_tool_failures"] == 1
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["end_tool_failure"] == 1 and line["skipped_groups"] == 0


def _cfg(out, model, **kw):
    base = dict(preset="tiny", model=str(model), out_dir=str(out), max_new_tokens=8, batch_size=4, group_size=2,
                save_every=2, lr=1e-2, micro_tokens=64)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def _hf_weights(step_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(step_dir) / "hf" / "model.safetensors"))


def test_loop_resume_exact_and_hf_export(tmp_path, tiny_qwen2, monkeypatch):
    """3 uninterrupted steps == 2 steps + resume for 1; the HF export loads in transformers with the same logits.
    fp32 (`cpu_bf16="false"`), so that the training forward reproduces the sampler's log-probs; the torchrun test below
    checks resume under the default bf16 updates."""
    from transformers import AutoModelForCausalLM

    from model import Transformer

    use_agent(monkeypatch, fake_agent)
    a, b = tmp_path / "a", tmp_path / "b"
    m = train.main(parse_config(Config, _cfg(a, tiny_qwen2, steps=3, cpu_bf16="false"), PRESETS))
    assert math.isfinite(m["loss"]) and 0 <= m["format_error"] <= 1
    train.main(parse_config(Config, _cfg(b, tiny_qwen2, steps=2, cpu_bf16="false"), PRESETS))
    assert (b / "ckpt" / "step_000002" / "state.json").exists()
    w0 = _hf_weights(b / "ckpt" / "step_000002")
    train.main(parse_config(Config, _cfg(b, tiny_qwen2, steps=3, resume=True, cpu_bf16="false"), PRESETS))
    wa, wb = _hf_weights(a / "ckpt" / "step_000003"), _hf_weights(b / "ckpt" / "step_000003")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # training did move the weights
    # outputs of a run
    lines = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for k in ("reward", "f1", "format_error", "zero_var_groups", "entropy", "kl", "clipfrac", "grad_norm",
              "time_rollout", "time_learn", "tok_per_s", "turns", "search_calls", "response_len"):
        assert k in lines[0], k
    assert lines[0]["logp_diff"] < 1e-4  # the training forward reproduces the sampler's log-probs
    assert (a / "reward.png").stat().st_size > 0 and (a / "config.json").exists()
    dump = [json.loads(x) for x in (a / "rollouts" / "step_000001.jsonl").read_text().splitlines()]
    assert dump and "text" in dump[0] and dump[0]["turns"]
    assert sorted(p.name for p in (a / "ckpt").iterdir()) == ["step_000003"]  # keep_last=1
    # the HF export: transformers reads it; its logits equal those of the trained weights restored from DCP
    step = a / "ckpt" / "step_000003"
    ours = Transformer.from_pretrained(tiny_qwen2)
    opt = torch.optim.AdamW(ours.parameters())
    train.load_checkpoint(step, ours, opt, train.Dist())
    hf = AutoModelForCausalLM.from_pretrained(step / "hf", dtype=torch.float32)
    x = torch.randint(0, 49152, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4)
    assert (step / "hf" / "tokenizer_config.json").exists()


def test_nan_stops_cleanly(tmp_path, tiny_qwen2, monkeypatch):
    use_agent(monkeypatch, fake_agent)
    real = train.policy_loss

    def nan_loss(*a, **k):
        loss, st = real(*a, **k)
        return loss * float("nan"), st

    monkeypatch.setattr(train, "policy_loss", nan_loss)
    m = train.main(parse_config(Config, _cfg(tmp_path, tiny_qwen2, steps=3), PRESETS))
    assert not math.isfinite(m["loss"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # stopped after the first bad step
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("step_*"))


class StubSession:
    def web_search(self, queries):
        return "1. Paris\nhttps://example.org/paris\nParis is the capital of France."

    def browse_webpage(self, urls):
        return "Paris is the capital and largest city of France."


class StubBrowser:
    """Answers every search and browse the same way: the real agent loop without a web."""

    def __init__(self, cfg):
        pass

    def session(self, question):
        return StubSession()

    def close(self):
        pass


def real_rollout_stub_browser():
    from rollout import make_engine

    rollout, RolloutConfig, _, _ = real_agent_parts()
    # the stub web has no ranked results for the first-title shortcut: its scripted agent is the fake one
    return rollout, RolloutConfig, StubBrowser, FakeBrowseConfig, make_engine, fake_scripted_rollout


def real_agent_parts():
    from rollout import RolloutConfig, rollout
    return rollout, RolloutConfig, None, None


LAUNCH = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {root!r})
    import train, test_train
    parts = {{"fake": test_train.fake_agent, "stub_browser": test_train.real_rollout_stub_browser}}.get({agent!r})
    for name, value in zip(test_train.AGENT_NAMES, parts() if parts else ()):
        setattr(train, name, value)
    train.main(train.parse_config(train.Config, sys.argv[1:], train.PRESETS))
""")


def _torchrun(tmp_path, args, agent="fake"):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH.format(tests=str(HERE), root=str(HERE.parent), agent=agent))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


@pytest.mark.slow
def test_torchrun_two_gloo_processes_resume_exact(tmp_path, tiny_qwen2):
    """FSDP2 on 2 gloo ranks: 2 steps, resume for a 3rd == 3 uninterrupted steps, bit for bit (with the default bf16
    updates: autocast's weight-cast cache, which made them differ, is off)."""
    a, b = tmp_path / "a", tmp_path / "b"
    p = _torchrun(tmp_path, _cfg(a, tiny_qwen2, steps=3))
    assert "step 3 |" in p.stdout + p.stderr
    _torchrun(tmp_path, _cfg(b, tiny_qwen2, steps=2))
    _torchrun(tmp_path, _cfg(b, tiny_qwen2, steps=3, resume=True))
    wa, wb = _hf_weights(a / "ckpt" / "step_000003"), _hf_weights(b / "ckpt" / "step_000003")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(list((a / "ckpt" / "step_000003" / "dcp").glob("*.distcp"))) == 2  # one shard file per rank


@pytest.mark.slow
def test_tiny_preset_real_agent(tmp_path):
    """`torchrun --nproc_per_node=2 train.py --preset=tiny --steps=2` with the real agent and local search."""
    p = _torchrun(tmp_path, ["--preset=tiny", "--steps=2", f"--out_dir={tmp_path / 'run'}"], agent="real")
    assert "step 2 |" in p.stdout + p.stderr
    assert (tmp_path / "run" / "ckpt" / "step_000002" / "hf" / "config.json").exists()


def test_kl_entropy_minibatches_filter_single_process(tmp_path, tiny_qwen2, monkeypatch):
    """The reference model (kl_coef > 0), entropy bonus, 2 mini-batches x 2 epochs (logp_old recomputed) and
    zero-variance filtering all run; the reference model is not built when kl_coef == 0."""
    use_agent(monkeypatch, fake_agent)
    built = []
    real_build = train.build_model

    def spy(path, cfg, d, trainable=True):
        built.append(trainable)
        return real_build(path, cfg, d, trainable)

    monkeypatch.setattr(train, "build_model", spy)
    args = _cfg(tmp_path / "a", tiny_qwen2, steps=2, kl_coef=0.1, entropy_coef=0.01, n_minibatches=2, ppo_epochs=2,
                filter_groups=True, clip_high=0.28, loss_agg="seq-mean-token-mean")
    m = train.main(parse_config(Config, args, PRESETS))
    assert built == [True, False] and math.isfinite(m["loss"]) and m["kl"] >= 0
    built.clear()
    train.main(parse_config(Config, _cfg(tmp_path / "b", tiny_qwen2, steps=1), PRESETS))
    assert built == [True]


@pytest.mark.slow
def test_torchrun_kl_minibatches(tmp_path, tiny_qwen2):
    """FSDP2 with a sharded frozen reference model and several optimizer steps per batch, on 2 gloo ranks."""
    args = _cfg(tmp_path / "run", tiny_qwen2, steps=2, kl_coef=0.1, entropy_coef=0.01, n_minibatches=2,
                filter_groups=True, loss_agg="seq-mean-token-sum-norm")
    p = _torchrun(tmp_path, args)
    assert "step 2 |" in p.stdout + p.stderr
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["kl"]) for x in m)


@pytest.mark.slow
def test_torchrun_real_rollout_resume_exact(tmp_path, tiny_qwen2):
    """The real engine and agent loop (stub web) under FSDP2 on 2 gloo ranks: 2 steps + resume == 3 steps."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(max_new_tokens=16, micro_tokens=2048)
    p = _torchrun(tmp_path, _cfg(a, tiny_qwen2, steps=3, **kw), agent="stub_browser")
    assert "step 3 |" in p.stdout + p.stderr
    _torchrun(tmp_path, _cfg(b, tiny_qwen2, steps=2, **kw), agent="stub_browser")
    _torchrun(tmp_path, _cfg(b, tiny_qwen2, steps=3, resume=True, **kw), agent="stub_browser")
    wa, wb = _hf_weights(a / "ckpt" / "step_000003"), _hf_weights(b / "ckpt" / "step_000003")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    m = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["logp_diff"] < 1e-3  # the engine's sampling log-probs agree with the training forward


def test_entropy_collapse_stops_with_a_checkpoint(tmp_path, tiny_qwen2, monkeypatch):
    use_agent(monkeypatch, fake_agent)
    train.main(parse_config(Config, _cfg(tmp_path, tiny_qwen2, steps=6, save_every=100, min_entropy=1e9),
                            PRESETS))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # 3 low-entropy steps, then stop
    assert train.latest_checkpoint(Config(out_dir=str(tmp_path))).name == "step_000003"


@pytest.mark.slow
def test_default_config_one_step(tmp_path):
    """`python train.py --steps=1` on the default config (a shorter warm start: 2 bridge and 2 read demonstrations,
    two passes): SmolLM2-135M (offline from the packaged GGUF), the research QA mix, local search and LocalWeb, the
    scaffold; the warm start and its export, one real GRPO step with a demonstration in each group that has one, the
    behaviour counts, a checkpoint, the curve."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", "--steps=1", "--batch_size=2", f"--out_dir={out}",
                        "--eval_n=8", "--warm_start_demos=4", "--warm_start_batch=2", "--warm_start_epochs=2",
                        "--warm_start_templates=bridge:2,read", "--date=2026-11-24"],
                       cwd=Path(train.__file__).parent, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    m = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(m) == 1 and m[0]["step"] == 1 and -1.0 <= m[0]["reward"] <= 1.0 and m[0]["search_calls"] > 0
    assert 0.0 <= m[0]["dev_f1"] <= 1.0  # the learning curve's point at the last step (and one at step 0 in the plot)
    assert 1 <= m[0]["group_demos"] <= 2 and 0.0 <= m[0]["searched_twice"] <= 1.0
    assert 0.0 <= m[0]["dev_searched_twice"] <= 1.0 and "dev_f1/bridge" in m[0]
    state = json.loads(max((out / "ckpt").glob("step_*/state.json")).read_text())
    warm = state["history"][0]
    assert warm["warm_start_demos"] == 4 and "dev_f1_warm_start" in warm
    assert "dev_f1" not in warm and "dev_f1_first_title" in warm  # no dev point of the base model (eval.py has it)
    assert warm["warm_start_steps"] == 4  # 2 passes over 4 demonstrations, 2 per step
    # the warm start trained the top 20 of the 30 blocks only (warm_start_frozen_layers=10); GRPO then trains them all
    from safetensors.torch import load_file

    from data.models import resolve_model
    base = load_file(str(Path(resolve_model(Config.model)) / "model.safetensors"))
    warmed = _hf_weights(out / "warm_start")
    grpo = _hf_weights(out / "ckpt" / "step_000001")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.9.self_attn.q_proj.weight"):
        assert torch.equal(warmed[name], base[name]) and not torch.equal(grpo[name], warmed[name])
    assert not torch.equal(warmed["model.layers.10.self_attn.q_proj.weight"],
                           base["model.layers.10.self_attn.q_proj.weight"])
    assert (out / "reward.png").stat().st_size > 1000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["data"] == "data/qa_train_research.jsonl"
    assert (out / "ckpt" / "step_000001" / "hf" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------- issue 22: resume

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_qwen2):
    """A 1-process run of 2 steps that kept both checkpoints (fake agent); tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("two_checkpoints") / "run"
    with pytest.MonkeyPatch.context() as patch:
        use_agent(patch, fake_agent)
        train.main(parse_config(Config, _cfg(out, tiny_qwen2, steps=2, save_every=1, keep_last=2, eval_every=0),
                                PRESETS))
    return out


def _copy_run(run, tmp_path, name="run"):
    import shutil

    return Path(shutil.copytree(run, tmp_path / name))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_checks_every_ranks_rng_file(two_checkpoints, tmp_path):
    """A checkpoint saved by 2 ranks whose rank-1 RNG file is damaged is not resumed from by any rank (rank 0 used to
    check only its own file and resume the newest step while rank 1 resumed the one before)."""
    out = _copy_run(two_checkpoints, tmp_path)
    for step in (1, 2):  # make both folders look like 2-rank saves
        folder = out / "ckpt" / f"step_{step:06d}"
        (folder / "rng_rank1.pt").write_bytes((folder / "rng_rank0.pt").read_bytes())
        state = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    damaged = out / "ckpt" / "step_000002" / "rng_rank1.pt"
    _truncate(damaged)
    said = []
    cfg = Config(out_dir=str(out), resume="True")
    assert train.find_resume_checkpoint(cfg, say=said.append) == out / "ckpt" / "step_000001"
    assert str(damaged) in said[0] and "step_000001" in said[1]
    damaged.unlink()  # a missing file of a rank that saved is damage too
    assert train.find_resume_checkpoint(cfg, say=said.append) == out / "ckpt" / "step_000001"


def _agree_worker(rank, views, port):
    """One of two gloo ranks, each with its own view of out_dir: writes the folder it would resume from."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = Config(out_dir=views[rank], resume="True")
        chosen = train.find_resume_checkpoint(cfg, say=lambda *args: None, proc=train.Dist(rank=rank, world=2))
        (Path(views[rank]) / "chosen.txt").write_text(chosen.name)
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_the_resume_step(two_checkpoints, tmp_path):
    """Two gloo ranks that see different damage (rank 1's copy of the newest step has a short shard, as on a disk
    that is not shared) resume the same step, the newest that both find intact."""
    import socket

    import torch.multiprocessing as mp

    views = [_copy_run(two_checkpoints, tmp_path, f"rank{rank}") for rank in (0, 1)]
    _truncate(next((views[1] / "ckpt" / "step_000002" / "dcp").glob("*.distcp")))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_agree_worker, args=([str(view) for view in views], port), nprocs=2, join=True)
    assert [(view / "chosen.txt").read_text() for view in views] == ["step_000001", "step_000001"]


def test_resume_skips_a_torn_metrics_line(two_checkpoints, tmp_path, tiny_qwen2):
    """A disk-full stop can leave half a line at the end of metrics.jsonl: the resume drops it and goes on."""
    from model import Transformer

    out = _copy_run(two_checkpoints, tmp_path)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 3, "reward": 0.')
    model = Transformer.from_pretrained(tiny_qwen2)
    cfg = Config(out_dir=str(out), resume="True")
    start, history = train.start_state(cfg, train.Dist(), model, torch.optim.AdamW(model.parameters()),
                                       out / "ckpt" / "step_000002")
    assert start == 2 and [entry["step"] for entry in history] == [1, 2]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------------------------------------- issue 22: metrics

def _scored_batch(end_reasons, answers, group_size=2):
    """build_samples over fake trajectories with the given end reasons and answers (gold "Paris")."""
    trajs = [FakeTrajectory("q", i // group_size, [1, 2, 3, 4], [0, 0, 1, 1], [0.0] * 4, 2,
                            [FakeTurn(f"<think>t</think><answer>{answer}</answer>")], answer, end_reason,
                            {"n_search": 1, "n_browse": 0})
             for i, (end_reason, answer) in enumerate(zip(end_reasons, answers))]
    cfg = Config(group_size=group_size)
    golds = [["Paris"]] * (len(trajs) // group_size)
    return train.build_samples(trajs, golds, cfg), cfg


UPDATE_STATS = dict(entropy=None, kl=None, clipfrac=None, loss=0.0, grad_norm=0.0, logp_diff=None, train_tokens=0.0)


def test_all_masked_step_logs_missing_not_zero(tmp_path):
    """Every trajectory ended by the web: reward, f1, em and format_error are missing (None), not a fake 0.0, and
    reward.png draws a gap there."""
    batch, cfg = _scored_batch(["tool_failure"] * 4, ["Paris", "Lyon", "Paris", "Paris"])
    metrics = train.step_metrics(batch, UPDATE_STATS, {"time_rollout": 1.0, "time_learn": 1.0}, cfg, train.Dist(), 0)
    for key in ("reward", "reward_std", "f1", "em", "format_error", "zero_var_groups"):
        assert metrics[key] is None, key
    assert metrics["masked_tool_failures"] == 4 and metrics["skipped_groups"] == 2
    history = [{"step": 1, "reward": 0.5, "f1": 0.5, "format_error": 0.0}, {"step": 2, **metrics}]
    train.plot_rewards(history, tmp_path / "reward.png")
    assert (tmp_path / "reward.png").stat().st_size > 0
    assert "reward" not in train.step_line(2, metrics)  # the step line leaves a missing value out


def test_zero_var_groups_counts_only_compared_groups():
    """A group that masking left with one trajectory is skipped, not a group "with equal rewards"."""
    batch, cfg = _scored_batch(["tool_failure", "answer", "answer", "answer", "answer", "answer"],
                               ["Paris", "Paris", "Paris", "Lyon", "Paris", "Paris"])
    assert batch.skipped.tolist() == [True, False, False]
    metrics = train.step_metrics(batch, UPDATE_STATS, {"time_rollout": 1.0, "time_learn": 1.0}, cfg, train.Dist(), 0)
    assert metrics["zero_var_groups"] == 0.5  # of the 2 compared groups, the third has equal rewards
    assert metrics["skipped_groups"] == 1 and metrics["reward"] == pytest.approx(0.8)


def test_behaviour_metrics_per_kind_and_bridge():
    """What the agent did, by hand: a bridge question (one trajectory searched its bridge entity second, one answered
    the first title) and a read question (one search); shares over trajectories, searches and F1 per kind, and the
    bridge share over bridge questions' trajectories only. A kind with no trajectory this step is missing."""
    shown = 'Search "q":\n1. Hamlet\nhttp://localweb/wiki/Hamlet\nHamlet is a play by William Shakespeare ...'

    def search(query):
        return FakeTurn(f"<search>{query}</search>", "web_search", {"query": [query]}, shown)

    def traj(group, queries, answer):
        turns = [search(query) for query in queries] + [FakeTurn(f"<answer>{answer}</answer>")]
        return FakeTrajectory("q", group, [1], [0], [0.0], 1, turns, answer, "answer", {"n_search": len(queries)})

    rows = [dict(question="Where was the author of Hamlet born?", answers=["Stratford"], template="bridge",
                 bridge="William Shakespeare"),
            dict(question="Who wrote Hamlet?", answers=["William Shakespeare"], template="read")]
    trajs = [traj(0, ["Hamlet author", "William Shakespeare birthplace"], "Stratford"), traj(0, ["Hamlet"], "Hamlet"),
             traj(1, ["Hamlet"], "William Shakespeare")]
    results = [reward([turn.text for turn in t.turns], rows[t.group]["answers"]) for t in trajs]
    metrics = train.behaviour_metrics(trajs, rows, results, ["bridge", "comparison", "read"], train.Dist())
    assert metrics["searched_twice"] == pytest.approx(1 / 3) and metrics["answer_is_title"] == pytest.approx(1 / 3)
    assert metrics["bridge_in_later_query"] == 0.5  # of the 2 bridge trajectories, not of all 3
    assert metrics["search_calls/bridge"] == 1.5 and metrics["f1/bridge"] == 0.5
    assert metrics["search_calls/read"] == 1.0 and metrics["f1/read"] == 1.0
    assert metrics["search_calls/comparison"] is None and metrics["f1/comparison"] is None
    dev = train.behaviour_metrics(trajs[2:], rows, results[2:], ["read"], train.Dist(), prefix="dev_")
    assert dev["dev_bridge_in_later_query"] is None and dev["dev_f1/read"] == 1.0
    line = train.step_line(1, {"f1": 0.5, **metrics})
    assert "searched_twice" in line and "/" not in line  # per-kind keys: metrics.jsonl and the report only


def test_update_diagnostics_cover_every_sampled_token(tiny_qwen2):
    """entropy and logp_diff are over all sampled tokens, the zero-advantage rows (whose forward/backward the update
    skips) included; kl is missing without a KL term; all of them are missing when there is no sampled token."""
    from model import Transformer

    model = Transformer.from_pretrained(tiny_qwen2)
    samples = _grouped_samples(4, [0.0, 0.0, 0.0, 1.0, -1.0, 0.5])  # group 0: advantage 0, skipped by the update
    batch = train.collate(samples, "cpu")
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch.tokens, batch.mask, with_entropy=True)
    sampled = batch.mask[:, 1:].bool()
    samples = [dataclasses.replace(sample, sampler_logp=[0.0] + (logp[i] + 0.25).tolist())
               for i, sample in enumerate(samples)]  # the sampler's log-probs, 0.25 off everywhere
    cfg = Config(micro_tokens=10_000, lr=0.1, temperature=1.0, cpu_bf16="false")
    got = train.update(model, torch.optim.SGD(model.parameters(), lr=0.1), samples, cfg, train.Dist(), step=0)
    assert got["entropy"] == pytest.approx(float(entropy[sampled].mean()), rel=1e-5)
    assert got["logp_diff"] == pytest.approx(0.25, rel=1e-4)
    assert got["clipfrac"] == 0.0 and got["kl"] is None
    assert got["train_tokens"] == float(sampled[3:].sum())  # only the rows with an advantage were trained
    empty = [Sample([1, 2, 3], [0, 0, 0], 1.0, 0)]
    got = train.update(model, torch.optim.SGD(model.parameters(), lr=0.1), empty, cfg, train.Dist(), step=0)
    assert all(got[key] is None for key in ("entropy", "clipfrac", "kl", "logp_diff"))


def test_supervised_step_is_grpo_with_advantage_one(tiny_qwen2):
    """The warm start's step (token-mean NLL of the loss-mask tokens) moves the weights exactly as GRPO's on-policy
    update does when every advantage is 1, and it computes the rows' common prefix once without changing that."""
    from model import Transformer

    samples = [dataclasses.replace(sample, advantage=1.0) for sample in _grouped_samples(3, [0.0] * 6)]
    cfg = Config(micro_tokens=10_000, loss_agg="token-mean", grad_clip=0.0, lr=0.5, temperature=1.0, cpu_bf16="false")
    params = []
    for use_update in (True, False):
        model = Transformer.from_pretrained(tiny_qwen2)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        if use_update:
            assert train.update(model, opt, samples, cfg, train.Dist(), step=0)["finite"]
        else:
            nll_sum, grad_norm = train.supervised_step(model, opt, samples, cfg, train.Dist())
            assert nll_sum > 0 and math.isfinite(grad_norm)
        params.append(parameters_to_vector(model.parameters()).detach())
    untrained = Transformer.from_pretrained(tiny_qwen2)
    assert not torch.equal(params[0], parameters_to_vector(untrained.parameters()).detach())  # it moved
    assert torch.allclose(params[0], params[1], atol=1e-6, rtol=1e-4)
    # a group shares its 4 prompt tokens; the prefix stops before the position that predicts the first trained one
    assert train.common_prefix_length(samples[:3]) == 3 and train.common_prefix_length(samples[2:4]) == 0


def test_frozen_blocks_stop_the_backward_and_leave_the_other_gradients_exact(tiny_qwen2, tiny_qwen2_untied):
    """Transformer.frozen_blocks = 1 (of 2, the warm start's warm_start_frozen_layers): the embeddings as inputs and
    block 0 get no gradient; every other parameter gets exactly the gradient of the whole model (the frozen part
    only stops the backward), a tied output layer its output part. The logits do not change. Freezing every block is
    an error before the warm start does anything."""
    from types import SimpleNamespace

    from model import Transformer

    samples = [dataclasses.replace(sample, advantage=1.0) for sample in _grouped_samples(5, [0.0] * 6)]
    batch = train.collate(samples, "cpu")
    for path in (tiny_qwen2, tiny_qwen2_untied):
        grads, logps = [], []
        for frozen_blocks in (0, 1):
            model = Transformer.from_pretrained(path)
            model.gradient_checkpointing = True
            model.frozen_blocks = frozen_blocks
            logp, _ = token_logprobs(model, batch.tokens, batch.mask)
            logps.append(logp.detach())
            (-logp.sum()).backward()
            grads.append({name: param.grad for name, param in model.named_parameters()})
        torch.testing.assert_close(logps[1], logps[0], rtol=0, atol=0)
        for name, grad in grads[1].items():
            if name.startswith("model.layers.0."):
                assert grad is None, name
            elif name == "model.embed_tokens.weight":
                assert grad is None if path == tiny_qwen2_untied else not torch.equal(grad, grads[0][name])
            else:
                torch.testing.assert_close(grad, grads[0][name], rtol=1e-5, atol=1e-7)  # an untied lm_head too
    run = SimpleNamespace(model=Transformer.from_pretrained(tiny_qwen2))
    with pytest.raises(ValueError, match="warm_start_frozen_layers=2 leaves none of the model's 2 transformer blocks"):
        train.warm_start(run, Config(warm_start_frozen_layers=2), train.Dist())


def test_cpu_bf16_runs_the_updates_in_bfloat16_with_fp32_weights(tiny_qwen2):
    """--cpu_bf16: GRPO's update and the warm start's step run their matmuls under bfloat16 autocast; the weights,
    so the gradients and the optimizer's state, stay fp32, and one step moves them as the fp32 step does up to bf16
    rounding (the same direction, nearly the same size)."""
    from model import Transformer

    base = Transformer.from_pretrained(tiny_qwen2)
    start = parameters_to_vector(base.parameters()).detach()
    grpo_samples = _grouped_samples(4, [1.0, -0.5, 0.3, -0.8, 0.6, -0.2])
    sft_samples = [dataclasses.replace(sample, advantage=1.0) for sample in grpo_samples]
    for step_kind in ("update", "supervised_step"):
        moves = []
        for cpu_bf16 in ("false", "true"):
            cfg = Config(micro_tokens=10_000, grad_clip=0.0, lr=0.5, temperature=1.0, cpu_bf16=cpu_bf16)
            model = Transformer.from_pretrained(tiny_qwen2)
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            if step_kind == "update":
                assert train.update(model, opt, grpo_samples, cfg, train.Dist(), step=0)["finite"]
            else:
                nll, grad_norm = train.supervised_step(model, opt, sft_samples, cfg, train.Dist())
                assert nll > 0 and math.isfinite(grad_norm)
            assert all(param.dtype == torch.float32 for param in model.parameters())
            moves.append(parameters_to_vector(model.parameters()).detach() - start)
        fp32_move, bf16_move = moves
        assert fp32_move.norm() > 0
        assert not torch.equal(fp32_move, bf16_move)  # the bf16 matmuls did run
        assert torch.nn.functional.cosine_similarity(fp32_move, bf16_move, dim=0) > 0.99
        assert abs(bf16_move.norm() / fp32_move.norm() - 1) < 0.05


def test_cpu_bf16_auto_follows_the_cpu(monkeypatch):
    """--cpu_bf16=auto (the default) runs the updates in bf16 only where the CPU has bf16 instructions (without them
    the update is 6-16x slower in bf16 than in fp32); true and false are what they say, on a CPU only; other words
    stop."""
    assert isinstance(train.cpu_has_bf16(), bool)  # the real probe, on this machine's CPU
    cpu = train.Dist()
    gpu = dataclasses.replace(cpu, device=torch.device("cuda"))
    for has_bf16 in (False, True):
        monkeypatch.setattr(train, "cpu_has_bf16", lambda: has_bf16)
        assert train.bf16_updates(Config(), cpu) is has_bf16
        assert train.bf16_updates(Config(cpu_bf16="true"), cpu) is True
        assert train.bf16_updates(Config(cpu_bf16="False"), cpu) is False
        assert train.bf16_updates(Config(cpu_bf16="true"), gpu) is False
    with pytest.raises(SystemExit, match="--cpu_bf16=maybe: use auto"):
        train.validate(Config(cpu_bf16="maybe", dry_run=True))


def test_warm_start_demonstrations_are_a_scripted_agent_in_the_policy_format(tmp_path, tiny_qwen2):
    """A demonstration is a scripted agent's trajectory (demo_plan) through the policy's own prompt and framing: its
    trained tokens (loss mask 1) are exactly the policy-written parts of the turns (the forced <search> of turn 1 is
    not trained), and a question without oracle queries, or whose answer its searches do not show, gives none;
    warm_start_templates keeps only the questions of those templates. The default plan searches the question first;
    an unknown plan stops at start-up."""
    from transformers import AutoTokenizer

    from browse import BrowseConfig, Browser

    questions = [dict(question="What nationality was the author of Hamlet?", answers=["English"],
                      oracle_queries=["Hamlet", "William Shakespeare"], bridge="William Shakespeare"),
                 dict(question="Who?", answers=["Oslo"]),
                 dict(question="What nationality was the author of Hamlet?", answers=["Zzyzxian"],
                      oracle_queries=["Hamlet", "William Shakespeare"])]
    questions.append(dict(questions[0], template="read"))  # the same demonstration, of a template filtered out below
    cfg = Config(model=tiny_qwen2, max_turns=4, max_len=2048, date="2025-01-01", warm_start_demos=5,
                 warm_start_templates="", demo_plan="oracle")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    browser = Browser(train.subconfig(BrowseConfig, cfg))
    try:
        demos = train.demonstrations(questions, tokenizer, browser, cfg, train.Dist())
        question_first = dataclasses.replace(cfg, demo_plan="question_first")
        default = train.demonstrations(questions, tokenizer, browser, question_first, train.Dist())
        # warm_start_templates keeps the questions of those templates only (e.g. --warm_start_templates=bridge)
        questions[0]["template"] = "bridge"
        bridge_only = dataclasses.replace(cfg, warm_start_templates="bridge")
        bridges = train.demonstrations(questions, tokenizer, browser, bridge_only, train.Dist())
        questions[0]["template"] = "comparison"
        with pytest.raises(ValueError, match="no training question .* has one of these templates"):
            train.demonstrations(questions, tokenizer, browser, bridge_only, train.Dist())
    finally:
        browser.close()
    assert len(demos) == 2 and len(bridges) == 1 and bridges[0].tokens == demos[0].tokens
    trained = [token for token, mask in zip(demos[0].tokens, demos[0].loss_mask) if mask]
    text = tokenizer.decode(trained, skip_special_tokens=True)
    assert text == "Hamlet</search><search>William Shakespeare</search><answer>English</answer>"
    assert Config.demo_plan == "question_first" and len(default) == 2
    trained = [token for token, mask in zip(default[0].tokens, default[0].loss_mask) if mask]
    text = tokenizer.decode(trained, skip_special_tokens=True)
    assert text.startswith("What nationality was the author of Hamlet?</search><search>")
    assert text.endswith("William Shakespeare</search><answer>English</answer>")
    with pytest.raises(SystemExit, match="--demo_plan=scripted: use one of question_first, oracle"):
        train.validate(Config(demo_plan="scripted", dry_run=True))


def test_warm_start_templates_with_counts_set_the_mix(tiny_qwen2):
    """warm_start_templates="bridge:3,read": exactly 3 bridge demonstrations and the rest of warm_start_demos from
    read, whatever the seeded order puts first; a bad count, or counts above warm_start_demos, is a clear error."""
    from transformers import AutoTokenizer

    from browse import BrowseConfig, Browser

    bridge = dict(question="What nationality was the author of Hamlet?", answers=["English"], template="bridge",
                  oracle_queries=["Hamlet", "William Shakespeare"])
    read = dict(question="What nationality was William Shakespeare?", answers=["English"], template="read",
                oracle_queries=["William Shakespeare"])
    questions = [dict(read) for _ in range(6)] + [dict(bridge) for _ in range(4)]
    cfg = Config(model=tiny_qwen2, max_turns=4, max_len=2048, date="2025-01-01", warm_start_demos=5,
                 warm_start_templates="bridge:3,read")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    browser = Browser(train.subconfig(BrowseConfig, cfg))
    try:
        demos = train.demonstrations(questions, tokenizer, browser, cfg, train.Dist())
        natural = train.demonstrations(questions, tokenizer, browser, dataclasses.replace(cfg, warm_start_templates=""),
                                       train.Dist())
    finally:
        browser.close()

    def n_bridges(samples):
        return sum("author of Hamlet" in tokenizer.decode(sample.tokens) for sample in samples)

    assert len(demos) == 5 and n_bridges(demos) == 3
    assert len(natural) == 5 and n_bridges(natural) != 3  # the seeded order alone gives another mix
    assert train.template_mix("bridge:3,read", 5) == ({"bridge": 3}, {"read"})
    with pytest.raises(ValueError, match="positive whole count"):
        train.template_mix("bridge:x", 5)
    with pytest.raises(ValueError, match="add up to 6, more than warm_start_demos=5"):
        train.template_mix("bridge:3,read:3", 5)


def test_group_demo_replaces_one_row_per_group_and_stays_out_of_the_policys_metrics(tiny_qwen2):
    """group_demo: the last row of each group whose question names its supporting articles becomes the oracle's
    demonstration (answering right), rewarded and ranked like the others, so it gets the positive advantage where
    the policy's samples are wrong; a question without oracle queries keeps its samples. The policy's metrics leave
    the demonstration out, and logp_diff skips its tokens (nothing sampled them)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from browse import BrowseConfig, Browser
    from rollout import RolloutConfig

    questions = [dict(question="What nationality was the author of Hamlet?", answers=["English"],
                      oracle_queries=["Hamlet", "William Shakespeare"]),
                 dict(question="Who?", answers=["Oslo"])]
    cfg = Config(model=tiny_qwen2, group_size=2, max_turns=4, max_len=2048, date="2025-01-01")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    browser = Browser(train.subconfig(BrowseConfig, cfg))
    run = SimpleNamespace(tokenizer=tokenizer, browser=browser, rollout_cfg=train.subconfig(RolloutConfig, cfg))
    sampled = [FakeTrajectory("q", i // 2, [1, 2, 3, 4], [0, 0, 1, 1], [0.0, 0.0, -0.5, -0.5], 2,
                              [FakeTurn(f"<answer>{answer}</answer>")], answer, "answer", {"n_search": 0})
               for i, answer in enumerate(["French", "French", "Oslo", "Paris"])]
    try:
        trajs, demo = train.with_group_demos(sampled, questions, run, cfg)
    finally:
        browser.close()
    assert demo == [False, True, False, False] and trajs[0] is sampled[0] and trajs[2:] == sampled[2:]
    assert trajs[1].group == 0 and trajs[1].answer == "English" and trajs[1].stats["n_search"] == 2
    batch = train.build_samples(trajs, [q["answers"] for q in questions], cfg, demo)
    assert batch.samples[1].sampler_logp is None and batch.samples[1].advantage > 0 > batch.samples[0].advantage
    metrics = train.step_metrics(batch, UPDATE_STATS, {"time_rollout": 1.0, "time_learn": 1.0}, cfg, train.Dist(), 0)
    assert metrics["group_demos"] == 1 and metrics["f1"] == pytest.approx(1 / 3)  # French 0, Oslo 1, Paris 0
    assert metrics["search_calls"] == 0  # the demonstration's two searches are not the policy's
    micro = train.collate(batch.samples[:2], "cpu")
    sums = train.pass_sums(micro, torch.zeros(micro.mask[:, 1:].shape), torch.zeros(micro.mask[:, 1:].shape), True)
    assert sums["logp_diff_tokens"] == 2 and sums["logp_diff"] == pytest.approx(1.0)  # row 0's two sampled tokens
