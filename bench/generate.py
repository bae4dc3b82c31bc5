"""Generation engine benchmark (issues 3 and 12): the decode step against the hardware's bandwidth floor, our engine
against transformers' `generate`, CUDA graphs on vs off, GRPO group sharing, and the peers' workload, in one run.

Run
    python bench/generate.py --device=cuda      # the GPU run (H100/H200, ~5 min, must stay under 8): everything below
    python bench/generate.py                    # CPU smoke (~2 min on 2 shared cores): smollm2-135m, fp32, batch 1, 8
Device defaults (each overridable): cuda = shapes qwen2.5-0.5b,qwen2.5-1.5b, bf16, batches 1,8,64,256, prompts
~256 tokens, 64 new tokens, group prompt 1024, the peers' workload on; cpu = smollm2-135m, fp32, batches 1,8, prompts
~64, 16 new tokens, group prompt 256, no peers' workload (`--peers=8 --peers_lens=16,48` smoke-tests it).
The last line prints `speedup_vs_hf=<ratio at batch 8, first shape>` (transformers wall time / ours, graphs on).

What it measures, per shape (random weights of `data.models.SHAPES[shape]`, built by transformers and copied into ours,
so both hold the very same tensors; no network):
- tok/s: greedy decoding of `--new_tokens` for a batch of prompts of mixed lengths (uniform in [prompt_len/2,
  3*prompt_len/2]), no stop token, so every side produces batch x new_tokens tokens; wall time, prefill included.
  Ours: one Engine per batch, reused across repetitions (a warm-up round first: it captures the graphs), eager and
  (CUDA) with `cuda_graphs=True`. transformers: `generate` on the left-padded batch with an attention mask (SDPA,
  dynamic cache). "same" = rows whose tokens equal transformers' (fp32 should agree; bf16 may drift).
- decode step (CUDA): mean time of one `Engine.step()` (forward + sampling + the host sync) over 32 steps after 3
  warm-up steps, eager and graphed, against the floor (weight bytes + KV bytes the rows hold) / peak bandwidth.
  Peak bandwidth from the device name: H200 4.8 TB/s, H100 SXM 3.35, H100 PCIe 2.0, A100 2.0 (`--bandwidth`
  overrides). Our attention gathers each row's blocks before SDPA, so it moves ~3x the KV bytes the floor counts.
- group sharing: G rows of one prompt, `submit(prompt, n=G)` (prefill once, prompt blocks shared) vs the G copies
  prefilled in one batch (`submit_many([prompt] * G)`), then `--new_tokens` sampled tokens each.
- the peers' workload (CUDA default): `--peers` sequences (256), prompt and output lengths uniform in `--peers_lens`
  (100-1024), `--peers_shape` (qwen3-0.6b, random weights), temperature 1, no stop: total generated tok/s (and
  prefill+decode wall), graphs on and off. No transformers baseline here (it cannot stop rows at their own lengths).
On CPU one torch thread by default (`--threads`): on shared cores more threads spin and make both sides slower.
What it does not measure: stop strings, tool calls (bench/rollout.py does the agent loop).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.config import parse_config  # noqa: E402
from data.models import SHAPES  # noqa: E402
from model import KVCache, ModelConfig, Transformer  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402

DEFAULTS = {  # per device, for the options left unset; any flag given on the command line wins
    "cuda": dict(shapes="qwen2.5-0.5b,qwen2.5-1.5b", dtype="bfloat16", batches="1,8,64,256", prompt_len=256,
                 new_tokens=64, group_prompt_len=1024, peers=256),
    "cpu": dict(shapes="smollm2-135m", dtype="float32", batches="1,8", prompt_len=64, new_tokens=16,
                group_prompt_len=256, peers=0),
}
BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]  # bytes/s, by name


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_models(shape: str, device: str, dtype, with_hf: bool = True):
    """(ours, transformers or None) on the same random weights of `shape`."""
    raw = dict(SHAPES[shape])
    if not with_hf:
        torch.manual_seed(0)
        with torch.device(device):
            ours = Transformer(ModelConfig.from_json(raw)).to(dtype=dtype)
        return ours.eval(), None
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**raw)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    with torch.device("meta"):
        ours = Transformer(ModelConfig.from_json(raw))
    ours.load_state_dict(hf.state_dict(), strict=False, assign=True)  # the very same tensors
    if ours.config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    hf.generation_config.eos_token_id = None  # no stop: both run exactly new_tokens
    hf.generation_config.pad_token_id = 0
    return ours.eval(), hf.eval()


def hf_generate(hf, prompts, new_tokens, device):
    """transformers' batched greedy path: left padding + attention mask. Returns the new tokens per row."""
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    return out[:, L:].tolist()


