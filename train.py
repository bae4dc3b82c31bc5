"""Train a deep research agent with GRPO: rollouts in a (local or real) web, F1 rewards, a clipped policy update.

Each step runs `rollout.rollout` on `batch_size` questions (rank r takes every world-th one), `group_size` trajectories
each; scores them with `reward.reward` on the policy's own turn texts (-1 format error, else word-set F1); turns the
rewards into group advantages and takes clipped policy-gradient steps on the sampled tokens; logs one line,
metrics.jsonl, a few full trajectories and reward.png; saves a checkpoint every `save_every` steps.

The objective (all choices are config keys). For a question q, G trajectories o_1..o_G with rewards r_i:
    A_i   = r_i - mean(r)                                  (norm_adv_by_std=False, Dr.GRPO)
    A_i   = (r_i - mean(r)) / (std(r) + 1e-6)              (norm_adv_by_std=True, GRPO; std unbiased as in verl)
    G = 1: mean 0 and std 1, so A_i = r_i                  (verl's compute_grpo_outcome_advantage for a singleton)
A trajectory that the web or the engine ended (end_reason tool_failure / engine_error) is out of the loss and of
its group's mean and std (mask_tool_failures=True); a group left with fewer than 2 is skipped.
For every token t that the policy sampled (loss_mask 1; prompt, tool observations and padding are 0):
    rho_t = exp(logp_theta(t) - logp_old(t))               (logp_old from a training forward before the update)
    pg_t  = max(-A_i rho_t, -A_i clip(rho_t, 1 - clip_low, 1 + clip_high))       (clip-higher when they differ)
    kl_t  = clamp(exp(ref_t - logp_t) - (ref_t - logp_t) - 1, -10, 10)           (low_var_kl / k3; only kl_coef>0)
    l_t   = pg_t + kl_coef * kl_t - entropy_coef * H_t     (H_t: entropy of the policy's next-token distribution)
aggregated over a mini-batch (sums taken over all ranks and micro-batches, so the result does not depend on how
the batch is split; "sequences" are those with at least one sampled token, as in verl):
    loss_agg="seq-mean-token-mean"      mean over sequences of (mean over that sequence's tokens)      (GRPO paper)
    loss_agg="token-mean"               sum over all tokens / number of tokens                 (DAPO; verl default)
    loss_agg="seq-mean-token-sum-norm"  sum over sequences of (token sum / loss_agg_const) / number of sequences
                                        (the Dr.GRPO paper's 1/G and current verl; verl 0.3-0.4's agg_loss divided
                                        by the constant only, a loss (number of sequences) times larger)
With kl_coef == 0 the frozen reference model is not even loaded. Logits are divided by the sampling temperature
before the log-softmax, so logp_theta is the distribution the sampler drew from.

Departures from the paper / the reference implementation (verl + vLLM + Ray)
- One process per GPU (torchrun); our own KV-cached engine (rollout.py), not vLLM, generates inside the training
  process on the policy unsharded once per rollout (not per decoded token); no Ray, no weight re-sync between engines.
- The update trains on the exact token ids the sampler produced (the reference re-rendered text and re-tokenised).
- logp_old is recomputed by a training forward when there are several mini-batches or epochs; with one of each
  (the default) the update is exactly on-policy and logp_old = logp_theta.detach() (ratio 1, no extra forward).
- loss_agg default "token-mean", a global token mean over the mini-batch; the paper states GRPO's sequence-mean;
  both, and Dr.GRPO's constant, are switches. The reference's verl computed neither: it weighted each micro-batch's
  token mean equally, so a token's weight depended on how many tokens shared its micro-batch. Optional filtering of
  zero-variance groups (DAPO, without resampling). The paper does not state its mini-batch size: one update per step.
- Search back ends: Serper (the paper), SearxNG or the embedded offline web (the default); the reading agent is an
  OpenAI-compatible LLM (the paper) or a local extractive reader (`reader=extract`, the CPU default).
- Checkpoints are torch.distributed.checkpoint shards (+ an HF export per step), written atomically.
- The reward reads only the policy's own turns (reward.py); the reference's format check also read web text.
- Trajectories that the web or the engine ended are out of the loss (`mask_tool_failures`, above); the reference
  trained on them (its failed searches became observations). Counts per end reason are logged every step.
- The default run (no preset) is ours, not the paper's: SmolLM2-135M-Instruct on a CPU, 4 questions x 8, 25 steps,
  lr 1e-5, temperature 0.7, no KL, a 30-token system prompt, one worked example as chat turns before the question
  (`example`: an unrelated question, its real search, its answer; without it a 135M model never writes an `<answer>`
  tag, see the README) and turn 1 forced to open with `<search>` (loss-masked); up to 3 turns, top-3 results, turns
  of at most 24 tokens. `--preset=deepresearcher` is the paper's recipe (n_slots, micro_tokens: see PRESETS).
The step line's metrics (also in metrics.jsonl) are listed in the README.

How to run
    python train.py                                                   # CPU: SmolLM2-135M-Instruct, local web
    python train.py --preset=tiny --steps=3                           # tiny random model, seconds per step
    python train.py --preset=deepresearcher --dry_run=True            # memory per GPU before launching
    torchrun --standalone --nproc_per_node=2 train.py --preset=tiny --steps=2          # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 train.py --preset=deepresearcher         # one 8-GPU node (NCCL)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --preset=deepresearcher --out_dir=/shared/fs/run1                    # multi-node, shared out_dir
    python train.py --preset=tiny --resume=True                       # continue from the latest checkpoint
    python train.py --preset=tiny --resume=runs/train-tiny/ckpt/step_000002   # ... or from a given one
    python train.py --preset=tiny --overwrite=True                    # out_dir holds a run: delete it, start again
Any Config field can be overridden with --key=value; unknown keys are rejected with the closest matches.

What it deliberately does not do: value models / GAE, reward models, sequence packing across trajectories,
tensor or pipeline parallelism, asynchronous (off-policy) rollouts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import shlex
import shutil
import tempfile
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoTokenizer

# the agent (module-level names: tests swap in fakes with monkeypatch.setattr(train, "rollout", ...))
from browse import BrowseConfig, Browser
from data.config import parse_config, subconfig
from data.prepare import load_examples
from data.models import memory_per_gpu, resolve_model
from model import ModelConfig, Transformer, save_pretrained
from reward import reward
from rollout import END_REASONS, RolloutConfig, rollout

ROOT = Path(__file__).resolve().parent
# DCP on one process warns that it "assumes" no process group: as intended, so not every checkpoint says it
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# ----------------------------------------------------------------------------------------------------------------
# Config: the agent's fields are declared once (AgentConfig) and shared with eval.py, whose Config inherits them

@dataclass
class AgentConfig:
    """The policy, its agent loop and its web: what train.py and eval.py share. Defaults are the embedded offline run;
    `subconfig` passes the fields to rollout.RolloutConfig and browse.BrowseConfig by name."""
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id, local HF folder, or "tiny" (data/models.py)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    # agent (rollout.RolloutConfig)
    protocol: str = "tags"          # tags | dr
    max_turns: int = 3              # the policy decides after each search: search again or answer
    max_new_tokens: int = 24        # per turn: a query or a short answer
    max_len: int = 1024             # context per trajectory
    temperature: float = 0.7        # the paper: 1.0; a 135M model at 1.0 mostly writes noise
    top_p: float = 1.0
    n_slots: int = 32               # concurrent rows in the rollout engine, per rank
    on_bad_call: str = "error_observation"  # or "end": a malformed tool call ends the trajectory (the reference)
    prompt: str = "short"           # system prompt: reference (the paper's) | short (~30 tokens, small models)
    turn_prefixes: str = "<search>"  # forced text opening turns 1, 2, ... (comma-separated; "" = none)
    turn_prefix_every: str = ""     # forced text opening EVERY turn, before turn_prefixes (the reference: <think>)
    example: str = "What is the capital of Norway?|capital of Norway|Oslo"  # a worked example before the question:
    #                                 "question|query|answer", its search run live ("" = none, the reference)
    date: str = ""                  # date in the system prompt ("" = today); fixed in tests for reproducibility
    # search and reading (browse.BrowseConfig)
    backend: str = "local"          # local | serper | searxng
    top_k: int = 3                  # results per query (the paper: 10)
    corpus: str = ""                # local back end's corpus ("" = the embedded default)
    cache: str = ""                 # SQLite search/page cache ("" = none)
    cache_mode: str = "replay_or_live"
    reader: str = "extract"         # extract | llm
    snippet_chars: int = 200        # characters of each search result's snippet the policy sees
    page_chars: int = 1500          # information a reader returns per page per call
    obs_chars: int = 1000           # the whole observation
    llm_base_url: str = ""          # reading agent's OpenAI-compatible endpoint (reader=llm)
    llm_model: str = ""


@dataclass
class Config(AgentConfig):
    data: str = "data/qa_train.jsonl"  # .jsonl / .parquet (data/prepare.py schema)
    out_dir: str = "runs/train"
    # steps and batch
    steps: int = 25                 # 24 min on 2 idle CPU cores (README)
    batch_size: int = 4             # questions per step, over all ranks (divisible by world size)
    group_size: int = 8             # trajectories per question (G); 8 gives most groups a reward spread
    # optimisation
    lr: float = 1e-5                # 135M model, few dozen steps; the paper's 1e-6 is in the deepresearcher preset
    warmup_steps: int = 0           # linear warm-up, then constant (the paper: constant)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    # loss (see the module docstring)
    clip_low: float = 0.2
    clip_high: float = 0.2          # > clip_low = DAPO's clip-higher (e.g. 0.28)
    loss_agg: str = "token-mean"    # seq-mean-token-mean (GRPO) | token-mean (DAPO) | seq-mean-token-sum-norm (Dr.GRPO)
    loss_agg_const: float = 0.0     # Dr.GRPO's constant; 0 = max_turns * max_new_tokens
    norm_adv_by_std: bool = True
    filter_groups: bool = False     # drop groups whose rewards are all equal (they carry no signal)
    mask_tool_failures: bool = True  # a trajectory ended by a web/engine failure is out of the loss and its group
    kl_coef: float = 0.0            # k3 (low_var_kl) to the initial model; 0 = no reference model in memory
    entropy_coef: float = 0.0
    n_minibatches: int = 1          # optimizer steps per batch and epoch
    ppo_epochs: int = 1
    micro_tokens: int = 4096        # tokens computed in one forward/backward, per rank (a default group fits one)
    share_prefix: bool = True       # a group's prompt is computed once per micro-batch in the update (same loss)
    # runtime
    activation_checkpointing: bool = True  # keep each block's input only (~1.5 MB/token less for 135M, +1 forward)
    cpu_offload: bool = False       # FSDP2 CPUOffloadPolicy: sharded params, grads and Adam state live on the CPU
    export_dtype: str = "auto"      # HF export: auto (bf16 on GPU, fp32 on CPU: see export_hf) | float32 | bfloat16
    # checkpoints and logging
    save_every: int = 5             # steps; a final checkpoint is always written
    keep_last: int = 1              # step folders kept (each 2.2 GB for 135M params: fp32 weights + Adam + HF export)
    resume: str = ""                # "" = new run; true/auto = newest intact checkpoint in out_dir; or a step folder
    overwrite: bool = False         # delete out_dir's earlier run (metrics, checkpoints, rollouts) instead of refusing
    n_log_rollouts: int = 2         # full trajectories dumped per step to rollouts/step_NNNNNN.jsonl
    plot_every: int = 3             # reward.png every N steps (and at the end)
    min_entropy: float = 1e-3       # mean token entropy below this for 3 steps in a row = collapse: stop
    wandb_project: str = ""         # "" = off; imported lazily
    eval_every: int = 5             # greedy dev F1 on `eval_n` fixed dev questions every N steps (0 = off)
    eval_data: str = "data/qa_dev.jsonl"
    eval_n: int = 64
    dry_run: bool = False           # print the per-GPU memory estimate and exit
    world_size: int = 0             # dry run only: world size to estimate for (0 = the current one)


# The paper's agent and web, shared by train.py's and eval.py's deepresearcher presets. As the reference: a
# malformed call ends the trajectory (-1); every turn opens with <think>; a search shows all 3 queries x 10 results:
# one result is <= ~480 characters (rank, title ~70, URL ~100, snippet 300), so 3 x 10 need ~14.5k characters (~4k
# tokens; the reference's example observation is 13 KB). Three such observations plus the turns fit in 32k tokens;
# a trajectory that needs more ends as "context_limit".
DEEPRESEARCHER_AGENT = dict(model="Qwen/Qwen2.5-7B-Instruct", protocol="dr", max_turns=10, max_new_tokens=2000,
                            max_len=32768, backend="serper", prompt="reference", turn_prefixes="",
                            turn_prefix_every="<think>", on_bad_call="end", example="", top_k=10,
                            snippet_chars=300, obs_chars=15000, reader="llm")

# Named overrides of the defaults. The default itself is the embedded offline run (CPU, no internet).
PRESETS: dict[str, dict] = {
    # tiny random model + local search: the whole loop in seconds per step (tests, smoke runs)
    "tiny": dict(model="tiny", out_dir="runs/train-tiny", steps=3, batch_size=4, group_size=2, max_turns=2,
                 max_new_tokens=16, max_len=1024, n_slots=8, lr=1e-3, date="2025-01-01", save_every=2,
                 micro_tokens=4096, plot_every=1, temperature=1.0, eval_every=3, eval_n=4),
    # the paper's recipe on one or more 8-GPU nodes (weight decay 0.01, grad clip 1.0, clip 0.2 are the defaults).
    # n_slots: the paged KV cache (56 KiB/token for the 7B) holds ~94 rows of 8k tokens per 80 GiB GPU next to the
    # weights and sharded states (23 at the full 32k; an H200 ~210 / 53); `--dry_run=True` prints these numbers.
    "deepresearcher": dict(DEEPRESEARCHER_AGENT, data="data/train.jsonl", out_dir="runs/deepresearcher", steps=100,
                           batch_size=256, group_size=16, n_slots=80, temperature=1.0, lr=1e-6, kl_coef=0.001,
                           entropy_coef=0.001, micro_tokens=8192, save_every=10),
}


# ----------------------------------------------------------------------------------------------------------------
# Start-up checks: bad input stops here with one line that says what to do, before any model loads. eval.py reuses
# `validate` for the fields it shares (a check applies when the config has that field).

# field -> smallest allowed value: the loop divides by some and ranges over others (0 = off for the optional ones)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # see the module docstring
_MINIMUM = dict(steps=1, group_size=2, batch_size=1, max_turns=1, max_new_tokens=1, max_len=2, n_slots=1,
                micro_tokens=1, save_every=1, keep_last=1, n_minibatches=1, ppo_epochs=1, top_k=1, limit=0,
                warmup_steps=0, plot_every=0, temperature=0, lr=0, kl_coef=0, entropy_coef=0, grad_clip=0)


def check_model(name: str) -> None:
    """A local model folder must exist and hold config.json (else resolve_model would report a hub failure)."""
    p = Path(name).expanduser()
    if name == "tiny" or (p / "config.json").exists():
        return
    if (p / "hf" / "config.json").exists():
        raise SystemExit(f"--model={name}: that is a training checkpoint; its Hugging Face folder is {p / 'hf'}")
    if p.exists() or name.startswith(("/", ".", "~")) or name.count("/") >= 2:  # a folder, not "org/name"
        raise SystemExit(f"--model={name}: {p} {'has no config.json' if p.exists() else 'does not exist'}; pass a "
                         f"Hugging Face checkpoint folder (e.g. runs/train/ckpt/step_000006/hf) or a hub id like "
                         f"HuggingFaceTB/SmolLM2-135M-Instruct")


def validate(cfg) -> None:
    """Every start-up check on a Config (train.py's or eval.py's): numbers in range, the model folder, the data
    file (read and parsed: empty, malformed or question-less rows stop here), out_dir writable."""
    for key, low in _MINIMUM.items():
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not v >= low:  # `not >=` also catches NaN
            why = "GRPO compares each trajectory with the others of its question, so a group needs at least 2; " \
                if key == "group_size" else ""
            raise SystemExit(f"--{key}={v}: must be at least {low}; {why}e.g. --{key}={getattr(type(cfg)(), key)}")
    if getattr(cfg, "loss_agg", "token-mean") not in LOSS_AGGS:
        raise SystemExit(f"--loss_agg={cfg.loss_agg}: use one of {', '.join(LOSS_AGGS)}")
    if getattr(cfg, "dry_run", False):  # an estimate needs neither the data nor the weights
        return
    check_model(cfg.model)
    load_questions(cfg.data)  # raises SystemExit with the file, the line and what to fix
    try:  # a read-only or missing mount fails here, not at the first save
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out_dir).close()
    except OSError as e:
        raise SystemExit(f"--out_dir={cfg.out_dir}: cannot write there ({e.strerror or e}); "
                         f"pass --out_dir=<a folder you can write to>") from None


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them we are a single process.

@dataclass
class Dist:
    """This process's place in the job (`proc` below)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Process group (NCCL on GPU, gloo on CPU) when launched by torchrun; a plain single process otherwise."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but CUDA is not available")
    torchrun = "RANK" in os.environ
    if not (torchrun or use_cuda):
        return Dist()  # a plain CPU process: no process group, no FSDP
    rank, world, local = [int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] if torchrun else [0, 1, 0]
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    elif not dist.is_initialized():  # one GPU without torchrun: a 1-rank group anyway, so FSDP2's bf16 as on 8 GPUs
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _is_dist():
        dist.barrier()


