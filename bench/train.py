"""Update throughput of train.py's policy step (forward + backward + AdamW over trajectories), in tokens per second.

What it measures: `train.update` itself (micro-batching by token budget, per-token logprobs at the sampled
positions only, the clipped loss, grad clipping, the optimizer step) on random trajectories of `--seq` tokens whose
first quarter is the prompt (loss mask 0), the rest sampled (mask 1) but for one masked "observation" span.

- CPU (default): the tiny shape and a SmolLM2-135M-shaped model in fp32, single process. The baseline, timed in
  the same run, is the same update with the naive log-prob computation (logits at every position, full
  log-softmax, then gather); it prints speedup_vs_full_logits.
- `--group=G --prompt=P`: GRPO-shaped trajectories, groups of G sharing a P-token prompt; the baseline is then the
  same update with `share_prefix=False` (every row recomputes its prompt); it prints speedup_vs_no_sharing.
- `--cpu_bf16=true`: the same update with train.py's `--cpu_bf16` (bf16 autocast, fp32 weights) against the fp32
  update as the baseline, alternated in the same run; prints speedup_vs_fp32.
- `--device=cuda`: Qwen2.5-0.5B- and 1.5B-shaped random models, FSDP2 on one GPU (a 1-rank process group), bf16
  compute with fp32 master weights, 4k-token sequences; prints tokens/s and
  MFU = 6 * params * tokens / time / peak (peak 989e12 FLOP/s: H100 SXM bf16 dense; --peak_flops to change).
  6 * params counts forward + backward matmuls with the weights; attention scores and the recompute of activation
  checkpointing are not counted (the usual convention), so MFU is a lower bound on the hardware utilisation.

Run
    python bench/train.py                                               # CPU, both small shapes
    python bench/train.py --device=cuda                                 # 1 GPU: qwen2.5-0.5b and 1.5b at 4k
    python bench/train.py --device=cuda --shapes=qwen2.5-1.5b --micro_tokens=16384 --checkpointing=true
    python bench/train.py --shapes=smollm2-135m --group=8 --n_seqs=16 --seq=530 --prompt=300 --micro_tokens=2048 \
        --checkpointing=true                                            # the default run's update shape
    python bench/train.py --shapes=smollm2-135m --group=8 --n_seqs=16 --seq=750 --prompt=450 --micro_tokens=4096 \
        --checkpointing=true --cpu_bf16=true                            # --cpu_bf16 against fp32
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from data.config import parse_config  # noqa: E402
from data.models import SHAPES, TINY_CONFIG  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


@dataclass
class Args:
    device: str = "cpu"
    shapes: str = ""             # comma-separated; "" = tiny,smollm2-135m on CPU, qwen2.5-0.5b,qwen2.5-1.5b on CUDA
    seq: int = 0                 # tokens per trajectory; 0 = 256 on CPU, 4096 on CUDA
    n_seqs: int = 0              # trajectories per update; 0 = 4 on CPU, 8 on CUDA
    micro_tokens: int = 0        # token budget per forward/backward; 0 = 2 * seq
    checkpointing: bool = False  # activation checkpointing
    iters: int = 5
    warmup: int = 1
    peak_flops: float = 989e12   # H100 SXM bf16 dense
    baseline: bool = True        # CPU: also time the baseline (full logits; with --group > 1, no prompt sharing)
    group: int = 1               # trajectories per shared prompt (a GRPO group); 1 = independent trajectories
    prompt: int = 0              # prompt tokens (loss mask 0); 0 = a quarter of --seq
    cpu_bf16: bool = False       # CPU: time the update with --cpu_bf16 against the fp32 one (the baseline)


def full_logits_logprobs(model, tokens, mask, temperature=1.0, with_entropy=False, entropy_grad=True, prefix=0):
    """The naive way: logits at every position, log-softmax over the vocabulary, gather the targets."""
    logits = model(tokens[:, :-1], prefix=prefix).float()  # (B, T-1, V)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    m = mask[:, 1:].bool()
    lp = logp_all.gather(2, tokens[:, 1:, None]).squeeze(-1) * m
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            ent = -(logp_all.exp() * logp_all).sum(-1) * m
    return lp, ent


def make_samples(n: int, seq: int, vocab: int, group: int = 1, prompt: int = 0, seed: int = 0) -> list[train.Sample]:
    """n trajectories of seq tokens: a prompt (shared by each `group`), then sampled tokens with an observation span
    (mask 0) over the middle half of the rest."""
    g = torch.Generator().manual_seed(seed)
    prompt = prompt or seq // 4
    rest = seq - prompt
    mask = [0] * prompt + [1] * rest
    mask[prompt + rest // 4: prompt + 3 * rest // 4] = [0] * (3 * rest // 4 - rest // 4)  # an observation span
    out = []
    for i in range(n):
        if i % group == 0:
            head = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        adv = 1.0 if i % 2 else -1.0  # never 0: update() skips zero-advantage rows
        tokens = head + torch.randint(0, vocab, (rest,), generator=g).tolist()
        out.append(train.Sample(tokens, mask, adv, group=i // group))
    return out


def build(shape: str, d: train.Dist, checkpointing: bool):
    cfg = ModelConfig.from_json(TINY_CONFIG if shape == "tiny" else SHAPES[shape])
    torch.manual_seed(0)
    if train.is_distributed():  # FSDP2 as in train.py (always on GPU: a 1-rank group; on CPU only under torchrun)
        with torch.device("meta"):
            model = Transformer(cfg)
        train.apply_fsdp(model, d)
    else:
        model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    model.gradient_checkpointing = checkpointing
    model.train()
    return model, cfg


def one_update(model, opt, samples, cfg: train.Config, d: train.Dist) -> float:
    """Seconds for one `train.update` call (synchronised on GPU)."""
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    m = train.update(model, opt, samples, cfg, d, step=0, show_progress=False)
    assert m["finite"], "non-finite gradient in the benchmark"
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_updates(model, samples, cfg, d, iters: int, warmup: int, baseline: str) -> tuple[float, float | None]:
    """Median seconds per update, ours and (optionally) a baseline ("full_logits" or "no_sharing"), alternated
    iteration by iteration so that load from other jobs on a shared machine hits both alike. "fp32": `cfg` has
    cpu_bf16 set and the baseline is the same update without it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    real = train.token_logprobs
    ours, base = [], []
    for i in range(warmup + iters):
        t = one_update(model, opt, samples, cfg, d)
        if i >= warmup:
            ours.append(t)
        if baseline:
            if baseline == "full_logits":
                train.token_logprobs = full_logits_logprobs
            try:
                plain = dataclasses.replace(cfg, share_prefix=baseline != "no_sharing", cpu_bf16="false")
                t = one_update(model, opt, samples, plain, d)
            finally:
                train.token_logprobs = real
            if i >= warmup:
                base.append(t)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return med(ours), (med(base) if base else None)