def drain(eng: Engine, prompts, sps) -> list[list[int]]:
    """Submit every prompt (one SamplingParams each), step until all finish, release; tokens per prompt."""
    slots = [eng.submit(p, sp)[0] for p, sp in zip(prompts, sps)]
    out = {}
    while eng.n_decoding or len(out) < len(slots):
        for f in eng.step():
            out[f.slot] = f.tokens
            eng.release(f.slot)
    return [out[s] for s in slots]


def best_of(fn, reps: int, device: str) -> tuple[float, object]:
    best, res = float("inf"), None
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        res = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, res


def step_time(eng: Engine, prompts, device: str, warm: int = 3, n: int = 32) -> tuple[float, float]:
    """Mean seconds of one decode step over n steps (after `warm`), and the mean tokens a row holds meanwhile."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=warm + n + 1)
    slots = [eng.submit(p, sp)[0] for p in prompts]
    for _ in range(warm):
        eng.step()
    held = sum(eng.length(s) for s in slots) / len(slots) + n / 2
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        eng.step()
    sync(device)
    dt = (time.perf_counter() - t) / n
    for s in slots:
        eng.release(s)
    return dt, held


def bench_shape(a, shape, dtype, bandwidth, rng) -> float:
    ours, hf = load_models(shape, a.device, dtype)
    cfg, V = ours.config, ours.config.vocab_size
    batches = [int(x) for x in a.batches.split(",")]
    lengths = [rng.randint(max(1, a.prompt_len // 2), a.prompt_len * 3 // 2) for _ in range(max(batches))]
    prompts_all = [[rng.randrange(3, V) for _ in range(n)] for n in lengths]
    modes = [False, True] if a.device == "cuda" else [False]
    print(f"\n== {shape} ({cfg.n_params / 1e6:.1f} M params) {a.dtype}, prompts {min(lengths)}-{max(lengths)} tokens, "
          f"{a.new_tokens} new tokens, greedy, no stop", flush=True)
    w_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # a tied matrix counted once
    kv_tok = KVCache.nbytes_for(cfg, 1, dtype)  # K and V of one token, all layers
    hf_generate(hf, prompts_all[:2], 4, a.device)  # warm-up (allocator, kernel selection)
    ratios = {}
    for b in batches:
        prompts = prompts_all[:b]
        max_len = max(map(len, prompts)) + a.new_tokens + 1
        sp = [SamplingParams(temperature=0.0, max_new_tokens=a.new_tokens)] * b
        t_hf, ref = best_of(lambda: hf_generate(hf, prompts, a.new_tokens, a.device), a.reps, a.device)
        n = b * a.new_tokens
        line = f"batch {b:4d} | transformers {n / t_hf:9,.1f} tok/s"
        for graphs in modes:
            eng = Engine(ours, b, max_len, cuda_graphs=graphs)
            drain(eng, prompts, sp)  # warm-up round: captures the graphs this batch needs
            t, got = best_of(lambda: drain(eng, prompts, sp), a.reps, a.device)
            same = sum(g == r for g, r in zip(got, ref))
            tag = "graphs" if graphs else "eager"
            line += f" | ours {tag} {n / t:9,.1f} tok/s ({t_hf / t:5.2f}x, same {same}/{b})"
            ratios[b] = t_hf / t  # graphs on where there are graphs
            if a.device == "cuda":
                dt, held = step_time(eng, prompts, a.device)
                floor = (w_bytes + kv_tok * held * b) / bandwidth
                line += f" step {dt * 1e3:6.2f} ms (floor {floor * 1e3:.2f} ms, {floor / dt:4.0%})"
            del eng
        print(line, flush=True)
    group_sharing(a, ours, rng)
    del ours, hf
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return ratios.get(8, ratios[batches[0]])


def group_sharing(a, ours, rng) -> None:
    prompt = [rng.randrange(3, ours.config.vocab_size) for _ in range(a.group_prompt_len)]
    G, sp = a.group, SamplingParams(temperature=1.0, max_new_tokens=a.new_tokens)  # GRPO samples its group

    def run(shared: bool):
        eng = Engine(ours, G, len(prompt) + a.new_tokens + 1, seed=0)
        sync(a.device)
        t0 = time.perf_counter()
        if shared:
            eng.submit(prompt, sp, n=G)
        else:
            eng.submit_many([prompt] * G, sp)
        sync(a.device)
        t1 = time.perf_counter()
        while eng.n_decoding:
            eng.step()
        sync(a.device)
        return t1 - t0, time.perf_counter() - t0, len(eng.free_blocks)

    res = {}
    for _ in range(a.reps):
        for shared in (False, True):
            r = run(shared)
            res[shared] = tuple(map(min, res.get(shared, r), r))
    (sp_, st_, fb_s), (pp_, pt_, fb_p) = res[True], res[False]
    print(f"group G={G}, prompt {len(prompt)} tokens, {a.new_tokens} sampled tokens per row: prefill shared "
          f"{sp_:.3f} s vs separate {pp_:.3f} s ({pp_ / sp_:.2f}x) | total {st_:.3f} s vs {pt_:.3f} s "
          f"({pt_ / st_:.2f}x) | KV blocks held: {fb_s - fb_p} fewer when shared", flush=True)


def peers(a, dtype, rng) -> None:
    """The peers' workload: many sequences with their own prompt and output lengths, sampled, no stop."""
    ours, _ = load_models(a.peers_shape, a.device, dtype, with_hf=False)
    lo, hi = (int(x) for x in a.peers_lens.split(","))
    V = ours.config.vocab_size
    prompts = [[rng.randrange(3, V) for _ in range(rng.randint(lo, hi))] for _ in range(a.peers)]
    outs = [rng.randint(lo, hi) for _ in range(a.peers)]
    sps = [SamplingParams(temperature=1.0, max_new_tokens=n) for n in outs]
    max_len = max(map(len, prompts)) + hi + 1
    print(f"\n== peers' workload: {a.peers} sequences of {a.peers_shape} ({ours.config.n_params / 1e6:.0f} M params, "
          f"{a.dtype}), prompts and outputs uniform in {lo}-{hi} tokens ({sum(outs):,} to generate), temperature 1, "
          f"all rows at once", flush=True)
    for graphs in ([False, True] if a.device == "cuda" else [False]):
        eng = Engine(ours, a.peers, max_len, cuda_graphs=graphs)  # captures count: a rollout pays them too
        t, got = best_of(lambda: drain(eng, prompts, sps), 1, a.device)
        assert [len(x) for x in got] == outs
        print(f"ours {'graphs' if graphs else 'eager '}: {sum(outs) / t:10,.0f} generated tok/s "
              f"({t:.1f} s wall incl. prefill and graph captures, {len(eng._graphs)} graphs)", flush=True)
        del eng
        if a.device == "cuda":
            torch.cuda.empty_cache()
    del ours


