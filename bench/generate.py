"""Generation throughput: our engine (rollout.generate) vs transformers' `generate`, same weights, same run.

What it measures
- For each batch size: greedy decoding of `--new_tokens` tokens for prompts of mixed lengths (uniform in
  [prompt_len/2, 3*prompt_len/2]), no stop token, so both produce exactly batch x new_tokens tokens.
  tokens/s = new tokens / wall time, prefill included. Ours: `rollout.generate` with one slot per prompt (ragged
  batch, right-padded prefill, per-row cursors). transformers: `AutoModelForCausalLM.generate` on the left-padded
  batch with an attention mask (its standard batched path: SDPA, dynamic KV cache). Both models hold the very same
  tensors; the share of rows whose tokens agree is printed as a fairness check (fp32 should agree; bf16 may drift).
- Group sharing (GRPO): G rows of one prompt, `Engine.submit(prompt, n=G)` (prefill once, copy the cache rows)
  vs the same G prompts prefilled separately (`submit_many([prompt] * G)`, one batched prefill of G copies), then
  `--new_tokens` sampled tokens each; prefill time and total time.
- On CUDA only: the decode step time at each batch size against the memory-bandwidth floor, i.e. (weight bytes +
  KV bytes of the rows' actual lengths) / `--bandwidth` (default H100 SXM, 3.35e12 B/s). The engine decodes a
  contiguous block of rows and reads keys up to the longest row, so it reads a little more than the floor counts.

Weights: a random init of `--shape` (model.SHAPES) built in memory by transformers and copied into our Transformer,
or a local checkpoint folder with `--model=PATH` (both load it). No network.
On CPU one torch thread by default (`--threads`): on shared cores more threads spin and make both sides slower.
What it does not measure: sampling with stop strings, tool calls (bench/rollout.py does the agent loop).

Run
    python bench/generate.py             # CPU smoke: smollm2-135m, fp32, batches 1,8,32, 1 thread (~1.5 min)
    python bench/generate.py --device=cuda --dtype=bfloat16 --shape=qwen2.5-0.5b --batches=1,8,32,64,128,256 \\
        --prompt_len=512 --new_tokens=128 --group_prompt_len=1024
The last line prints `speedup_vs_hf=<ratio at batch 8>` (transformers wall time / ours; > 1 means we are faster).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import SHAPES, ModelConfig, Transformer  # noqa: E402
from rollout import Engine, SamplingParams, generate  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, device: str, reps: int) -> tuple[dict, dict]:
    """Best wall seconds of each function over `reps` rounds, run in turn within a round (so load from other jobs
    hits both sides alike), and each one's last result."""
    best, out = {k: float("inf") for k in fns}, {}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            out[k] = fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t)
    return best, out