def all_reduce_dict(values: dict[str, float], op: str = "sum", proc: Dist | None = None) -> dict[str, float]:
    """Reduce named floats over ranks in one collective (float64, so sums of counts stay exact)."""
    if not _is_dist():
        return {k: float(v) for k, v in values.items()}
    device = (proc or Dist()).device if dist.get_backend() == "nccl" else "cpu"  # gloo reduces on the CPU
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return dict(zip(values, t.tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Model: load, shard with FSDP2, unshard for rollouts

def fsdp_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def build_model(path: str, cfg: Config, proc: Dist, trainable: bool = True):
    """Load an HF checkpoint (fp32 master weights) and, when distributed or on GPU, shard it with FSDP2. Rank 0 reads
    the weights; the other ranks build on the meta device and receive their shards by broadcast, so the job holds
    one full host copy in all, not one per GPU."""
    if not _is_dist():
        model = Transformer.from_pretrained(path, dtype=torch.float32, device=proc.device)
    else:
        full_sd = Transformer.from_pretrained(path, dtype=torch.float32, device="cpu").state_dict() if proc.main else {}
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_json(path))
        apply_fsdp(model, proc, cfg.cpu_offload)
        set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full_sd
    model.gradient_checkpointing = cfg.activation_checkpointing and trainable
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def apply_fsdp(model, proc: Dist, cpu_offload: bool = False):
    """FSDP2 in place: each transformer block is one all-gather unit, the root holds the rest; then allocate the
    local shards (a model built on the meta device gets uninitialised storage: load or init it afterwards)."""
    kw = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    if proc.device.type == "cuda":  # fp32 master weights, bf16 compute, fp32 gradient reduction
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, **kw)
        block.fsdp_reshard_after_forward = True  # FSDP2's default for a non-root group; `unsharded` restores it
    fully_shard(model, **kw)  # the root group: embeddings, final norm and (tied or not) lm_head
    # FSDP2 keeps the root's parameters after forward (its lazy init sets False: they are needed again at once for
    # backward); recorded because the module offers no public getter and `unsharded` must put it back
    model.fsdp_reshard_after_forward = False
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu" if cpu_offload else proc.device)
        if model.config.tie_word_embeddings:  # keep one parameter under both names
            model.lm_head.weight = model.model.embed_tokens.weight
    return model