def main(a: Args) -> None:
    d = train.setup_distributed(a.device)
    cuda = d.device.type == "cuda"
    default = ["qwen2.5-0.5b", "qwen2.5-1.5b"] if cuda else ["tiny", "smollm2-135m"]
    shapes = a.shapes.split(",") if a.shapes else default
    seq = a.seq or (4096 if cuda else 256)
    n = a.n_seqs or (8 if cuda else 4)
    budget = a.micro_tokens or 2 * seq
    cfg = train.Config(micro_tokens=budget, loss_agg="token-mean", grad_clip=1.0,
                       cpu_bf16="true" if a.cpu_bf16 else "false")
    dev_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {dev_name} | torch {torch.__version__} | {n} trajectories x {seq} tokens | micro-batch budget "
          f"{budget} tokens | checkpointing {a.checkpointing} | cpu_bf16 {a.cpu_bf16}")
    for shape in shapes:
        model, mcfg = build(shape, d, a.checkpointing)
        samples = make_samples(n, seq, mcfg.vocab_size, a.group, a.prompt)
        tokens = n * seq
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        baseline = ("no_sharing" if a.group > 1 else "full_logits") if a.baseline and not cuda else ""
        if a.cpu_bf16 and a.baseline and not cuda:
            baseline = "fp32"
        t, tb = time_updates(model, samples, cfg, d, a.iters, a.warmup, baseline)
        line = f"{shape:<14} params {mcfg.n_params / 1e6:8.1f} M | update {t * 1e3:9.1f} ms | {tokens / t:10.0f} tok/s"
        if cuda:
            mfu = 6 * mcfg.n_params * tokens / t / a.peak_flops
            line += f" | MFU {100 * mfu:5.1f}% | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        elif tb is not None:
            line += f" | {baseline} baseline {tokens / tb:10.0f} tok/s | speedup_vs_{baseline} {tb / t:.3f}"
        print(line, flush=True)
        del model


if __name__ == "__main__":
    main(parse_config(Args, sys.argv[1:]))