@dataclass
class Args:
    device: str = "cpu"             # cpu or cuda
    shapes: str = ""                # comma-separated data.models.SHAPES names ("" = the device's default, DEFAULTS)
    dtype: str = ""                 # "" = the device's default
    batches: str = ""               # comma-separated batch sizes ("" = the device's default)
    prompt_len: int = 0             # mean prompt length (lengths vary 0.5x-1.5x); 0 = the device's default
    new_tokens: int = 0             # 0 = the device's default
    group: int = 16                 # G, rows sharing one prompt
    group_prompt_len: int = 0       # 0 = the device's default
    peers: int = -1                 # sequences in the peers' workload (0 = skip; -1 = the device's default)
    peers_lens: str = "100,1024"    # min,max of prompt and output lengths
    peers_shape: str = "qwen3-0.6b"
    reps: int = 1                   # timed repetitions (best is kept)
    threads: int = 1                # CPU torch threads
    bandwidth: float = 0.0          # peak memory bandwidth, B/s (0 = from the device name)


def main(a: Args) -> None:
    if a.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {a.device!r}")
    for k, v in DEFAULTS[a.device].items():
        if getattr(a, k) == getattr(Args, k):  # left at its "unset" default
            setattr(a, k, v)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    bandwidth = a.bandwidth or next((bw for key, bw in BANDWIDTH if key in name), None)
    if a.device == "cuda" and bandwidth is None:
        raise SystemExit(f"unknown peak bandwidth for {name!r}: pass --bandwidth=BYTES_PER_S")
    bw = f", peak bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""
    print(f"{name}{bw}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    rng = random.Random(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        ratios = [bench_shape(a, s, dtype, bandwidth, rng) for s in a.shapes.split(",")]
        if a.peers:
            peers(a, dtype, rng)
    print(f"\nwall {time.perf_counter() - t0:.0f} s")
    print(f"speedup_vs_hf={ratios[0]:.3f}")


if __name__ == "__main__":
    main(parse_config(Args, sys.argv[1:]))