@contextlib.contextmanager
def unsharded(model):
    """All-gather every FSDP group once and keep them gathered for the whole rollout (else every decoded token would
    all-gather every layer), eval mode and no autograd inside; on exit reshard, and each group gets back its own
    setting (recorded by apply_fsdp; FSDP2's defaults otherwise: the root False, others True)."""
    mods = fsdp_modules(model)
    before = [getattr(m, "fsdp_reshard_after_forward", m is not model) for m in mods]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        for m, prev in zip(mods, before):
            m.reshard()
            m.set_reshard_after_forward(bool(prev), recurse=False)


# ----------------------------------------------------------------------------------------------------------------
# Data: a fixed permutation per epoch, a global cursor, rank r takes every world-th question of the batch

def load_questions(path: str) -> list[dict]:
    """[{question, answers}] from a data file (data/prepare.py's reader); a relative path not found here is taken
    from the repository (`torchrun train.py` from another folder)."""
    p = Path(path) if Path(path).is_absolute() or Path(path).exists() else ROOT / path
    if not path or not p.is_file():
        raise SystemExit(f"--data={path}: file not found; build one with the scripts in data/ "
                         f"(data/qa_train.jsonl is the offline default)")
    try:
        rows = load_examples(p)
    except (ValueError, OSError) as e:  # malformed JSON, a row without a question, an unreadable file
        raise SystemExit(f"--data={path}: {e}") from None
    if not rows:
        raise SystemExit(f"--data={path}: {p} holds no questions; point --data at a JSONL file with one "
                         f'{{"question": ..., "answers": [...]}} per line')
    return [{"question": e["question"], "answers": e["answers"]} for e in rows]


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the questions of global step `step`: epochs are seeded permutations, read in order. A pure
    function of (n, step, batch, seed), so the data position after a resume is exact by construction."""
    def perm(epoch: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [int(perm(pos // n)[pos % n]) for pos in range(step * batch_size, (step + 1) * batch_size)]


def rng_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the generator used at (seed, step, rank): distinct streams, reproducible after a resume."""
    return (seed * 1_000_003 + step) * 65_537 + rank


# ----------------------------------------------------------------------------------------------------------------
# Advantages and the loss. Pure functions of tensors; they never modify their inputs.

INFRA_END_REASONS = ("tool_failure", "engine_error")  # trajectories ended by the web or the engine, not the policy