def load_models(a, dtype):
    """(ours, transformers) on the same weights: a random init of --shape, or the checkpoint at --model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if a.model:
        hf = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device)
        ours = Transformer.from_pretrained(a.model, dtype=dtype, device=a.device)
    else:
        raw = dict(SHAPES[a.shape])
        hf_cfg = AutoConfig.for_model(**raw)
        hf_cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(a.device):
            hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
        ours = Transformer(ModelConfig.from_json(raw)).to(device=a.device, dtype=dtype)
        ours.load_state_dict(hf.state_dict(), strict=False)  # the very same tensors (tied lm_head shared in both)
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


def decode_step_floor(ours, prompts, new_tokens, bandwidth, device):
    """CUDA: mean decode step time of a batch (prefill excluded), its memory-bandwidth floor, KV share of bytes."""
    cfg, elem = ours.config, next(ours.parameters()).element_size()
    eng = Engine(ours, len(prompts), max(map(len, prompts)) + new_tokens + 1)
    eng.submit_many(prompts, SamplingParams(temperature=0.0, max_new_tokens=new_tokens))
    sync(device)
    t, steps = time.perf_counter(), 0
    while eng.n_decoding:
        eng.step()
        steps += 1
    sync(device)
    step_s = (time.perf_counter() - t) / steps
    # every weight is read once per step (a tied embedding once, as the lm_head); KV: each row reads its own
    # keys and values, on average prompt + new_tokens/2 positions, in every layer
    w_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    mean_len = sum(len(p) for p in prompts) / len(prompts) + new_tokens / 2
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem * mean_len * len(prompts)
    return step_s, (w_bytes + kv_bytes) / bandwidth, kv_bytes / (w_bytes + kv_bytes)


def group_sharing(ours, prompt, G, new_tokens, device, reps):
    """(shared prefill s, separate prefill s, shared total s, separate total s) for G rows of one prompt."""
    sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)  # GRPO samples its group

    def run(shared: bool):
        eng = Engine(ours, G, len(prompt) + new_tokens + 1, seed=0)
        sync(device)
        t0 = time.perf_counter()
        if shared:
            eng.submit(prompt, sp, n=G)
        else:
            eng.submit_many([prompt] * G, sp)
        sync(device)
        t1 = time.perf_counter()
        while eng.n_decoding:
            eng.step()
        sync(device)
        return t1 - t0, time.perf_counter() - t0

    res = {True: (float("inf"),) * 2, False: (float("inf"),) * 2}
    for _ in range(reps):
        for shared in (False, True):
            res[shared] = tuple(map(min, res[shared], run(shared)))
    return res[True][0], res[False][0], res[True][1], res[False][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--model", default="", help="local HF checkpoint folder instead of a random --shape")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (up to 256 on CUDA)")
    ap.add_argument("--prompt_len", type=int, default=64, help="mean prompt length (lengths vary 0.5x-1.5x)")
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--group", type=int, default=16, help="G, rows sharing one prompt")
    ap.add_argument("--group_prompt_len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions (best is kept)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU torch threads (1: on shared cores more threads spin and get slower, not faster)")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="memory bandwidth, B/s (H100 SXM)")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    ours, hf = load_models(a, dtype)
    V = ours.config.vocab_size
    rng = random.Random(0)
    lengths = [rng.randint(max(1, a.prompt_len // 2), a.prompt_len * 3 // 2) for _ in range(max(batches))]
    prompts_all = [[rng.randrange(3, V) for _ in range(n)] for n in lengths]
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{a.model or a.shape} ({ours.config.n_params / 1e6:.1f} M params) {a.dtype} on {dev}, prompts "
          f"{min(lengths)}-{max(lengths)} tokens (mean ~{a.prompt_len}), {a.new_tokens} new tokens, greedy, no stop")

    with torch.no_grad():
        generate(ours, prompts_all[:2], 4, temperature=0.0)  # warm-up both (allocator, kernel selection)
        hf_generate(hf, prompts_all[:2], 4, a.device)
        ratios = {}
        for b in batches:
            prompts = prompts_all[:b]
            t, res = timed({"ours": lambda: generate(ours, prompts, a.new_tokens, temperature=0.0, n_slots=b),
                            "hf": lambda: hf_generate(hf, prompts, a.new_tokens, a.device)}, a.device, a.reps)
            t_ours, t_hf = t["ours"], t["hf"]
            same = sum(g == r for g, r in zip(res["ours"], res["hf"]))
            n = b * a.new_tokens
            ratios[b] = t_hf / t_ours
            line = (f"batch {b:4d} | ours {n / t_ours:10,.1f} tok/s ({t_ours:7.2f} s) | transformers "
                    f"{n / t_hf:10,.1f} tok/s ({t_hf:7.2f} s) | speedup {ratios[b]:5.2f}x | same tokens {same}/{b}")
            if a.device == "cuda":
                step_s, floor_s, kv_share = decode_step_floor(ours, prompts, a.new_tokens, a.bandwidth, a.device)
                line += (f" | decode step {step_s * 1e3:.2f} ms vs bandwidth floor {floor_s * 1e3:.2f} ms "
                         f"({floor_s / step_s:.0%} of peak; KV {kv_share:.0%} of bytes)")
            print(line, flush=True)

        gp = [rng.randrange(3, V) for _ in range(a.group_prompt_len)]
        sh_pre, sep_pre, sh_tot, sep_tot = group_sharing(ours, gp, a.group, a.new_tokens, a.device, a.reps)
        print(f"group G={a.group}, prompt {a.group_prompt_len} tokens, {a.new_tokens} sampled tokens per row: "
              f"prefill shared {sh_pre:.3f} s vs separate {sep_pre:.3f} s ({sep_pre / sh_pre:.2f}x) | "
              f"total {sh_tot:.3f} s vs {sep_tot:.3f} s ({sep_tot / sh_tot:.2f}x)")
    ref_b = 8 if 8 in ratios else batches[0]
    if ref_b != 8:
        print(f"(no batch 8 in --batches: the ratio below is at batch {ref_b})")
    print(f"speedup_vs_hf={ratios[ref_b]:.3f}")


if __name__ == "__main__":
    main()
