"""Generation throughput: our engine (rollout.generate) vs transformers' `generate`, same weights, same run.

What it measures: greedy decoding of `--new_tokens` tokens for a batch of prompts of mixed lengths (uniform in
[prompt_len/2, prompt_len]); tokens/s = new tokens / wall time, prefill included, for each batch size. transformers
gets the batch left-padded with an attention mask (its standard batched path, SDPA attention, static KV cache off).
Both stop only at the token limit (no eos), so both produce exactly batch x new_tokens tokens. Also the gain from
group sharing (G=16 rows of one prompt: one prefill copied vs 16 prefills). On CUDA it also reports the batch-1
decode step against the memory-bandwidth floor: (weight bytes + KV bytes read per step) / bandwidth.

Run
    python bench/generate.py                                    # CPU: SmolLM2-135M shape, fp32, batch 1, 8, 32
    python bench/generate.py --device=cuda --shape=qwen2.5-0.5b --dtype=bfloat16 --batches=1,8,64,256
The last line prints `speedup_vs_hf=<ratio at batch 8>` (transformers time / ours).
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


def timed(fn, device: str, reps: int = 1) -> float:
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM HBM3)")
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = getattr(torch, a.dtype)
    raw = dict(SHAPES[a.shape])
    hf_cfg = AutoConfig.for_model(**raw)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(a.device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = Transformer(ModelConfig.from_json(raw)).to(device=a.device, dtype=dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)  # the very same tensors
    rng = random.Random(0)
    V = raw["vocab_size"]
    print(f"{a.shape} {a.dtype} on {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}), "
          f"prompts {a.prompt_len // 2}-{a.prompt_len} tokens, {a.new_tokens} new tokens, greedy")

    def ours_run(prompts):
        return generate(ours, prompts, a.new_tokens, temperature=0.0)

    def hf_run(prompts):
        L = max(map(len, prompts))
        ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=a.device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=a.device)
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=False)

    ratio8 = None
    for b in [int(x) for x in a.batches.split(",")]:
        prompts = [[rng.randrange(V) for _ in range(rng.randint(a.prompt_len // 2, a.prompt_len))] for _ in range(b)]
        ours_run(prompts[:2])  # warm-up
        hf_run(prompts[:2])
        t_ours = timed(lambda: ours_run(prompts), a.device, a.reps)
        t_hf = timed(lambda: hf_run(prompts), a.device, a.reps)
        if b <= 8:  # same tokens (greedy, same weights): a check that the comparison is fair
            got, ref = ours_run(prompts), hf_run(prompts)
            same = sum(g == r[-a.new_tokens:].tolist() for g, r in zip(got, ref))
            note = f" | identical outputs {same}/{b}"
        else:
            note = ""
        n = b * a.new_tokens
        print(f"batch {b:4d} | ours {n / t_ours:9.1f} tok/s | transformers {n / t_hf:9.1f} tok/s | "
              f"speedup {t_hf / t_ours:5.2f}x{note}")
        if b == 8:
            ratio8 = t_hf / t_ours

    # group sharing: G rows of one prompt, one prefill copied into G rows vs G separate prefills
    prompt = [rng.randrange(V) for _ in range(a.prompt_len)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=a.new_tokens)

    def rows(shared: bool):
        eng = Engine(ours, a.group, a.prompt_len + a.new_tokens + 1, seed=0)
        if shared:
            eng.submit(prompt, sp, n=a.group)
        else:
            eng.submit_many([prompt] * a.group, sp)
        while eng.n_decoding:
            eng.step()
    t_sh, t_sep = timed(lambda: rows(True), a.device, a.reps), timed(lambda: rows(False), a.device, a.reps)
    print(f"group G={a.group}: one shared prefill {t_sh:.3f} s vs {a.group} prefills {t_sep:.3f} s "
          f"({t_sep / t_sh:.2f}x)")

    if a.device == "cuda":  # batch-1 decode step vs the bandwidth floor
        eng = Engine(ours, 1, a.prompt_len + 256 + 1)
        eng.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=256))
        eng.step()
        sync(a.device)
        t = time.perf_counter()
        steps = 0
        while eng.n_decoding:
            eng.step()
            steps += 1
        sync(a.device)
        step_s = (time.perf_counter() - t) / steps
        cfg = ours.config
        w_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (a.prompt_len + 128) * dtype.itemsize
        floor = (w_bytes + kv) / a.bandwidth
        print(f"batch-1 decode step {step_s * 1e3:.2f} ms vs bandwidth floor {floor * 1e3:.2f} ms "
              f"({step_s / floor:.1f}x the floor)")
    print(f"speedup_vs_hf={ratio8:.2f}" if ratio8 else "speedup_vs_hf=nan (no batch 8 in --batches)")


if __name__ == "__main__":
    main()