def group_advantages(rewards: torch.Tensor, group_size: int, norm_by_std: bool = True, eps: float = 1e-6,
                     valid: torch.Tensor | None = None):
    """rewards (N,) question-major (G consecutive per question) -> advantages (N,), as in the module docstring (a
    singleton's mean is 0 and std 1, as verl). valid (N,) bool: rows to score (e.g. not ended by a web failure); the
    others get 0 and leave their group's mean and std; a group left with fewer than 2 valid rows gets 0 throughout."""
    r = rewards.reshape(-1, group_size).to(torch.float32)  # (Q, G)
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.reshape(-1, group_size).bool()  # (Q, G)
    if group_size == 1:
        a = r / (1.0 + eps) if norm_by_std else r
        return torch.where(v, a, torch.zeros_like(a)).reshape(-1)
    n = v.sum(dim=1, keepdim=True)  # (Q, 1)
    zero = torch.zeros_like(r)
    mean = torch.where(v, r, zero).sum(dim=1, keepdim=True) / n.clamp(min=1)  # (Q, 1)
    a = r - mean
    if norm_by_std:
        var = torch.where(v, a * a, zero).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)  # unbiased
        a = a / (var.sqrt() + eps)
    return torch.where(v & (n >= 2), a, zero).reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) rewards -> (Q,) bool: every (valid) trajectory of the question got the same reward (advantage 0)."""
    r = rewards.reshape(-1, group_size)  # (Q, G)
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.reshape(-1, group_size).bool()
    first = torch.where(v, r, torch.full_like(r, float("inf"))).min(dim=1, keepdim=True).values  # (Q, 1)
    return ((r == first) | ~v).all(dim=1)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, loss_agg="token-mean",
                ref_logp=None, kl_coef=0.0, entropy=None, entropy_coef=0.0, agg_const=1.0, norm=None):
    """The clipped GRPO surrogate on masked tokens, aggregated; returns (loss, stats).
    logp, old_logp, ref_logp, entropy, mask: (B, T); advantages: (B,). Only positions with mask 1 count, and
    `torch.where` (not a multiplication) keeps even inf/NaN at mask-0 positions out of the value and the gradient.
    norm: the denominator (tokens for token-mean, sequences with at least one sampled token otherwise) summed
    over the whole mini-batch on every rank; None = this call's own count (a plain mean).
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(m, logp, zero)
    old = torch.where(m, old_logp.to(logp.dtype), zero)
    adv = advantages.to(logp.dtype)[:, None]  # (B, 1)
    log_ratio = (logp - old).clamp(-20.0, 20.0)  # as verl: exp() of a huge drift would overflow
    ratio = torch.exp(log_ratio)  # (B, T)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_tok = torch.maximum(pg1, pg2)  # pessimistic bound: the clipped term wins when it is larger
    stats = {"clipped": ((pg2 > pg1) & m).detach(), "ratio": ratio.detach()}  # clipped: tokens where the clip is active
    if kl_coef > 0:
        ref_diff = torch.where(m, ref_logp.to(logp.dtype), zero) - logp  # log(pi_ref / pi_theta) per token
        kl = (torch.exp(ref_diff) - ref_diff - 1.0).clamp(-10.0, 10.0)  # k3: unbiased, non-negative, low variance
        per_tok = per_tok + kl_coef * kl
        stats["kl"] = kl.detach()
    if entropy_coef > 0:
        per_tok = per_tok - entropy_coef * torch.where(m, entropy, zero)
    per_tok = torch.where(m, per_tok, zero)
    n_tok = m.sum(dim=1)  # (B,)
    total = {"token-mean": per_tok.sum(), "seq-mean-token-mean": (per_tok.sum(dim=1) / n_tok.clamp(min=1)).sum(),
             "seq-mean-token-sum-norm": (per_tok.sum(dim=1) / agg_const).sum()}[loss_agg]
    if norm is None:  # tokens for token-mean; else, as verl, the sequences with at least one sampled token
        norm = (n_tok.sum() if loss_agg == "token-mean" else (n_tok > 0).sum()).clamp(min=1)
    return total / norm, stats


def token_logprobs(model, tokens, mask, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = True, prefix: int = 0):
    """Per-token log-probs of `tokens[:, 1:]` under the model, only where `mask[:, 1:]` is 1.
    tokens, mask: (B, T). Returns logp (B, T-1) and entropy (B, T-1) or None, zero where the mask is 0. Logits are
    computed only at the sampled positions (`logits_at`), which is most of the memory saved on long observations.
    prefix: the first `prefix` tokens are the same in every row; the model computes them once."""
    tgt_mask = mask[:, 1:].bool()  # (B, T-1): token t+1 is predicted from position t
    k = max(int(tgt_mask.sum(dim=1).max()), 1)
    # time indices of the masked positions, packed left, padded with 0 (their results are discarded below)
    order = torch.sort((~tgt_mask).to(torch.int8), dim=1, stable=True).indices[:, :k]  # (B, K)
    valid = torch.gather(tgt_mask, 1, order)  # (B, K)
    logits = model(tokens[:, :-1], logits_at=order, prefix=prefix).float()  # (B, K, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, K, V); its backward needs only this output
    del logits
    tgt = torch.gather(tokens[:, 1:], 1, order)  # (B, K)
    lp = torch.gather(logp_all, 2, tgt[:, :, None]).squeeze(-1)  # (B, K)
    ent = None
    if with_entropy:  # without entropy_grad it is only logged: no autograd graph over another (B, K, V) tensor
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            ent = -(logp_all.exp() * logp_all).sum(dim=-1)  # (B, K)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    base = torch.zeros_like(tgt_mask, dtype=lp.dtype, device=lp.device)  # (B, T-1); scatter() returns a filled copy
    ent = None if ent is None else base.scatter(1, order, torch.where(valid, ent, zero))
    return base.scatter(1, order, torch.where(valid, lp, zero)), ent


# ----------------------------------------------------------------------------------------------------------------
# The update: mini-batches (optimizer steps) of micro-batches (forward/backward within a token budget)

@dataclass
class Sample:
    """One trajectory as the update sees it."""
    tokens: list[int]
    loss_mask: list[int]
    advantage: float
    old_logp: torch.Tensor | None = None  # (T-1,) set before the update when needed
    sampler_logp: list[float] | None = None  # the engine's log-probs (same length as tokens), for a diagnostic
    ref_logp: torch.Tensor | None = None  # (T-1,)


def prompt_length(s: Sample) -> int:
    """Tokens before the position that predicts the first sampled token: a GRPO group's rows agree on them."""
    return next((t for t in range(1, len(s.loss_mask)) if s.loss_mask[t]), len(s.tokens)) - 1


