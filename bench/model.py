"""Forward-pass speed of model.py against transformers' own implementation, same random weights, same run.

Builds a randomly initialised transformers model of a known shape (data.models.SHAPES), loads the very same tensors into
our Transformer, checks the logits agree, then times a full forward of batch x seq tokens for each.

Run:
    python bench/model.py                                    # CPU smoke: smollm2-135m, batch 2 x 256, fp32
    python bench/model.py --device=cuda --shape=qwen2.5-1.5b --batch=8 --seq=2048 --dtype=bfloat16
The last line prints `speedup_vs_hf=<ratio>` (transformers time / ours; > 1 means we are faster).
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.config import parse_config  # noqa: E402
from data.models import SHAPES  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def timeit(fn, device, iters):
    fn()  # warm-up (kernel selection, allocator)
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median


@dataclass
class Args:
    shape: str = "smollm2-135m"  # a data.models.SHAPES name
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 2
    seq: int = 256
    iters: int = 5


def main(a: Args):
    if a.shape not in SHAPES:
        raise SystemExit(f"--shape must be one of {', '.join(sorted(SHAPES))}, got {a.shape!r}")
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, a.dtype)
    raw = dict(SHAPES[a.shape])
    hf_cfg = AutoConfig.for_model(**raw)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(a.device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    ours = Transformer(ModelConfig.from_json(raw)).to(device=a.device, dtype=dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)  # same tensors; tied lm_head is shared in both
    tokens = torch.randint(0, raw["vocab_size"], (a.batch, a.seq), device=a.device)
    with torch.no_grad():
        diff = (ours(tokens[:1, :64]).float() - hf(tokens[:1, :64]).logits.float()).abs().max().item()
        t_hf = timeit(lambda: hf(tokens).logits, a.device, a.iters)
        t_ours = timeit(lambda: ours(tokens), a.device, a.iters)
    n = a.batch * a.seq
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"shape={a.shape} device={dev} dtype={a.dtype} batch={a.batch} seq={a.seq} max_logit_diff={diff:.3g}")
    print(f"transformers: {t_hf * 1e3:.1f} ms  {n / t_hf:,.0f} tok/s")
    print(f"ours:         {t_ours * 1e3:.1f} ms  {n / t_ours:,.0f} tok/s")
    if a.device == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"speedup_vs_hf={t_hf / t_ours:.3f}")


if __name__ == "__main__":
    main(parse_config(Args, sys.argv[1:]))