def micro_batches(samples: list[Sample], budget: int, share: bool = True) -> list[tuple[list[int], int]]:
    """Split samples into forward/backward passes: (indices, P), where the P first tokens are the same in every row
    and are computed once (a group's prompt; P = 0 without `share`). A pass computes P + rows x (longest - P) <=
    budget tokens (a longer single row goes alone). Longest first keeps padding small; the order within a
    mini-batch does not change the result."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.tokens[:prompt_length(s)]) if share else (), []).append(i)
    out = []
    for prompt, rows in groups.items():
        rows.sort(key=lambda i: -len(samples[i].tokens))
        P, cur = len(prompt), []
        for i in rows:
            if cur and P + (len(cur) + 1) * (len(samples[cur[0]].tokens) - P) > budget:
                out.append((cur, P if len(cur) > 1 else 0))
                cur = []
            cur.append(i)
        out.append((cur, P if len(cur) > 1 else 0))
    return out


def collate(samples: list[Sample], device, pad_id: int = 0):
    """Right-padded (B, T) tokens and mask; old/ref/sampler logps padded to (B, T-1) (None when a sample has none:
    target t+1 at index t, as token_logprobs); advantages (B,)."""
    T = max(len(s.tokens) for s in samples)

    def pad(rows, width, dtype=torch.float32, fill=0):
        if any(r is None for r in rows):
            return None
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, r in enumerate(rows):
            r = torch.as_tensor(r, dtype=dtype)[:width]
            out[i, : len(r)] = r
        return out.to(device)

    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device)
    sampler = pad([None if s.sampler_logp is None else s.sampler_logp[1:] for s in samples], T - 1)
    return (pad([s.tokens for s in samples], T, torch.long, pad_id), pad([s.loss_mask for s in samples], T, torch.long),
            adv, pad([s.old_logp for s in samples], T - 1), pad([s.ref_logp for s in samples], T - 1), sampler)


@torch.no_grad()
def fill_logprobs(model, samples: list[Sample], cfg: Config, proc: Dist, attr: str, only=None) -> list[Sample]:
    """New Samples with `attr` (old_logp / ref_logp) from a no-grad forward of `model`, in micro-batches; `only`: the
    indices of the samples that need it (default all), the others are returned unchanged."""
    out = list(samples)
    todo = list(range(len(samples))) if only is None else list(only)
    groups = [([todo[k] for k in g], P) for g, P in micro_batches([samples[i] for i in todo], cfg.micro_tokens,
                                                                   cfg.share_prefix)]
    for j in range(int(all_reduce_dict({"n": len(groups)}, "max", proc)["n"])):
        if j >= len(groups):
            model(torch.zeros((1, 2), dtype=torch.long, device=proc.device))  # keep FSDP's collectives in step
            continue
        idx, P = groups[j]
        tok, msk = collate([samples[i] for i in idx], proc.device)[:2]
        lp, _ = token_logprobs(model, tok, msk, cfg.temperature or 1.0, prefix=P)
        for row, i in enumerate(idx):
            out[i] = replace(samples[i], **{attr: lp[row, : len(samples[i].tokens) - 1].float().cpu()})
    return out


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up over `warmup_steps`, then constant (the paper's schedule is constant 1e-6)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr


def update(model, optimizer, samples: list[Sample], cfg: Config, proc: Dist, step: int, ref_model=None,
           show_progress: bool = True) -> dict:
    """Policy-gradient steps on this rank's samples; every rank calls it, even with no samples. Returns metrics."""
    multi = cfg.n_minibatches * cfg.ppo_epochs > 1
    # With no KL and no entropy term, a trajectory with advantage exactly 0 (e.g. its whole group got the same
    # reward) adds exactly 0 to the loss and its gradient: it still counts in the denominators below, but its
    # forward/backward is skipped. Early in training most groups are like that, so this is most of the time saved.
    skip_zero = cfg.kl_coef == 0 and cfg.entropy_coef == 0
    active = [i for i, s in enumerate(samples) if not (skip_zero and s.advantage == 0.0)]
    if multi:  # the policy moves between mini-batches: freeze logp_old with a training forward first
        samples = fill_logprobs(model, samples, cfg, proc, "old_logp", only=active)
    if cfg.kl_coef > 0:
        samples = fill_logprobs(ref_model, samples, cfg, proc, "ref_logp")
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, cfg)
    const = cfg.loss_agg_const or float(cfg.max_turns * cfg.max_new_tokens)
    sums = dict(loss=0.0, entropy=0.0, kl=0.0, clipfrac=0.0, ratio=0.0, tokens=0.0, logp_diff=0.0, diff_tokens=0.0)
    grad_norms, nb = [], cfg.n_minibatches
    bar = tqdm(total=0, desc="update", unit="micro-batch", leave=False, disable=not (proc.main and show_progress))
    for epoch in range(cfg.ppo_epochs):
        for mb in range(nb):
            part = samples[mb * len(samples) // nb: (mb + 1) * len(samples) // nb]
            # the denominators are over the whole mini-batch on all ranks, so micro-batching and sharding do not
            # change the loss (verl: sequences with no sampled token do not count); FSDP averages gradients over
            # ranks, hence the factor `world` below
            n = all_reduce_dict({"tokens": sum(sum(s.loss_mask[1:]) for s in part),
                                 "seqs": sum(1 for s in part if any(s.loss_mask[1:]))}, "sum", proc)
            if n["tokens"] == 0:  # nothing to learn from on any rank (e.g. every group filtered): no step at all,
                continue          # so neither weight decay nor Adam's moments move on an empty batch
            norm = n["tokens"] if cfg.loss_agg == "token-mean" else n["seqs"]
            work = [s for s in part if not (skip_zero and s.advantage == 0.0)]
            groups = micro_batches(work, cfg.micro_tokens, cfg.share_prefix)
            n_micro = int(all_reduce_dict({"n": len(groups)}, "max", proc)["n"])
            if n_micro == 0:  # every trajectory on every rank has advantage 0: nothing to apply, not even decay
                continue
            bar.total += n_micro
            bar.refresh()
            for j in range(n_micro):
                bar.update()
                if j >= len(groups):  # fewer micro-batches than another rank: still join FSDP's collectives
                    tok = torch.zeros((1, 2), dtype=torch.long, device=proc.device)
                    (model(tok, logits_at=tok[:, :1]).sum() * 0.0).backward()  # a zero-loss pass
                    continue
                rows, P = groups[j]
                tok, msk, adv, old, ref, engine = collate([work[i] for i in rows], proc.device)
                logp, ent = token_logprobs(model, tok, msk, cfg.temperature or 1.0, with_entropy=True,  # greedy: T=1
                                           entropy_grad=cfg.entropy_coef > 0, prefix=P)
                old = old if multi else logp.detach()
                loss, st = policy_loss(logp, old, adv, msk[:, 1:], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                       loss_agg=cfg.loss_agg, ref_logp=ref, kl_coef=cfg.kl_coef, entropy=ent,
                                       entropy_coef=cfg.entropy_coef, agg_const=const, norm=norm)
                (loss * proc.world).backward()
                m = msk[:, 1:].bool()
                got = dict(loss=loss.detach(), entropy=ent.detach()[m].sum(), clipfrac=st["clipped"].sum(),
                           ratio=st["ratio"][m].sum(), tokens=m.sum(), kl=st["kl"][m].sum() if "kl" in st else 0.0)
                if engine is not None and epoch == 0 and mb == 0:  # large gaps: the sampler is not the policy
                    got.update(logp_diff=(logp.detach() - engine)[m].abs().sum(), diff_tokens=m.sum())
                for k, v in got.items():
                    sums[k] += float(v)
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
            grad_norms.append(float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn))
            if math.isfinite(grad_norms[-1]):  # a NaN/inf gradient is never applied; the caller stops the run
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    bar.close()
    s = all_reduce_dict(sums, "sum", proc)
    t = max(s["tokens"], 1.0)
    # `loss` is per rank already normalised by the global count: its sum over ranks is the mini-batch loss
    return {"loss": s["loss"] / (cfg.n_minibatches * cfg.ppo_epochs), "grad_norm": max(grad_norms, default=0.0),
            **{k: s[k] / t for k in ("entropy", "kl", "clipfrac", "ratio")}, "train_tokens": s["tokens"],
            "finite": all(map(math.isfinite, grad_norms)), "logp_diff": s["logp_diff"] / max(s["diff_tokens"], 1.0)}


# ----------------------------------------------------------------------------------------------------------------
# Run hygiene and checkpoints: out_dir/ckpt/step_NNNNNN/{dcp/, hf/, state.json, rng_rank{r}.pt}, each written to a
# .tmp folder and renamed, so a step folder is complete or absent. --resume continues from one, --overwrite deletes
# the earlier run; without either, out_dir must not hold one (its metrics would be appended to).

RUN_OUTPUTS = ("metrics.jsonl", "ckpt", "rollouts", "reward.png", "config.json")  # what --overwrite deletes


def step_folders(cfg: Config) -> list[Path]:
    """Step folders in out_dir, oldest first (`step_000003.tmp` is a save that was killed: never one of them)."""
    return sorted(p for p in (Path(cfg.out_dir) / "ckpt").glob("step_*[0-9]") if p.is_dir())


def latest_checkpoint(cfg: Config) -> Path | None:
    return (step_folders(cfg) or [None])[-1]


def resume_target(cfg: Config) -> str | None:
    """--resume: None (a new run), "auto" (the newest intact checkpoint in out_dir) or a step folder."""
    v = str(cfg.resume).strip()
    if v.lower() in ("", "0", "false", "no", "none"):
        return None
    return "auto" if v.lower() in ("1", "true", "yes", "auto", "latest") else v


def checkpoint_problem(path: Path, rank: int = 0) -> str | None:
    """What is wrong with a step folder, naming the file, or None when it is complete: state.json, the DCP metadata
    and this rank's RNG state read as a resume reads them, and each .distcp shard is as long as the metadata says
    (dcp.load fails on a short one only half way through the load, naming no file)."""
    got = {}
    reads = {path / "state.json": lambda f: int(json.loads(f.read_text())["step"]),
             path / "dcp" / ".metadata": lambda f: got.update(meta=dcp.FileSystemReader(str(f.parent)).read_metadata()),
             path / f"rng_rank{rank}.pt": lambda f: f.exists() and torch.load(f, weights_only=False)}
    for f, read in reads.items():
        try:
            read(f)
        except Exception as e:  # a damaged file fails in many ways (unpickling can raise almost anything)
            return f"{f}: {type(e).__name__}: {e}"
    for info in got["meta"].storage_data.values():  # where each tensor's bytes are: shard file, offset, length
        f, need = path / "dcp" / info.relative_path, info.offset + info.length
        if not f.exists() or f.stat().st_size < need:
            return f"{f}: {f'truncated ({f.stat().st_size} of at least {need} bytes)' if f.exists() else 'missing'}"
    return None


def find_resume_checkpoint(cfg: Config, rank: int = 0, say=print) -> Path | None:
    """The checkpoint --resume continues from: the folder given, or the newest intact one in out_dir (a damaged one
    is named and skipped); None when out_dir has none yet."""
    target = resume_target(cfg)
    if target != "auto":
        if problem := checkpoint_problem(Path(target), rank):
            raise SystemExit(f"--resume={target}: cannot resume from it ({problem}); pass a step folder such as "
                             f"{Path(cfg.out_dir) / 'ckpt' / 'step_000003'}, or --resume=True for the newest")
        return Path(target)
    for i, p in enumerate(reversed(step_folders(cfg))):
        if (problem := checkpoint_problem(p, rank)) is None:
            if i:
                say(f"resuming from the newest intact checkpoint, {p}, instead")
            return p
        say(f"checkpoint {p.name} is damaged: {problem}")
    if step_folders(cfg):
        raise SystemExit(f"no intact checkpoint in {Path(cfg.out_dir) / 'ckpt'} (see above); --overwrite=True "
                         f"starts the run again from step 0")
    return None


def _disk_full(e: BaseException) -> bool:
    """Whether a failed save ran out of disk: ENOSPC in the exception chain (DCP's CheckpointException carries each
    rank's error in its text), or torch's zip writer's way of saying it ("unexpected pos 704 vs 598")."""
    text = "".join(traceback.format_exception(e))
    return any(s in text for s in ("No space left", f"[Errno {errno.ENOSPC}]", "unexpected pos"))


def export_hf(model, tokenizer, path: Path, cfg: Config, proc: Dist) -> None:
    """The Hugging Face folder of a checkpoint (rank 0 writes it). Its dtype with export_dtype=auto is the one the
    policy computed in: bf16 on GPU (FSDP's mixed precision casts the fp32 masters for every forward, so the bf16
    export is the model that sampled), fp32 on a CPU (a bf16 export of the default run rounds most of its update
    away: after 1 step at lr 2e-5, 92% of the changed weights round back to the base model's bf16 value)."""
    # FSDP2: gather full tensors on rank 0 (on the CPU); one process: the parameters themselves, no gathered copy
    full = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if _is_dist() else model.state_dict())
    if model.config.tie_word_embeddings:
        full.pop("lm_head.weight", None)  # the same tensor as the embedding: HF files store it once
    if proc.main:
        auto = torch.bfloat16 if proc.device.type == "cuda" else torch.float32
        dt = auto if cfg.export_dtype == "auto" else getattr(torch, cfg.export_dtype)
        for k in list(full):  # in place, key by key: at most one fp32 tensor and the bf16 export at once
            full[k] = full[k].detach().to(dt)
        save_pretrained(model, path, state_dict=full)
        tokenizer.save_pretrained(path)


def save_checkpoint(model, optimizer, tokenizer, cfg: Config, proc: Dist, step: int, history: list[dict]) -> Path:
    """Sharded model + optimizer (DCP), RNG, step and history, HF export; written to a .tmp folder then renamed, so a
    failed save (a full disk, Ctrl-C) removes its partial folder and leaves the previous checkpoint as it was."""
    final = Path(cfg.out_dir) / "ckpt" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        if proc.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer))), checkpoint_id=str(tmp / "dcp"))
        torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state()
                    if proc.device.type == "cuda" else None}, tmp / f"rng_rank{proc.rank}.pt")
        export_hf(model, tokenizer, tmp / "hf", cfg, proc)
        if proc.main:  # written last: its presence says the folder is complete
            (tmp / "state.json").write_text(json.dumps({"step": step, "data_position": step * cfg.batch_size,
                                                        "world_size": proc.world, "config": asdict(cfg),
                                                        "history": history}))
        barrier()
    except BaseException as e:  # anything, Ctrl-C included: clean up, then let it go on
        if proc.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _disk_full(e):
            prev = latest_checkpoint(cfg)
            raise SystemExit(f"no space left on {final.parent.resolve()} while saving step {step}: removed the "
                             f"partial checkpoint; {f'the previous one, {prev}, is intact' if prev else 'none kept'}"
                             f". Free some space (or --keep_last=1) and run again with --resume=True") from None
        raise
    if proc.main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # the step folder appears complete or not at all
        for old in step_folders(cfg)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, proc: Dist) -> dict:
    """Restore model + optimizer shards in place (any world size: DCP reshards) and RNG; returns state.json."""
    sd = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    dcp.load(sd, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    if (rng := path / f"rng_rank{proc.rank}.pt").exists():  # absent when resuming on more ranks than saved
        r = torch.load(rng, weights_only=False)
        torch.set_rng_state(r["torch"])
        if r["cuda"] is not None and proc.device.type == "cuda":
            torch.cuda.set_rng_state(r["cuda"])
    return json.loads((path / "state.json").read_text())


def start_state(cfg: Config, proc: Dist, model, optimizer, resume_from: Path | None) -> tuple[int, list[dict]]:
    """(first step, history) of a resumed run: what the checkpoint saved, or 0 and [] when out_dir had none yet.
    metrics.jsonl loses the lines of steps that will run again (the run died after logging them, before saving)."""
    state = load_checkpoint(resume_from, model, optimizer, proc) if resume_from else {"step": 0}
    start, history = state["step"], state.get("history", [])
    if proc.main:
        print(f"resumed from {resume_from} at step {start}" if resume_from else
              f"--resume={cfg.resume} but no checkpoint in {Path(cfg.out_dir) / 'ckpt'}: starting from step 0")
        path = Path(cfg.out_dir) / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            path.write_text("".join(ln + "\n" for ln in keep))
    return start, history


# ----------------------------------------------------------------------------------------------------------------
# Logging

def command_line(cfg: Config, script: str = "train.py", **changes) -> str:
    """A `python train.py ...` line that reproduces `cfg` (with `changes`): the options this process was given
    when it was started from the command line, else every field that differs from the defaults."""
    if Path(sys.argv[0]).name == script:
        args = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("-").replace("-", "_") not in changes]
    else:  # called as a function (tests, notebooks): spell the config out
        base = asdict(Config())
        args = [f"--{k}={v}" for k, v in asdict(cfg).items() if v != base[k] and k not in changes]
    args += [f"--{k}={v}" for k, v in changes.items()]
    launcher = "python" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "torchrun <the same launcher options>"
    return " ".join([launcher, script] + [shlex.quote(a) for a in args])


def eval_command(cfg: Config, model: str) -> str:
    """The eval.py line that scores `model` on the offline dev set with this run's agent settings. eval.py's offline
    preset is the AgentConfig defaults, greedy; sampling, seed, device and engine width do not change its answers."""
    base = AgentConfig()
    args = ["--preset=offline", f"--model={model}"] + [
        f"--{f.name}={getattr(cfg, f.name)}" for f in fields(AgentConfig) if getattr(cfg, f.name) != getattr(
            base, f.name) and f.name not in ("model", "temperature", "top_p", "seed", "device", "n_slots")]
    return " ".join(["python eval.py"] + [shlex.quote(a) for a in args])


def plot_rewards(history: list[dict], path: Path) -> None:
    """reward.png: mean reward, F1 and format-error rate per step (matplotlib, no display needed)."""
    import matplotlib  # optional for the loop itself: imported only when a plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("reward", "mean reward"), ("f1", "F1 (training samples)"),
                       ("format_error", "format-error rate")):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", ms=3, label=label)
    dev = [(h["step"], h["dev_f1"]) for h in history if h.get("dev_f1") is not None]
    if dev:  # the learning curve: greedy F1 on a fixed dev subset, measured every eval_every steps
        ax.plot(*zip(*dev), marker="s", ms=5, lw=2, color="black", label="dev F1 (greedy)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def turn_records(traj) -> list[dict]:
    """A trajectory's turns as JSON-ready dicts (eval.py's records use it too)."""
    return [asdict(t) if is_dataclass(t) else dict(t) for t in traj.turns]


def trajectory_record(traj, rew, adv: float, tokenizer) -> dict:
    """A full trajectory as JSON: decoded text, every turn, reward and advantage."""
    return {"question": traj.question, "gold": traj.gold, "end_reason": traj.end_reason, "answer": traj.answer,
            "reward": rew.score, "f1": rew.f1, "format_ok": rew.format_ok, "reason": rew.reason, "advantage": adv,
            "n_tokens": len(traj.tokens), "n_sampled": sum(traj.loss_mask), "stats": traj.stats,
            "text": tokenizer.decode(traj.tokens), "turns": turn_records(traj)}


def start_wandb(cfg: Config, proc: Dist):
    """The wandb run when asked (--wandb_project, rank 0; an optional package, imported lazily), else None."""
    if not (proc.main and cfg.wandb_project):
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb_project needs the wandb package: pip install wandb") from None
    return wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=cfg.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# The loop

@dataclass
class Batch:
    """One step's trajectories on this rank, scored: what the update and the metrics read."""
    trajs: list
    rewards: list                # reward.Reward per trajectory
    advantages: torch.Tensor     # (N,)
    valid: torch.Tensor          # (N,) bool: judged on (not ended by a web or engine failure)
    zero_var: torch.Tensor       # (Q,) bool: every valid trajectory of the question got the same reward
    skipped: torch.Tensor        # (Q,) bool: groups that masking left too small to compare
    samples: list[Sample]        # what the update trains on


def build_samples(trajs: list, cfg: Config) -> Batch:
    """Rewards and group advantages (groups never straddle ranks: questions are sharded, not trajectories); a
    trajectory the web or the engine ended says nothing about the policy, so it is masked (module docstring)."""
    G = cfg.group_size
    rews = [reward([t.text for t in tr.turns], tr.gold, protocol=cfg.protocol) for tr in trajs]
    r = torch.tensor([x.score for x in rews], dtype=torch.float32)
    valid = torch.tensor([not (cfg.mask_tool_failures and tr.end_reason in INFRA_END_REASONS) for tr in trajs],
                         dtype=torch.bool)
    adv = group_advantages(r, G, cfg.norm_adv_by_std, valid=valid)
    zero_var = zero_variance_groups(r, G, valid=valid)
    n_valid = valid.reshape(-1, G).sum(dim=1)  # (Q,)
    skipped = (n_valid < 2) & (n_valid < G)
    samples = [Sample(tr.tokens, tr.loss_mask, float(adv[i]), sampler_logp=tr.logprobs) for i, tr in enumerate(trajs)
               if valid[i] and not skipped[i // G] and not (cfg.filter_groups and zero_var[i // G])]
    return Batch(trajs, rews, adv, valid, zero_var, skipped, samples)


def step_metrics(batch: Batch, upd: dict, seconds: dict, cfg: Config, proc: Dist, step: int) -> dict:
    """The step's metrics: sums and counts over all ranks in one collective, then means (reward, f1, em and
    format_error over the judged trajectories, the rest per trajectory); times and memory are the slowest rank's."""
    trajs, judged = batch.trajs, [x for x, v in zip(batch.rewards, batch.valid.tolist()) if v]
    peak = torch.cuda.max_memory_allocated() if proc.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS (Linux reports KiB)
    s = all_reduce_dict({
        "reward": sum(x.score for x in judged), "reward_sq": sum(x.score ** 2 for x in judged),
        "f1": sum(x.f1 for x in judged), "em": sum(x.em for x in judged),
        "format_error": sum(not x.format_ok for x in judged), "judged": len(judged),
        "zero_var_groups": int(batch.zero_var.sum()), "groups": len(batch.zero_var),
        "turns": sum(len(tr.turns) for tr in trajs), "search_calls": sum(tr.stats.get("n_search", 0) for tr in trajs),
        "browse_calls": sum(tr.stats.get("n_browse", 0) for tr in trajs),
        "response_len": sum(sum(tr.loss_mask) for tr in trajs), "seq_len": sum(len(tr.tokens) for tr in trajs),
        "trajectories": len(trajs), "time_tools_sum": sum(t.tool_s or 0.0 for tr in trajs for t in tr.turns),
        "masked_tool_failures": int((~batch.valid).sum()), "skipped_groups": int(batch.skipped.sum()),
        **{f"end_{e}": sum(tr.end_reason == e for tr in trajs) for e in END_REASONS}}, "sum", proc)
    slowest = all_reduce_dict({**seconds, "peak_mem_gib": peak / 2**30}, "max", proc)
    n, n_judged = max(s["trajectories"], 1.0), max(s["judged"], 1.0)
    mean = s["reward"] / n_judged
    return {"reward": mean, "reward_std": math.sqrt(max(s["reward_sq"] / n_judged - mean * mean, 0.0)),
            **{k: s[k] / n_judged for k in ("f1", "em", "format_error")},
            "zero_var_groups": s["zero_var_groups"] / max(s["groups"], 1.0),
            **{k: s[k] / n for k in ("turns", "search_calls", "browse_calls", "response_len", "seq_len")},
            **{k: upd[k] for k in ("entropy", "kl", "clipfrac", "loss", "grad_norm", "logp_diff")},
            "lr": lr_at(step, cfg), "time_rollout": slowest["time_rollout"],
            "time_tools_sum": s["time_tools_sum"] / proc.world, "time_learn": slowest["time_learn"],
            "tok_per_s": (s["response_len"] + upd["train_tokens"]) / max(sum(seconds.values()), 1e-9),
            "peak_mem_gib": slowest["peak_mem_gib"],
            **{k: int(v) for k, v in s.items() if k.startswith("end_") or k in ("masked_tool_failures",
                                                                                  "skipped_groups")}}


def log_step(step: int, m: dict, batch: Batch, tokenizer, history: list[dict], wandb_run, cfg: Config,
             proc: Dist) -> None:
    """Rank 0: the step's line, metrics.jsonl (and wandb), a few full trajectories, the curve; every rank: history."""
    history.append({"step": step, **{k: m.get(k) for k in ("reward", "f1", "format_error", "dev_f1")}})
    if not proc.main:
        return
    # `step 3 | reward 0.123 | f1 0.2 | ...`: one line per step, greppable
    tqdm.write(" | ".join([f"step {step}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in m.items() if isinstance(v, (int, float, str))]))
    with open(Path(cfg.out_dir) / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, **m}) + "\n")
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=step)
    dump = [trajectory_record(batch.trajs[i], batch.rewards[i], float(batch.advantages[i]), tokenizer)
            for i in range(min(cfg.n_log_rollouts, len(batch.trajs)))]
    with open(Path(cfg.out_dir) / "rollouts" / f"step_{step:06d}.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in dump)
    if cfg.plot_every and step % cfg.plot_every == 0:
        plot_rewards(history, Path(cfg.out_dir) / "reward.png")


def dev_f1(model, tokenizer, dev: list[dict], browser, cfg: Config, proc: Dist) -> float:
    """Greedy F1 on a fixed list of dev questions (the learning curve); each rank runs its share."""
    mine = dev[proc.rank:: proc.world]
    with unsharded(model):  # every rank joins the all-gather, even one with no question
        trajs = rollout(model, tokenizer, [q["question"] for q in mine], [q["answers"] for q in mine], browser,
                        subconfig(RolloutConfig, cfg, temperature=0.0), group_size=1, seed=0) if mine else []
    f1s = [reward([t.text for t in tr.turns], tr.gold, protocol=cfg.protocol).f1 for tr in trajs]
    s = all_reduce_dict({"f1": sum(f1s), "n": len(f1s)}, "sum", proc)
    return s["f1"] / max(s["n"], 1.0)


def start_run(cfg: Config, proc: Dist) -> tuple[str, Path | None]:
    """Checks that need the world size; out_dir wiped (--overwrite) or its checkpoint found (--resume); the model
    resolved; the config printed and saved. Returns (model folder, checkpoint to resume from)."""
    if cfg.batch_size % proc.world:
        raise SystemExit(f"batch_size={cfg.batch_size} must be divisible by the world size {proc.world}")
    if cfg.cpu_offload and proc.device.type != "cuda":
        raise SystemExit("--cpu_offload=True moves FSDP's sharded state from GPU to host memory: it needs GPUs")
    out, target = Path(cfg.out_dir), resume_target(cfg)
    earlier = [name for name in ("metrics.jsonl", "ckpt") if (out / name).exists()]
    if target is None and earlier and not cfg.overwrite:
        raise SystemExit(f"{out} already holds a run ({', '.join(earlier)}): --resume=True continues it, "
                         f"--out_dir=<new folder> starts another beside it, --overwrite=True deletes it first")
    if target is None and cfg.overwrite and proc.main:  # only the run's own outputs: out_dir may hold other files
        for p in (out / name for name in RUN_OUTPUTS):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    barrier()
    quiet = print if proc.main else (lambda *a: None)
    resume_from = find_resume_checkpoint(cfg, proc.rank, say=quiet) if target else None
    # the first process of each node resolves (downloads or converts) the model into that node's cache, then the
    # others find it there; only rank 0 reads the weights, the others need config.json and the tokenizer
    path = resolve_model(cfg.model) if proc.local_rank == 0 else None
    barrier()
    path = path or resolve_model(cfg.model)
    if proc.main:
        (out / "rollouts").mkdir(parents=True, exist_ok=True)
        print(json.dumps(asdict(cfg), indent=2))
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "resolved_model_path": str(path)}, indent=2))
    return path, resume_from


def end_run(cfg: Config, proc: Dist, history: list[dict], stop: str, saved_at: Path | None) -> None:
    """Ctrl-C exits 130 saying how to resume; otherwise the curve, why it stopped, and what to run next."""
    ck = saved_at or latest_checkpoint(cfg)
    if stop == "interrupted":
        if proc.main:
            saved = (f"the last checkpoint is {ck} (step {int(ck.name.split('_')[-1])})" if ck else "nothing was "
                     f"saved yet (the first checkpoint comes at step {min(cfg.save_every, cfg.steps)})")
            print(f"interrupted: {saved}; to continue:\n  {command_line(cfg, resume='True')}", file=sys.stderr)
        raise SystemExit(130)
    if proc.main:
        if history:
            plot_rewards(history, Path(cfg.out_dir) / "reward.png")
        if stop:
            print(stop, file=sys.stderr)
        print(f"done: {len(history) and history[-1]['step']} steps; last checkpoint {ck}")
        print(f"reward curve: {Path(cfg.out_dir) / 'reward.png'}; metrics: {Path(cfg.out_dir) / 'metrics.jsonl'}")
        if ck is not None:
            print(f"evaluate the trained checkpoint on the dev questions (greedy), then the base model beside it:\n"
                  f"  {eval_command(cfg, str(ck / 'hf'))}\n  {eval_command(cfg, cfg.model)}")
    if _is_dist():
        dist.destroy_process_group()


def main(cfg: Config) -> dict:
    """Run training; returns the last step's metrics (tests use it)."""
    validate(cfg)  # bad options, data, model path or out_dir stop here, before anything loads
    proc = setup_distributed(cfg.device)
    if cfg.dry_run:
        return memory_per_gpu(cfg, cfg.world_size or proc.world, say=print if proc.main else None)
    path, resume_from = start_run(cfg, proc)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = build_model(path, cfg, proc)
    ref_model = build_model(path, cfg, proc, trainable=False) if cfg.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=1e-8)
    questions = load_questions(cfg.data)
    start, history = start_state(cfg, proc, model, optimizer, resume_from) if resume_target(cfg) else (0, [])
    rcfg, browser = subconfig(RolloutConfig, cfg), Browser(subconfig(BrowseConfig, cfg))
    dev = load_questions(cfg.eval_data)[: cfg.eval_n] if cfg.eval_every > 0 else []
    if dev and start == 0:  # the curve starts at the model we were given
        history.append({"step": 0, "dev_f1": dev_f1(model, tokenizer, dev, browser, cfg, proc)})
        if proc.main:
            print(f"step 0 | dev_f1 {history[-1]['dev_f1']:.4g} (greedy, {len(dev)} questions of {cfg.eval_data})")
    wandb_run, last, low_entropy, saved_at, stop = start_wandb(cfg, proc), {}, 0, None, ""
    try:
        for step in tqdm(range(start, cfg.steps), desc="train", disable=not proc.main, initial=start,
                         total=cfg.steps):
            t0 = time.perf_counter()
            idx = batch_indices(len(questions), step, cfg.batch_size, cfg.seed)[proc.rank:: proc.world]
            if proc.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with unsharded(model):  # one all-gather for the whole rollout
                trajs = rollout(model, tokenizer, [questions[i]["question"] for i in idx],
                                [questions[i]["answers"] for i in idx], browser, rcfg, group_size=cfg.group_size,
                                seed=rng_seed(cfg.seed, step, proc.rank))
            t1 = time.perf_counter()
            batch = build_samples(trajs, cfg)
            upd = update(model, optimizer, batch.samples, cfg, proc, step, ref_model)
            seconds = {"time_rollout": t1 - t0, "time_learn": time.perf_counter() - t1}
            last = step_metrics(batch, upd, seconds, cfg, proc, step)
            if dev and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                last["dev_f1"] = dev_f1(model, tokenizer, dev, browser, cfg, proc)
            log_step(step + 1, last, batch, tokenizer, history, wandb_run, cfg, proc)
            # health checks: the metrics are all-reduced, so every rank takes the same decision
            if not upd["finite"] or not all(math.isfinite(last[k]) for k in ("loss", "reward", "entropy")):
                stop = (f"step {step + 1}: loss or gradient is NaN/inf; the update was not applied. Stopping; the "
                        f"last good checkpoint is {latest_checkpoint(cfg)}. Lower --lr or check the data.")
                break
            low_entropy = low_entropy + 1 if upd["train_tokens"] and last["entropy"] < cfg.min_entropy else 0
            if low_entropy >= 3:
                stop = (f"step {step + 1}: entropy {last['entropy']:.2e} < min_entropy={cfg.min_entropy} for 3 "
                        f"steps (the policy collapsed to near-deterministic outputs). Stopping.")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
                saved_at = save_checkpoint(model, optimizer, tokenizer, cfg, proc, step + 1, history)
            if stop:
                break
    except KeyboardInterrupt:  # Ctrl-C: no traceback; say what is on disk and how to go on (exit code 130)
        stop = "interrupted"
    finally:
        browser.close()
        if wandb_run is not None:
            wandb_run.finish()
    end_run(cfg, proc, history, stop, saved_at)
    return last


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:], PRESETS))
