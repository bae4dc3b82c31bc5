"""Train a deep research agent with GRPO: rollouts in a (local or real) web, F1 rewards, a clipped policy update.

Each step runs `rollout.rollout` on `batch_size` questions (rank r takes every world-th one), `group_size` trajectories
each; scores them with `reward.reward` on the policy's own turn texts against the gold answers this file holds (-1
format error, else word-set F1); turns the rewards into group advantages and takes clipped policy-gradient steps on
the sampled tokens; logs one line, metrics.jsonl, a few full trajectories and reward.png; saves a checkpoint every
`save_every` steps. Reading order: the config, then the algorithm (advantages, the loss, the GRPO micro-step, the
update, the step), then the plumbing (start-up checks, processes and FSDP, data, checkpoints, logging, `main`).

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
                                        (Dr.GRPO's constant. Current verl gets the same: its agg_loss divides the
                                        token sums by the constant, and the 1 / number of sequences comes from its
                                        actor scaling each micro-batch's loss by the micro-batch's share)
With kl_coef == 0 the frozen reference model is not even loaded. Logits are divided by the sampling temperature
before the log-softmax, so logp_theta is the distribution the sampler drew from.

Departures of the deepresearcher preset from the paper and its reference implementation (verl + vLLM + Ray)
- One process per GPU (torchrun); our own KV-cached engine (rollout.py), not vLLM, generates inside the training
  process on the policy unsharded once per rollout (not per decoded token); no Ray, no weight re-sync between engines.
- The update trains on the exact token ids the sampler produced (the reference re-rendered text and re-tokenised).
  So the forced `<think>` opening each turn is not trained on (loss mask 0), and `<|im_end|>` is never sampled after
  a tool call: the engine stops at `</tool_call>` and appends the end of turn itself.
- logp_old is recomputed by a training forward when there are several mini-batches or epochs; with one of each
  (the preset, as the reference) the update is exactly on-policy and logp_old = logp_theta.detach().
- loss_agg "token-mean" is a global token mean over the mini-batch. The reference's verl (use_dynamic_bsz) took
  each micro-batch's token mean and weighted it by the micro-batch's share of the mini-batch's sequences, so a
  token's weight depended on how many tokens shared its micro-batch. The paper states its mini-batch, 4,096
  trajectories (256 questions x 16): one update per rollout stage, as n_minibatches=1 here.
- The system prompt and the tool descriptions are in our own wording (rollout.py; the README shows the rendered
  prompt), with the reference's structure: the role, today's date, two JSON-schema tools, the two output forms.
- Observations are our own format: per query its numbered results (rank, title, URL, the snippet cut at
  snippet_chars=300), each query's block cut to an equal share of obs_chars; a browse returns the reading agent's
  extracted facts per page. The reading agent reads as the reference does: any URL of the most recent search,
  chunks of ~40k characters while it asks to read on, a memory per query (browse.py; max_urls and max_chunks cap it).
- As the reference, a turn forced to open `<think>` that does not close it ends the trajectory (a format error,
  -1), and under the dr protocol only the reference's tags are balance-checked (think, tool_call, answer).
- The reward reads only the policy's own turns (reward.py); the reference's format check also read web text.
- Trajectories that the web or the engine ended are out of the loss (`mask_tool_failures`, above); the reference
  trained on them (its failed searches became observations). Counts per end reason are logged every step.
- steps=100, a fixed count; the paper ran one epoch of its training set (about 34 steps of 256 questions).
- Search back ends: Serper (the paper), SearxNG or the embedded offline web; the reading agent is any
  OpenAI-compatible LLM (the paper: qwen-plus) or a local extractive reader (`reader=extract`, the CPU default).
- Checkpoints are torch.distributed.checkpoint shards (+ an HF export per step), written atomically.

Every field the reference's train_grpo.sh sets (and the verl defaults it relies on): there -> here (why)
    actor_rollout_ref.model.path Qwen2.5-7B-Instruct -> model, the same
    data.train_batch_size 256, agent_grpo.n 16 -> batch_size 256, group_size 16
    max_turns 10, data.max_response_length 2000 (per turn) -> max_turns 10, max_new_tokens 2000
    data.max_model_len 32768, data.max_prompt_length 30767 -> max_len 32768 (prompt and turns share it)
    actor.optim.lr 1e-6, constant, no warm-up -> lr 1e-6, warmup_steps 0
    actor.optim weight decay 0.01, betas (0.9, 0.999) (verl's defaults) -> the same
    actor.ppo_mini_batch_size 4096, ppo_epochs 1 -> n_minibatches 1, ppo_epochs 1
    actor.clip_ratio 0.2, grad_clip 1.0 -> clip_low = clip_high = 0.2, grad_clip 1.0
    actor.use_kl_loss, kl_loss_coef 0.001, kl_loss_type low_var_kl -> kl_coef 0.001, k3
    algorithm.kl_ctrl.kl_coef 0.001 -> none: with use_kl_loss verl puts no KL in the reward either
    actor.entropy_coeff 0.001 -> entropy_coef 0.001
    algorithm.adv_estimator grpo -> norm_adv_by_std True
    actor.use_dynamic_bsz, ppo_max_token_len_per_gpu 12288, ppo_micro_batch_size_per_gpu 2 -> micro_tokens 8192
        (a token budget per forward; the loss does not depend on it, see loss_agg above)
    actor.ulysses_sequence_parallel_size 4 -> none: one rank holds a whole sequence (activation checkpointing and
        logits only at sampled positions keep 32k tokens in memory)
    actor and ref fsdp_config.param_offload / optimizer_offload true -> cpu_offload False (FSDP2 shards fit an
        80 GB GPU next to the KV cache; --cpu_offload=True is there)
    model.enable_gradient_checkpointing, use_remove_padding -> activation_checkpointing True; no padding is
        computed for logits, and a group's prompt is computed once (share_prefix)
    rollout vllm: temperature 1.0, top_p 1, top_k -1, gpu_memory_utilization 0.6, max_num_batched_tokens 32768,
        tensor_model_parallel_size 1 -> temperature 1.0, top_p 1.0; our engine, n_slots 80 rows per GPU
    search_engine online_search (Serper, search_top_k 10, region us, language en) -> backend serper, top_k 10
    page_view_port_size 40k characters, reading_agent_model qwen-plus -> chunk_chars 40000, reader llm (any
        OpenAI-compatible model, llm_model)
    trainer.total_epochs 1 -> steps 100 (above)
    trainer.save_freq 1 -> save_every 10 (a 7B checkpoint with Adam state is ~90 GB)
    trainer.test_freq 1, val_before_train false -> eval_every 5 on eval_n 64 dev questions, and one at step 0
    trainer.nnodes 1, n_gpus_per_node 8 -> any torchrun world size
    critic.* -> none (GRPO has no critic; the reference set the fields but did not use them)
The default run (no preset) is ours, not the paper's: SmolLM2-135M-Instruct on a CPU learning the research task
(data/build_qa.py --research=true: bridge, comparison and must-read questions one search cannot answer, 3:1 with
single-hop ones, half of which the first title answers). Its departures, all switches that the deepresearcher preset
turns off: a 30-token system prompt; one worked example as chat turns before the question (`example`: an unrelated
question, its real search, its answer; without it a 135M model never writes an `<answer>` tag, see the README); turn
1 forced to open with `<search>` (loss-masked); up to 5 turns of at most 40 tokens, top-3 results; temperature 0.7,
lr 1e-5, no KL; a warm start ("The algorithm, 5": three passes, 24 supervised steps, over 64 scripted
demonstrations: 24 bridges, 16 comparisons and 24 from the other templates; each searches the question as it is,
then the supporting articles that search did not return and a bridge's bridge entity, then answers: `demo_plan`)
that trains the top 20 of the 30 blocks and the (tied) output layer only (`warm_start_frozen_layers`: its backward
stops above the embeddings and the lowest 10 blocks; 697 s instead of 993 s on a 2-core AVX2 CPU) and, in every GRPO
group, one such demonstration in place of a sampled trajectory (`group_demo`), because GRPO alone
drives a 135M policy to one search per question (README); then 4 GRPO steps of 4 questions x 8; on a CPU the
updates' matmuls run in bf16 autocast with fp32 weights where the CPU has bf16 instructions (`cpu_bf16=auto`, ~1.7x
faster warm start; without them bf16 is 6-16x slower, so auto keeps fp32). One pass over demonstrations from every
template (the default until 2026-12-06's sixth session: `--cpu_bf16=false --warm_start_epochs=1
--warm_start_templates= --steps=6`) teaches a rate of searching, not when: its agent searched the bridge entity on 1
bridge in 8 and kept single-hop questions; the three passes over the counted mix make the searches follow the
question (the bridge entity searched on most bridges); with demonstrations that search the supporting articles
only (`--demo_plan=oracle`, the default until 2026-12-07), most of which open with a name from the question, that
cost single-hop questions (the policy searched a name there too); opening every demonstration with the question as
it is keeps them (README: "Result").
`--preset=single_hop` is the earlier default (single-hop questions, 3 turns, 25 steps, neither warm start nor
demonstrations), whose agent learns the first-title shortcut.
The step line's metrics (also in metrics.jsonl) are listed in the README.

How to run
    python train.py                                                   # CPU: SmolLM2-135M-Instruct, the research task
    python train.py --preset=tiny --steps=3                           # tiny random model, seconds per step
    python train.py --preset=single_hop                               # CPU: the earlier single-hop default
    python train.py --preset=deepresearcher --dry_run=True            # memory per GPU before launching
    torchrun --standalone --nproc_per_node=2 train.py --preset=tiny --steps=2          # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 train.py --preset=deepresearcher         # one 8-GPU node (NCCL)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 train.py --preset=...
        # multi-node: the same line on every node, with --out_dir on a filesystem every node sees
    python train.py --preset=tiny --resume=True                       # continue from the latest checkpoint
    python train.py --preset=tiny --resume=runs/train-tiny/ckpt/step_000002   # ... or from a given one
    python train.py --preset=tiny --overwrite=True                    # out_dir holds a run: delete it, start again
Any Config field can be overridden with --key=value; unknown keys are rejected with the closest matches.

What it deliberately does not do: value models / GAE, reward models, sequence packing across trajectories,
tensor or pipeline parallelism, asynchronous (off-policy) rollouts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import os
import resource
import shlex
import shutil
import sys
import tempfile
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
from browse import BrowseConfig, Browser, shown_titles
from data.config import BOOLS, parse_config, subconfig
from data.models import memory_per_gpu, resolve_model
from data.prepare import load_examples
from model import ModelConfig, Transformer, save_pretrained
from reward import behaviour, reward
from rollout import (END_REASONS, PLANS, RolloutConfig, first_title_plan, make_engine, rollout, rule_config,
                     scripted_rollout)

ROOT = Path(__file__).resolve().parent
# DCP on one process warns that it "assumes" no process group: as intended, so not every checkpoint says it
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# ----------------------------------------------------------------------------------------------------------------
# Config: the agent's and the web's fields come from rollout.py and browse.py (AgentConfig); eval.py shares them

@dataclass
class AgentConfig(RolloutConfig, BrowseConfig):
    """The policy, its agent loop (rollout.RolloutConfig) and its web (browse.BrowseConfig): what train.py and eval.py
    share. The agent's and the web's fields, and their defaults (the embedded offline run), are declared once, in
    those two files; `subconfig` hands them back by name. The paper's values: DEEPRESEARCHER_AGENT below."""
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id, local HF folder, or "tiny" (data/models.py)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda


@dataclass
class Config(AgentConfig):
    data: str = "data/qa_train_research.jsonl"  # .jsonl / .parquet (data/prepare.py schema); the research mix
    out_dir: str = "runs/train"
    # steps and batch
    steps: int = 4                  # GRPO steps after the warm start (the whole default run: README, Result)
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
    cpu_bf16: str = "auto"          # CPU: the updates' matmuls in bf16 autocast, fp32 weights (update_precision):
                                    # auto = where the CPU has bf16 instructions (cpu_has_bf16), true, or false =
                                    # fp32 throughout (bit-exact with runs before 2026-12-06, sixth session)
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
    eval_every: int = 6             # greedy dev F1 on `eval_n` fixed dev questions every N steps and at the end,
                                    # and before the first step, after the warm start where there is one (0 = off)
    eval_before_warm_start: bool = False  # with a warm start, also a dev point of the model we were given (~80 s
                                    # here; `eval.py --limit=<eval_n>` gives the same number); without one, always
    eval_data: str = "data/qa_dev_research.jsonl"
    eval_n: int = 64
    # the warm start ("The algorithm, 5"): supervised steps on scripted oracle demonstrations before the first GRPO
    # step, for models too small to find research by sampling; 0 = off (the paper)
    warm_start_demos: int = 64      # demonstrations, from training questions that name their supporting articles
    warm_start_batch: int = 8       # demonstrations per optimizer step
    warm_start_epochs: int = 3      # passes over the demonstrations, each a seeded shuffle of the last; 3 make
                                    # the policy's searches follow the question (1 pass: a rate, README)
    warm_start_lr: float = 1e-4     # its own AdamW; GRPO's optimizer starts fresh after it
    # the warm start trains the top blocks only: the embeddings and the first N transformer blocks run without autograd
    # (Transformer.frozen_blocks), so its backward stops above them (10 of SmolLM2's 30: ~30% less time per step on
    # a CPU); a tied output layer still trains. GRPO trains every parameter. 0 = the whole model. At seed 0, 10 gave
    # single-hop dev F1 61.3, 0 gave 56.8 and 15 gave 52.9, with like research F1; 10 at seed 1 gave 45.3 (README)
    warm_start_frozen_layers: int = 10
    # comma-separated question templates the demonstrations come from ("" = any), each with an optional count:
    # 24 bridges, 16 comparisons, the rest from the other templates in the seeded order (README: "Result")
    warm_start_templates: str = "bridge:24,comparison:16,read,what,who,country"
    # one oracle demonstration in each GRPO group, in place of one sampled trajectory (where the question names its
    # supporting articles): every group ranks a research path that answers right beside the policy's own, so GRPO
    # keeps a reason to search again after sampling stops doing it (off-policy guidance, as LUFFY). False = the paper
    group_demo: bool = True
    # how the demonstrations (warm start and group_demo) search: question_first = the question as it is first, then
    # each supporting article it did not return and the bridge entity (rollout.question_first_plan); oracle = the
    # supporting articles only (rollout.oracle_plan, the default until 2026-12-07): their first query is mostly a
    # name from the question, and the policy then searched a name on single-hop questions too (README: "Result")
    demo_plan: str = "question_first"
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
                 micro_tokens=4096, plot_every=1, temperature=1.0, eval_every=3, eval_n=4, data="data/qa_train.jsonl",
                 eval_data="data/qa_dev.jsonl", warm_start_demos=0, group_demo=False),
    # the earlier default: single-hop questions (data/qa_train.jsonl), 3 turns, no warm start, 25 steps. Its agent
    # learns the first-title shortcut (the README's single-hop table); kept so that table can be reproduced
    "single_hop": dict(data="data/qa_train.jsonl", eval_data="data/qa_dev.jsonl", out_dir="runs/train-single-hop",
                       cpu_bf16="false", max_new_tokens=24, demo_plan="oracle",
                       max_turns=3, max_len=1024, warm_start_demos=0, group_demo=False, steps=25, eval_every=5),
    # the paper's recipe on one or more 8-GPU nodes (weight decay 0.01, grad clip 1.0, clip 0.2 are the defaults).
    # n_slots: the paged KV cache (56 KiB/token for the 7B) holds ~94 rows of 8k tokens per 80 GiB GPU next to the
    # weights and sharded states (23 at the full 32k; an H200 ~210 / 53); `--dry_run=True` prints these numbers.
    # kv_tokens: the run's one engine keeps its pool through the update, so it gets a fixed 384k tokens (~21 GiB for
    # the 7B), not what is free when it is built (~85%, which would leave the update nothing); rows that outgrow it
    # are preempted and resumed exactly. Not yet checked on a GPU.
    "deepresearcher": dict(DEEPRESEARCHER_AGENT, data="data/train.jsonl", out_dir="runs/deepresearcher", steps=100,
                           batch_size=256, group_size=16, n_slots=80, temperature=1.0, lr=1e-6, kl_coef=0.001,
                           entropy_coef=0.001, micro_tokens=8192, save_every=10, kv_tokens=393_216, eval_every=5,
                           warm_start_demos=0, group_demo=False),
}


# ----------------------------------------------------------------------------------------------------------------
# The algorithm, 1: rewards -> group advantages. Pure functions of tensors; they never modify their inputs.

INFRA_END_REASONS = ("tool_failure", "engine_error")  # trajectories ended by the web or the engine, not the policy


def group_advantages(rewards: torch.Tensor, group_size: int, norm_by_std: bool = True, eps: float = 1e-6,
                     valid: torch.Tensor | None = None):
    """rewards (N,) question-major (G consecutive per question) -> advantages (N,), as in the module docstring (a
    singleton's mean is 0 and std 1, as verl). valid (N,) bool: rows to score (e.g. not ended by a web failure); the
    others get 0 and leave their group's mean and std; a group left with fewer than 2 valid rows gets 0 throughout."""
    scores = rewards.reshape(-1, group_size).to(torch.float32)  # (Q, G)
    scored = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.reshape(-1, group_size).bool()
    zero = torch.zeros_like(scores)
    if group_size == 1:
        singleton = scores / (1.0 + eps) if norm_by_std else scores
        return torch.where(scored, singleton, zero).reshape(-1)
    n_scored = scored.sum(dim=1, keepdim=True)  # (Q, 1)
    mean = torch.where(scored, scores, zero).sum(dim=1, keepdim=True) / n_scored.clamp(min=1)  # (Q, 1)
    advantages = scores - mean
    if norm_by_std:
        var = torch.where(scored, advantages * advantages, zero).sum(dim=1, keepdim=True) / (n_scored - 1).clamp(min=1)
        advantages = advantages / (var.sqrt() + eps)  # unbiased std, as verl
    return torch.where(scored & (n_scored >= 2), advantages, zero).reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) rewards -> (Q,) bool: every (valid) trajectory of the question got the same reward (advantage 0)."""
    scores = rewards.reshape(-1, group_size)  # (Q, G)
    scored = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.reshape(-1, group_size).bool()
    first = torch.where(scored, scores, torch.full_like(scores, float("inf"))).min(dim=1, keepdim=True).values
    return ((scores == first) | ~scored).all(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The algorithm, 2: the loss on the sampled tokens

def policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, loss_agg="token-mean",
                ref_logp=None, kl_coef=0.0, entropy=None, entropy_coef=0.0, agg_const=1.0, norm=None):
    """The clipped GRPO surrogate on masked tokens, aggregated; returns (loss, stats).
    logp, old_logp, ref_logp, entropy, mask: (B, T); advantages: (B,). Only positions with mask 1 count, and
    `torch.where` (not a multiplication) keeps even inf/NaN at mask-0 positions out of the value and the gradient.
    norm: the denominator (tokens for token-mean, sequences with at least one sampled token otherwise) summed
    over the whole mini-batch on every rank; None = this call's own count (a plain mean).
    stats: "clipped" (B, T) tokens where the clip is active, "ratio" (B, T), "kl" (B, T) when kl_coef > 0.
    """
    sampled = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(sampled, logp, zero)
    old = torch.where(sampled, old_logp.to(logp.dtype), zero)
    adv = advantages.to(logp.dtype)[:, None]  # (B, 1)
    log_ratio = (logp - old).clamp(-20.0, 20.0)  # as verl: exp() of a huge drift would overflow
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)  # pessimistic bound: the clipped term wins when larger
    stats = {"clipped": ((pg_clipped > pg_unclipped) & sampled).detach(), "ratio": ratio.detach()}
    if kl_coef > 0:
        ref_diff = torch.where(sampled, ref_logp.to(logp.dtype), zero) - logp  # log(pi_ref / pi_theta) per token
        kl = (torch.exp(ref_diff) - ref_diff - 1.0).clamp(-10.0, 10.0)  # k3: unbiased, non-negative, low variance
        per_token = per_token + kl_coef * kl
        stats["kl"] = kl.detach()
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * torch.where(sampled, entropy, zero)
    per_token = torch.where(sampled, per_token, zero)
    tokens_per_row = sampled.sum(dim=1)  # (B,)
    if loss_agg == "token-mean":
        total = per_token.sum()
    elif loss_agg == "seq-mean-token-mean":
        total = (per_token.sum(dim=1) / tokens_per_row.clamp(min=1)).sum()
    else:  # seq-mean-token-sum-norm
        total = (per_token.sum(dim=1) / agg_const).sum()
    if norm is None:  # tokens for token-mean; else, as verl, the sequences with at least one sampled token
        if loss_agg == "token-mean":
            norm = tokens_per_row.sum().clamp(min=1)
        else:
            norm = (tokens_per_row > 0).sum().clamp(min=1)
    return total / norm, stats


def token_logprobs(model, tokens, mask, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = True, prefix: int = 0):
    """Per-token log-probs of `tokens[:, 1:]` under the model, only where `mask[:, 1:]` is 1.
    tokens, mask: (B, T). Returns logp (B, T-1) and entropy (B, T-1) or None, zero where the mask is 0. Logits are
    computed only at the sampled positions (`logits_at`), which is most of the memory saved on long observations.
    prefix: the first `prefix` tokens are the same in every row; the model computes them once."""
    target_mask = mask[:, 1:].bool()  # (B, T-1): token t+1 is predicted from position t
    width = max(int(target_mask.sum(dim=1).max()), 1)
    # time indices of the masked positions, packed left, padded with 0 (their results are discarded below)
    order = torch.sort((~target_mask).to(torch.int8), dim=1, stable=True).indices[:, :width]  # (B, K)
    valid = torch.gather(target_mask, 1, order)  # (B, K)
    logits = model(tokens[:, :-1], logits_at=order, prefix=prefix).float()  # (B, K, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, K, V); its backward needs only this output
    del logits
    targets = torch.gather(tokens[:, 1:], 1, order)  # (B, K)
    logp = torch.gather(logp_all, 2, targets[:, :, None]).squeeze(-1)  # (B, K)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    base = torch.zeros_like(target_mask, dtype=logp.dtype, device=logp.device)  # (B, T-1); scatter() returns a copy
    entropy = None
    if with_entropy:  # without entropy_grad it is only logged: no autograd graph over another (B, K, V) tensor
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            packed_entropy = -(logp_all.exp() * logp_all).sum(dim=-1)  # (B, K)
        entropy = base.scatter(1, order, torch.where(valid, packed_entropy, zero))
    return base.scatter(1, order, torch.where(valid, logp, zero)), entropy


# ----------------------------------------------------------------------------------------------------------------
# The algorithm, 3: the GRPO micro-step, and the update that runs it over mini-batches and micro-batches

@dataclass
class Sample:
    """One trajectory as the update sees it."""
    tokens: list[int]
    loss_mask: list[int]
    advantage: float
    group: int                               # its question (rollout's Trajectory.group): the rows sharing a prompt
    old_logp: torch.Tensor | None = None     # (T-1,) set before the update when needed
    sampler_logp: list[float] | None = None  # the engine's log-probs (same length as tokens), for a diagnostic
    ref_logp: torch.Tensor | None = None     # (T-1,)


@dataclass
class MicroBatch:
    """Samples padded into tensors for one forward/backward (collate). Log-prob rows hold the target t+1 at index t,
    as token_logprobs returns them; each is None unless every sample has one."""
    tokens: torch.Tensor                   # (B, T) right-padded
    mask: torch.Tensor                     # (B, T) loss mask
    advantages: torch.Tensor               # (B,)
    old_logp: torch.Tensor | None          # (B, T-1)
    ref_logp: torch.Tensor | None          # (B, T-1)
    sampler_logp: torch.Tensor | None      # (B, T-1)
    prefix: int = 0                        # the first `prefix` tokens are the same in every row: computed once


def grpo_micro_step(model, micro: MicroBatch, cfg: Config, norm: float, world: int, on_policy: bool):
    """The GRPO step on one micro-batch: log-probs of the sampled tokens -> the clipped surrogate (+ KL, - entropy)
    -> backward. `norm` is the mini-batch's denominator summed over all ranks (minibatch_denominator), so this
    micro-batch adds its exact share of the mini-batch loss. Returns (loss, logp, entropy, stats) for diagnostics."""
    logp, entropy = token_logprobs(model, micro.tokens, micro.mask, cfg.temperature or 1.0,  # greedy: T = 1
                                   with_entropy=True, entropy_grad=cfg.entropy_coef > 0, prefix=micro.prefix)
    # one mini-batch and one epoch: exactly on-policy, logp_old is this very forward (ratio 1, no extra pass)
    old_logp = logp.detach() if on_policy else micro.old_logp
    loss, stats = policy_loss(logp, old_logp, micro.advantages, micro.mask[:, 1:], clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high, loss_agg=cfg.loss_agg, ref_logp=micro.ref_logp,
                              kl_coef=cfg.kl_coef, entropy=entropy, entropy_coef=cfg.entropy_coef,
                              agg_const=loss_agg_constant(cfg), norm=norm)
    # FSDP averages gradients over ranks while `loss` is already this rank's share of the global sum: scale back
    (loss * world).backward()
    return loss, logp, entropy, stats


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch's bf16 matmul falls back
    to a slow kernel: on a 2-core AVX2 EPYC one warm-start step took 686 s in bf16 autocast against 43 s in fp32, and
    bench/train.py's update ran at 0.16x of fp32 (bench/RESULTS.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def bf16_updates(cfg: Config, proc: Dist) -> bool:
    """cpu_bf16 resolved for this process: never on a GPU; "auto" follows cpu_has_bf16, else the words every bool
    flag takes (data/config.py's BOOLS: true/false, yes/no, 1/0)."""
    if proc.device.type != "cpu":
        return False
    if cfg.cpu_bf16.lower() == "auto":
        return cpu_has_bf16()
    return BOOLS[cfg.cpu_bf16.lower()]


def update_precision(cfg: Config, proc: Dist):
    """Where the updates' forwards and backwards run (GRPO's and the warm start's): under bfloat16 autocast on a CPU
    with bf16_updates (the weights, gradients and Adam state stay fp32; the matmuls run in bf16, 1.7-2.2x faster on a
    CPU with AVX512-BF16, bench/RESULTS.md), else as they are (a GPU gets bf16 compute from FSDP's MixedPrecisionPolicy;
    a CPU run without it stays bit-exact fp32). Sampling is untouched: the engine decodes in the weights' dtype.
    Autocast's cache of bf16 weight copies is off: it outlives an optimizer step inside one update (more than one
    mini-batch or epoch) and made a resumed FSDP2 run differ from an uninterrupted one; casting again per forward
    gives the same numbers as the cache on one process (checked on SmolLM2: identical weights after a warm-start step
    and a GRPO update)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_updates(cfg, proc), cache_enabled=False)


def update(model, optimizer, samples: list[Sample], cfg: Config, proc: Dist, step: int, ref_model=None,
           show_progress: bool = True) -> dict:
    """Policy-gradient steps on this rank's samples: ppo_epochs x n_minibatches optimizer steps (minibatch_step),
    each over micro-batches (grpo_micro_step). Every rank calls it, even with no samples. Returns metrics."""
    with update_precision(cfg, proc):
        on_policy = cfg.n_minibatches * cfg.ppo_epochs == 1
        trained_rows = [i for i, sample in enumerate(samples) if is_trained(sample, cfg)]
        if not on_policy:  # the policy moves between mini-batches: freeze logp_old with a training forward first
            samples = fill_logprobs(model, samples, cfg, proc, "old_logp", only=trained_rows)
        if cfg.kl_coef > 0:
            samples = fill_logprobs(ref_model, samples, cfg, proc, "ref_logp")
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(step, cfg)
        sums = dict.fromkeys(DIAGNOSTIC_SUMS, 0.0)
        grad_norms = []
        bar = tqdm(total=0, desc="update", unit="micro-batch", leave=False, disable=not (proc.main and show_progress))
        for epoch in range(cfg.ppo_epochs):
            for index in range(cfg.n_minibatches):
                part = samples[index * len(samples) // cfg.n_minibatches:
                               (index + 1) * len(samples) // cfg.n_minibatches]
                first_pass = epoch == 0 and index == 0  # the weights that sampled: logp_diff is measured here
                grad_norm, minibatch_sums = minibatch_step(model, optimizer, part, cfg, proc, bar, on_policy,
                                                           first_pass)
                sums = add_sums(sums, minibatch_sums)
                if grad_norm is not None:
                    grad_norms.append(grad_norm)
        bar.close()
    return update_metrics(sums, grad_norms, cfg, proc)


def minibatch_step(model, optimizer, part: list[Sample], cfg: Config, proc: Dist, bar, on_policy: bool,
                   first_pass: bool) -> tuple[float | None, dict]:
    """One optimizer step on a mini-batch: its micro-batches' gradients, clipped, applied. Returns the gradient norm
    and the diagnostics' sums; the norm is None when no rank had a token to learn from: then there is no step at
    all, so neither weight decay nor Adam's moments move on an empty batch."""
    norm = minibatch_denominator(part, cfg, proc)
    if norm == 0:
        return None, {}
    trained = [sample for sample in part if is_trained(sample, cfg)]
    untrained = [sample for sample in part if not is_trained(sample, cfg)]
    sums = measure_untrained(model, untrained, cfg, proc, first_pass)
    passes = in_lockstep(micro_batches(trained, cfg.micro_tokens, cfg.share_prefix), proc)
    if not passes:  # every trajectory on every rank has advantage 0: nothing to apply, not even weight decay
        return None, sums
    bar.total += len(passes)
    bar.refresh()
    for rows_and_prefix in passes:
        bar.update()
        if rows_and_prefix is None:  # fewer micro-batches here than on another rank: still join FSDP's collectives
            zero_loss_pass(model, proc)
            continue
        rows, prefix = rows_and_prefix
        micro = collate([trained[i] for i in rows], proc.device, prefix=prefix)
        loss, logp, entropy, stats = grpo_micro_step(model, micro, cfg, norm, proc.world, on_policy)
        sums = add_sums(sums, pass_sums(micro, logp, entropy, first_pass, loss=loss, stats=stats))
    return clip_and_step(model, optimizer, cfg), sums


def is_trained(sample: Sample, cfg: Config) -> bool:
    """With no KL and no entropy term, a trajectory with advantage exactly 0 (e.g. its whole group got the same
    reward) adds exactly 0 to the loss and its gradient: it still counts in the denominators, but its forward and
    backward are skipped. Early in training most groups are like that, so this is most of the time saved."""
    return cfg.kl_coef > 0 or cfg.entropy_coef > 0 or sample.advantage != 0.0


def minibatch_denominator(part: list[Sample], cfg: Config, proc: Dist) -> float:
    """The loss's denominator over the whole mini-batch on all ranks (tokens for token-mean, else sequences with at
    least one sampled token, as verl), so micro-batching and sharding do not change the loss. 0: nothing to learn."""
    counts = all_reduce_dict({"tokens": sum(sum(sample.loss_mask[1:]) for sample in part),
                              "seqs": sum(1 for sample in part if any(sample.loss_mask[1:]))}, "sum", proc)
    if counts["tokens"] == 0:
        return 0.0
    return counts["tokens"] if cfg.loss_agg == "token-mean" else counts["seqs"]


def loss_agg_constant(cfg: Config) -> float:
    """Dr.GRPO's constant: loss_agg_const, or the longest a response can be (max_turns x max_new_tokens)."""
    return cfg.loss_agg_const or float(cfg.max_turns * cfg.max_new_tokens)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up over `warmup_steps`, then constant (the paper's schedule is constant 1e-6)."""
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def clip_and_step(model, optimizer, cfg: Config) -> float:
    """Clip the gradient's global norm, take the optimizer step unless it is NaN/inf (the caller stops the run),
    clear the gradients; returns the norm before clipping."""
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else 1e30
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, reduced over ranks
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ------------------------------------------------------------------------------------------------ micro-batches

def prompt_length(sample: Sample) -> int:
    """Tokens before the position that predicts the first sampled token: a GRPO group's rows agree on them."""
    first_sampled = next((pos for pos in range(1, len(sample.loss_mask)) if sample.loss_mask[pos]), len(sample.tokens))
    return first_sampled - 1


def shared_prompt_length(samples: list[Sample], rows: list[int]) -> int:
    """How many leading tokens the rows of one group share (their prompt), checked: rows that differ there do not
    belong to one question, and computing their prefix once would silently train on the wrong context."""
    length = min(prompt_length(samples[i]) for i in rows)
    head = samples[rows[0]].tokens[:length]
    if any(samples[i].tokens[:length] != head for i in rows):
        raise ValueError(f"samples of group {samples[rows[0]].group} differ in their first {length} tokens: "
                         f"Sample.group must name the question (rollout's Trajectory.group)")
    return length


def micro_batches(samples: list[Sample], budget: int, share: bool = True) -> list[tuple[list[int], int]]:
    """Split samples into forward/backward passes: (indices, P), where the P first tokens are the same in every row
    and are computed once (the prompt of the rows' group, Sample.group; P = 0 without `share`). A pass computes
    P + rows x (longest - P) <= budget tokens (a longer single row goes alone). Longest first keeps padding small;
    the order within a mini-batch does not change the result."""
    groups: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.group if share else 0, []).append(index)
    passes = []
    for rows in groups.values():
        rows.sort(key=lambda i: -len(samples[i].tokens))
        shared = shared_prompt_length(samples, rows) if share else 0
        current = []
        for i in rows:
            longest = len(samples[current[0]].tokens) if current else 0
            if current and shared + (len(current) + 1) * (longest - shared) > budget:
                passes.append((current, shared if len(current) > 1 else 0))
                current = []
            current.append(i)
        passes.append((current, shared if len(current) > 1 else 0))
    return passes


def pad_rows(rows: list, width: int, device, dtype=torch.float32, fill=0) -> torch.Tensor | None:
    """(len(rows), width) tensor of the rows, right-padded with `fill` (cut at `width`); None if any row is None."""
    if any(row is None for row in rows):
        return None
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        values = torch.as_tensor(row, dtype=dtype)[:width]
        out[i, : len(values)] = values
    return out.to(device)


def collate(samples: list[Sample], device, pad_id: int = 0, prefix: int = 0) -> MicroBatch:
    """Right-padded (B, T) tokens and mask; old/ref/sampler logps padded to (B, T-1); advantages (B,)."""
    width = max(len(sample.tokens) for sample in samples)
    # a row with no sampler log-probs (a demonstration: nothing sampled it) is NaN there, left out of logp_diff
    sampler_rows = [[math.nan] * (len(sample.tokens) - 1) if sample.sampler_logp is None else sample.sampler_logp[1:]
                    for sample in samples]
    return MicroBatch(tokens=pad_rows([sample.tokens for sample in samples], width, device, torch.long, pad_id),
                      mask=pad_rows([sample.loss_mask for sample in samples], width, device, torch.long),
                      advantages=torch.tensor([sample.advantage for sample in samples], dtype=torch.float32,
                                              device=device),
                      old_logp=pad_rows([sample.old_logp for sample in samples], width - 1, device),
                      ref_logp=pad_rows([sample.ref_logp for sample in samples], width - 1, device),
                      sampler_logp=pad_rows(sampler_rows, width - 1, device), prefix=prefix)


# ------------------------------------------------------------------------------------------------ FSDP lockstep

def in_lockstep(passes: list, proc: Dist) -> list:
    """This rank's passes padded with None up to the largest count over ranks: FSDP2 runs collectives inside every
    forward and backward, so a rank with fewer micro-batches joins the others' with a dummy pass per None."""
    n_passes = int(all_reduce_dict({"passes": len(passes)}, "max", proc)["passes"])
    return passes + [None] * (n_passes - len(passes))


def zero_loss_pass(model, proc: Dist) -> None:
    """A forward and backward that changes no gradient (the loss is multiplied by 0), for FSDP's collectives."""
    tokens = torch.zeros((1, 2), dtype=torch.long, device=proc.device)
    (model(tokens, logits_at=tokens[:, :1]).sum() * 0.0).backward()


@torch.no_grad()
def forward_passes(model, samples: list[Sample], cfg: Config, proc: Dist, with_entropy: bool = False):
    """Yields (rows, micro-batch, logp, entropy) for each micro-batch of `samples`, from forwards without grad, in
    lockstep with the other ranks (a dummy forward where this rank has none left)."""
    for rows_and_prefix in in_lockstep(micro_batches(samples, cfg.micro_tokens, cfg.share_prefix), proc):
        if rows_and_prefix is None:
            model(torch.zeros((1, 2), dtype=torch.long, device=proc.device))  # keep FSDP's collectives in step
            continue
        rows, prefix = rows_and_prefix
        micro = collate([samples[i] for i in rows], proc.device, prefix=prefix)
        logp, entropy = token_logprobs(model, micro.tokens, micro.mask, cfg.temperature or 1.0,
                                       with_entropy=with_entropy, prefix=prefix)
        yield rows, micro, logp, entropy


def fill_logprobs(model, samples: list[Sample], cfg: Config, proc: Dist, attr: str, only=None) -> list[Sample]:
    """New Samples with `attr` (old_logp / ref_logp) from a no-grad forward of `model`, in micro-batches; `only`: the
    indices of the samples that need it (default all), the others are returned unchanged."""
    out = list(samples)
    todo = list(range(len(samples))) if only is None else list(only)
    for rows, _, logp, _ in forward_passes(model, [samples[i] for i in todo], cfg, proc):
        for row, k in enumerate(rows):
            sample = samples[todo[k]]
            out[todo[k]] = replace(sample, **{attr: logp[row, : len(sample.tokens) - 1].float().cpu()})
    return out


# ------------------------------------------------------------------------------------------------ diagnostics
# entropy and logp_diff cover every sampled token of the update's samples: the rows the update skips (advantage 0,
# is_trained) get a forward without grad at the place the update would have computed them, so skipping changes no
# metric. clipfrac divides by the same tokens (a zero-advantage token is never clipped); kl covers the trained tokens,
# which is all of them when kl_coef > 0 (and kl is missing when kl_coef == 0). logp_diff is measured on the first
# mini-batch of the first epoch only: the later ones run after an optimizer step, on weights that did not sample.

DIAGNOSTIC_SUMS = ("loss", "entropy", "measured_tokens", "clipped", "kl", "trained_tokens", "logp_diff",
                   "logp_diff_tokens")


def pass_sums(micro: MicroBatch, logp, entropy, first_pass: bool, loss=None, stats=None) -> dict:
    """One pass's diagnostic sums (a trained pass has a loss and policy_loss's stats; a measured one has not)."""
    sampled = micro.mask[:, 1:].bool()
    n_sampled = float(sampled.sum())
    sums = {"entropy": float(entropy.detach()[sampled].sum()), "measured_tokens": n_sampled}
    if loss is not None:
        sums["loss"] = float(loss.detach())
        sums["clipped"] = float(stats["clipped"].sum())
        sums["trained_tokens"] = n_sampled
        if "kl" in stats:
            sums["kl"] = float(stats["kl"][sampled].sum())
    if first_pass and micro.sampler_logp is not None:  # large gaps: the sampler is not the policy
        measured = sampled & micro.sampler_logp.isfinite()  # not a demonstration's tokens
        sums["logp_diff"] = float((logp.detach() - micro.sampler_logp)[measured].abs().sum())
        sums["logp_diff_tokens"] = float(measured.sum())
    return sums


def add_sums(total: dict, more: dict) -> dict:
    """A new dict: `total` with `more`'s values added key by key."""
    added = dict(total)
    for key, value in more.items():
        added[key] = added.get(key, 0.0) + value
    return added


def measure_untrained(model, untrained: list[Sample], cfg: Config, proc: Dist, first_pass: bool) -> dict:
    """Diagnostic sums of the rows the update skips (entropy; on the first pass logp_diff), forwards without grad."""
    sums = {}
    for _, micro, logp, entropy in forward_passes(model, untrained, cfg, proc, with_entropy=True):
        sums = add_sums(sums, pass_sums(micro, logp, entropy, first_pass))
    return sums


def mean_or_missing(total: dict, key: str, count: str) -> float | None:
    """total[key] / total[count], or None (missing, not 0) when nothing was counted."""
    if total[count] <= 0:
        return None
    return total[key] / total[count]


def update_metrics(sums: dict, grad_norms: list[float], cfg: Config, proc: Dist) -> dict:
    """The update's metrics from the diagnostics summed over all ranks (see the comment above DIAGNOSTIC_SUMS)."""
    total = all_reduce_dict(sums, "sum", proc)
    kl = mean_or_missing(total, "kl", "trained_tokens") if cfg.kl_coef > 0 else None
    # `loss` is per rank already normalised by the global count: its sum over ranks is the mini-batch loss
    return {"loss": total["loss"] / (cfg.n_minibatches * cfg.ppo_epochs),
            "grad_norm": max(grad_norms, default=0.0),
            "entropy": mean_or_missing(total, "entropy", "measured_tokens"),
            "clipfrac": mean_or_missing(total, "clipped", "measured_tokens"),
            "kl": kl,
            "logp_diff": mean_or_missing(total, "logp_diff", "logp_diff_tokens"),
            "train_tokens": total["trained_tokens"],
            "finite": all(math.isfinite(norm) for norm in grad_norms)}


# ----------------------------------------------------------------------------------------------------------------
# The algorithm, 4: one step. Rollouts -> rewards -> group advantages -> the update -> metrics

@dataclass
class Batch:
    """One step's trajectories on this rank, scored: what the update and the metrics read."""
    trajs: list
    golds: list                  # gold answers per question, indexed by Trajectory.group
    rewards: list                # reward.Reward per trajectory
    advantages: torch.Tensor     # (N,)
    valid: torch.Tensor          # (N,) bool: judged on (not ended by a web or engine failure)
    zero_var: torch.Tensor       # (Q,) bool: every valid trajectory of the question got the same reward
    skipped: torch.Tensor        # (Q,) bool: groups that masking left too small to compare
    samples: list[Sample]        # what the update trains on
    demo: list[bool]             # (N,) the row is the oracle's demonstration (group_demo), not the policy's


def train_step(run: Run, cfg: Config, proc: Dist, step: int) -> tuple[Batch, dict, bool]:
    """One GRPO step: this rank's questions -> rollouts -> rewards and group advantages -> the update -> the step's
    metrics (and the dev F1 on evaluation steps). Returns the batch, the metrics and whether every gradient of the
    update was finite (one that was not was not applied)."""
    started = time.perf_counter()
    indices = batch_indices(len(run.questions), step, cfg.batch_size, cfg.seed)[proc.rank:: proc.world]
    questions = [run.questions[i] for i in indices]
    if proc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with unsharded(run.model):  # one all-gather for the whole rollout
        trajs = rollout(run.model, run.tokenizer, [q["question"] for q in questions], run.browser, run.rollout_cfg,
                        group_size=cfg.group_size, seed=rng_seed(cfg.seed, step, proc.rank), engine=run.engine)
    demo = [False] * len(trajs)
    if cfg.group_demo:
        trajs, demo = with_group_demos(trajs, questions, run, cfg)
    rolled_out = time.perf_counter()
    batch = build_samples(trajs, [q["answers"] for q in questions], cfg, demo)
    update_stats = update(run.model, run.optimizer, batch.samples, cfg, proc, step, run.ref_model)
    seconds = {"time_rollout": rolled_out - started, "time_learn": time.perf_counter() - rolled_out}
    metrics = step_metrics(batch, update_stats, seconds, cfg, proc, step)
    policy_rows = [i for i, is_demo in enumerate(demo) if not is_demo]
    metrics.update(behaviour_metrics([trajs[i] for i in policy_rows], questions,
                                     [batch.rewards[i] for i in policy_rows], run.kinds, proc))
    if run.dev and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
        metrics.update(dev_metrics(run, cfg, proc))
    return batch, metrics, update_stats["finite"]


def with_group_demos(trajs: list, questions: list[dict], run: Run, cfg: Config) -> tuple[list, list[bool]]:
    """group_demo: each group's last sampled trajectory replaced by the oracle's demonstration of its question, where
    there is one (`oracle_demonstrations`). Returns the trajectories and which rows are demonstrations. Its tokens are
    the policy's own framing of the oracle's turns (loss mask 1 on what the policy would write); rewarded like any other
    row, it gets a positive advantage where the policy's samples answer worse and none where they all match it."""
    G = cfg.group_size
    trajs = list(trajs)
    demo = [False] * len(trajs)
    for index, shown in enumerate(oracle_demonstrations(questions, run.tokenizer, run.browser, run.rollout_cfg,
                                                        PLANS[cfg.demo_plan])):
        if shown is not None:
            trajs[(index + 1) * G - 1] = shown
            demo[(index + 1) * G - 1] = True
    return trajs, demo


def build_samples(trajs: list, golds: list, cfg: Config, demo: list[bool] | None = None) -> Batch:
    """Rewards against the gold answers (golds[trajectory.group]) and group advantages (groups never straddle
    ranks: questions are sharded, not trajectories); a trajectory the web or the engine ended says nothing about the
    policy, so it is masked (module docstring). demo: rows that are demonstrations (no sampler log-probs)."""
    demo = demo or [False] * len(trajs)
    G = cfg.group_size
    rewards = [reward([turn.text for turn in traj.turns], golds[traj.group], protocol=cfg.protocol) for traj in trajs]
    scores = torch.tensor([result.score for result in rewards], dtype=torch.float32)
    valid = torch.tensor([not (cfg.mask_tool_failures and traj.end_reason in INFRA_END_REASONS) for traj in trajs],
                         dtype=torch.bool)
    advantages = group_advantages(scores, G, cfg.norm_adv_by_std, valid=valid)
    zero_var = zero_variance_groups(scores, G, valid=valid)
    n_valid = valid.reshape(-1, G).sum(dim=1)  # (Q,)
    skipped = (n_valid < 2) & (n_valid < G)
    samples = []
    for i, traj in enumerate(trajs):
        dropped = skipped[i // G] or (cfg.filter_groups and zero_var[i // G])
        if valid[i] and not dropped:
            sampler_logp = None if demo[i] else traj.logprobs
            samples.append(Sample(traj.tokens, traj.loss_mask, float(advantages[i]), traj.group,
                                  sampler_logp=sampler_logp))
    return Batch(trajs, golds, rewards, advantages, valid, zero_var, skipped, samples, demo)


def peak_memory_bytes(proc: Dist) -> int:
    """The GPU allocator's peak since the step began, or on a CPU the process's peak RSS (Linux reports KiB)."""
    if proc.device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_metrics(batch: Batch, update_stats: dict, seconds: dict, cfg: Config, proc: Dist, step: int) -> dict:
    """The step's metrics: sums and counts over all ranks in one collective, then means. reward, f1, em and
    format_error are over the judged trajectories (missing when every one was masked), zero_var_groups over the
    groups compared (not skipped), the rest per trajectory; times and memory are the slowest rank's. Demonstrations
    (group_demo) count in zero_var_groups and the update's diagnostics, nowhere else: the rest is the policy's."""
    trajs = [traj for traj, is_demo in zip(batch.trajs, batch.demo) if not is_demo]
    judged = [result for result, valid, is_demo in zip(batch.rewards, batch.valid.tolist(), batch.demo)
              if valid and not is_demo]
    compared = ~batch.skipped
    sums = all_reduce_dict({
        "reward": sum(result.score for result in judged), "reward_sq": sum(result.score ** 2 for result in judged),
        "f1": sum(result.f1 for result in judged), "em": sum(result.em for result in judged),
        "format_error": sum(not result.format_ok for result in judged), "judged": len(judged),
        "zero_var_groups": int((batch.zero_var & compared).sum()), "compared_groups": int(compared.sum()),
        "turns": sum(len(traj.turns) for traj in trajs),
        "search_calls": sum(traj.stats.get("n_search", 0) for traj in trajs),
        "browse_calls": sum(traj.stats.get("n_browse", 0) for traj in trajs),
        "response_len": sum(sum(traj.loss_mask) for traj in trajs), "seq_len": sum(len(traj.tokens) for traj in trajs),
        "trajectories": len(trajs), "time_tools_sum": sum(turn.tool_s or 0.0 for traj in trajs for turn in traj.turns),
        "masked_tool_failures": int((~batch.valid).sum()), "skipped_groups": int(batch.skipped.sum()),
        "group_demos": sum(batch.demo),
        **{f"end_{reason}": sum(traj.end_reason == reason for traj in trajs) for reason in END_REASONS}}, "sum", proc)
    slowest = all_reduce_dict({**seconds, "peak_mem_gib": peak_memory_bytes(proc) / 2**30}, "max", proc)
    n_trajs = max(sums["trajectories"], 1.0)
    metrics = judged_means(sums)
    metrics["zero_var_groups"] = mean_or_missing(sums, "zero_var_groups", "compared_groups")
    for key in ("turns", "search_calls", "browse_calls", "response_len", "seq_len"):
        metrics[key] = sums[key] / n_trajs
    for key in ("entropy", "kl", "clipfrac", "loss", "grad_norm", "logp_diff"):
        metrics[key] = update_stats[key]
    metrics["lr"] = lr_at(step, cfg)
    metrics["time_rollout"] = slowest["time_rollout"]
    metrics["time_tools_sum"] = sums["time_tools_sum"] / proc.world
    metrics["time_learn"] = slowest["time_learn"]
    metrics["tok_per_s"] = (sums["response_len"] + update_stats["train_tokens"]) / max(sum(seconds.values()), 1e-9)
    metrics["peak_mem_gib"] = slowest["peak_mem_gib"]
    for key, value in sums.items():
        if key.startswith("end_") or key in ("masked_tool_failures", "skipped_groups", "group_demos"):
            metrics[key] = int(value)
    return metrics


def behaviour_metrics(trajs: list, rows: list[dict], results: list, kinds: list[str], proc: Dist,
                      prefix: str = "") -> dict:
    """What the agent did, over every trajectory of all ranks (reward.behaviour): the share that searched twice, of
    bridge questions' trajectories the share whose later query named the bridge entity, the share whose answer is a
    shown result's title; per question kind (the data's `template`) searches per trajectory and F1. rows[traj.group]
    is the trajectory's question; a share or mean with nothing to count is missing."""
    sums = {"trajectories": len(trajs), "searched_twice": 0, "bridge_trajectories": 0, "bridge_in_later_query": 0,
            "answer_is_title": 0}
    for kind in kinds:
        sums.update({f"n/{kind}": 0, f"search_calls/{kind}": 0, f"f1/{kind}": 0.0})
    for traj, result in zip(trajs, results):
        row = rows[traj.group]
        done = turns_behaviour(turn_records(traj), traj.stats["n_search"], row.get("bridge"),
                               result.answer if result.format_ok else None)
        sums["searched_twice"] += done["searched_twice"]
        sums["answer_is_title"] += done["answer_is_title"]
        if done["bridge_in_later_query"] is not None:
            sums["bridge_trajectories"] += 1
            sums["bridge_in_later_query"] += done["bridge_in_later_query"]
        kind = row.get("template")
        if kind in kinds:
            sums[f"n/{kind}"] += 1
            sums[f"search_calls/{kind}"] += traj.stats["n_search"]
            sums[f"f1/{kind}"] += result.f1
    sums = all_reduce_dict(sums, "sum", proc)
    metrics = {
        f"{prefix}searched_twice": mean_or_missing(sums, "searched_twice", "trajectories"),
        f"{prefix}bridge_in_later_query": mean_or_missing(sums, "bridge_in_later_query", "bridge_trajectories"),
        f"{prefix}answer_is_title": mean_or_missing(sums, "answer_is_title", "trajectories")}
    for kind in kinds:
        metrics[f"{prefix}search_calls/{kind}"] = mean_or_missing(sums, f"search_calls/{kind}", f"n/{kind}")
        metrics[f"{prefix}f1/{kind}"] = mean_or_missing(sums, f"f1/{kind}", f"n/{kind}")
    return metrics


def search_queries(turns: list[dict]) -> list[str]:
    """Every query of the turns' web_search calls, in order (calls that ran or were answered with an error alike).
    turns: turn_records of a trajectory, or an eval record's "turns"."""
    queries = []
    for turn in turns:
        if turn.get("tool") == "web_search" and turn.get("args"):
            queries += [str(query) for query in turn["args"].get("query", [])]
    return queries


def turns_behaviour(turns: list[dict], n_searches: int, bridge: str | None, answer: str | None) -> dict:
    """reward.behaviour of one trajectory's turns (turn_records): its queries, the result titles it was shown
    (browse.shown_titles), its bridge entity if it has one. eval.py's summary reads records through it too."""
    titles = [title for turn in turns for title in shown_titles(turn.get("observation"))]
    return behaviour(n_searches, search_queries(turns), titles, bridge, answer)


def judged_means(sums: dict) -> dict:
    """reward, reward_std, f1, em and format_error over the judged trajectories; all missing (None) when the web or
    the engine ended every one (a 0.0 would draw a fake drop in reward.png and wandb)."""
    if sums["judged"] == 0:
        return dict.fromkeys(("reward", "reward_std", "f1", "em", "format_error"))
    mean = sums["reward"] / sums["judged"]
    return {"reward": mean, "reward_std": math.sqrt(max(sums["reward_sq"] / sums["judged"] - mean * mean, 0.0)),
            "f1": sums["f1"] / sums["judged"], "em": sums["em"] / sums["judged"],
            "format_error": sums["format_error"] / sums["judged"]}


# ----------------------------------------------------------------------------------------------------------------
# The algorithm, 5: the warm start (a departure from the paper for small models; warm_start_demos=0, the deepresearcher
# preset, turns it off). GRPO sharpens what the policy already does sometimes: DeepResearcher's 7B made 2-3 calls per
# question before training, while SmolLM2-135M never searches twice, so RL has nothing to amplify. Before the first
# GRPO step the policy reads scripted demonstrations: the trajectories of an agent that knows the supporting articles,
# on training questions (demo_plan: the question as it is first, then each supporting article that search did not
# return and a bridge's bridge entity, rollout.question_first_plan; or one search per supporting article,
# rollout.oracle_plan; then the answer its searches showed), replayed through the policy's own
# prompt, tools and token framing (rollout.scripted_trajectory), so their tokens are exactly those the policy would
# sample to do the same. The loss is the token-mean negative log-likelihood of the tokens GRPO trains (loss mask 1) and
# of nothing else: the gradient of GRPO's own update with every advantage 1, on-policy. warm_start_templates sets
# which templates they come from and how many from each. Measured on the 111 bridge dev questions (greedy, README):
# after one pass (8 steps), where the demonstrations hold one-search kinds (read, single-hop) the warm-started policy
# never searches twice; from bridges and comparisons it always does, and names the bridge entity in its second query
# on 27% of them; from bridges alone on 76%. Mixes with counts flip between all and nothing with the mix (README: 2.5%
# to 100% of bridges searched twice), not with the question. Three passes (warm_start_epochs=3, the default) over
# bridge:24,comparison:16 and the rest make the searches follow the question
# (bridges searched twice, most read questions once), at a cost to single-hop questions (README: "Three passes").

def demonstrations(questions: list[dict], tokenizer, browser, cfg: Config, proc: Dist) -> list[Sample]:
    """This rank's share of warm_start_demos oracle demonstrations, from training questions (in a seeded order; of
    warm_start_templates, when set, with its counts) that name their supporting articles and whose answer the
    oracle's searches show; each is its own group."""
    rollout_cfg = subconfig(RolloutConfig, cfg)
    order = epoch_permutation(len(questions), epoch=-1, seed=cfg.seed).tolist()  # not the first epoch's order
    counts, shared = template_mix(cfg.warm_start_templates, cfg.warm_start_demos)
    limits = {**counts, None: cfg.warm_start_demos - sum(counts.values())}  # None: the templates without a count
    if counts or shared:
        order = [index for index in order if questions[index].get("template") in counts.keys() | shared]
        if not order:
            raise ValueError(f"warm_start_templates={cfg.warm_start_templates}: no training question in {cfg.data} "
                             f"has one of these templates; pass --warm_start_templates= to draw from every question")
    taken = collections.Counter()
    demos = []
    chunk_size = max(cfg.warm_start_demos, 1)  # questions scripted at once: one Framing per chunk
    for start in range(0, len(order), chunk_size):
        chunk = [questions[index] for index in order[start: start + chunk_size]]
        for traj in oracle_demonstrations(chunk, tokenizer, browser, rollout_cfg, PLANS[cfg.demo_plan]):
            if traj is None:
                continue
            template = chunk[traj.group].get("template")
            key = template if template in counts else None
            if taken[key] == limits[key]:
                continue
            taken[key] += 1
            demos.append(Sample(traj.tokens, traj.loss_mask, advantage=1.0, group=len(demos)))
        if len(demos) == cfg.warm_start_demos:
            break
    return demos[proc.rank:: proc.world]


def template_mix(spec: str, n_demos: int) -> tuple[dict, set]:
    """warm_start_templates parsed: ({template: its count of demonstrations}, {templates listed without a count,
    which share what the counts leave of n_demos}). "bridge:24,read,comparison" = 24 bridges and n_demos - 24 from
    read and comparison questions in the seeded order; "bridge" = n_demos bridges; "" = any template."""
    counts = {}
    shared = set()
    for entry in filter(None, spec.split(",")):
        template, _, count = entry.partition(":")
        if not count:
            shared.add(template)
        elif count.isdigit() and int(count) > 0:
            counts[template] = int(count)
        else:
            raise ValueError(f"warm_start_templates: {entry!r} needs a positive whole count after the colon "
                             f"(e.g. bridge:24)")
    if sum(counts.values()) > n_demos:
        raise ValueError(f"warm_start_templates={spec}: the counts add up to {sum(counts.values())}, more than "
                         f"warm_start_demos={n_demos}; raise --warm_start_demos or lower the counts")
    return counts, shared


def oracle_demonstrations(questions: list[dict], tokenizer, browser, rollout_cfg: RolloutConfig, plan) -> list:
    """The scripted `plan`'s trajectory on each training question (an agent that knows the supporting articles:
    rollout.question_first_plan or oracle_plan), in the policy's framing (Trajectory.group: the question's index);
    None for a question that names no supporting articles (oracle_queries) or whose script does not end with the
    right answer."""
    scripted = [question for question in questions if question.get("oracle_queries")]
    trajs = iter(scripted_rollout(plan, tokenizer, scripted, browser, rollout_cfg))
    shown = []
    for index, question in enumerate(questions):
        traj = next(trajs) if question.get("oracle_queries") else None
        if traj is not None:
            traj.group = index
            result = reward([turn.text for turn in traj.turns], question["answers"], protocol=rollout_cfg.protocol)
            if traj.end_reason != "answer" or result.f1 != 1.0:
                traj = None
        shown.append(traj)
    return shown


def common_prefix_length(samples: list[Sample]) -> int:
    """Leading tokens every sample shares before its first trained token (the system prompt and the worked example):
    computed once per micro-batch (token_logprobs' prefix)."""
    limit = min(prompt_length(sample) for sample in samples)
    first = samples[0].tokens
    length = 0
    while length < limit and all(sample.tokens[length] == first[length] for sample in samples):
        length += 1
    return length


def supervised_step(model, optimizer, part: list[Sample], cfg: Config, proc: Dist) -> tuple[float, float]:
    """One optimizer step on the token-mean negative log-likelihood of `part`'s loss-mask tokens over all ranks.
    Returns (that NLL per trained token, before the step; the gradient norm)."""
    n_tokens = all_reduce_dict({"tokens": sum(sum(sample.loss_mask[1:]) for sample in part)}, "sum", proc)["tokens"]
    with update_precision(cfg, proc):
        nll_sum = 0.0
        for rows_and_prefix in in_lockstep(micro_batches(part, cfg.micro_tokens, share=False), proc):
            if rows_and_prefix is None:  # fewer micro-batches here than on another rank: still join FSDP's collectives
                zero_loss_pass(model, proc)
                continue
            rows, _ = rows_and_prefix
            chosen = [part[i] for i in rows]
            prefix = common_prefix_length(chosen) if len(chosen) > 1 else 0
            micro = collate(chosen, proc.device, prefix=prefix)
            logp, _ = token_logprobs(model, micro.tokens, micro.mask, prefix=prefix)  # (B, T-1), temperature 1
            nll = -logp.sum()
            (nll / n_tokens * proc.world).backward()  # FSDP averages gradients over ranks: scale back to the global sum
            nll_sum += nll.item()
    grad_norm = clip_and_step(model, optimizer, cfg)
    total_nll = all_reduce_dict({"nll": nll_sum}, "sum", proc)["nll"]
    return total_nll / max(n_tokens, 1.0), grad_norm


def warm_start(run: Run, cfg: Config, proc: Dist) -> dict:
    """Supervised steps on the demonstrations, warm_start_batch per optimizer step, warm_start_epochs passes, at
    warm_start_lr with its own AdamW; the warm-started model is exported to out_dir/warm_start/hf (eval.py reads
    it). Returns metrics: the NLL per trained token of the first and the last step, the demonstrations used, the
    seconds it took."""
    started = time.perf_counter()
    n_blocks = len(run.model.model.layers)
    if cfg.warm_start_frozen_layers >= n_blocks:
        raise ValueError(f"warm_start_frozen_layers={cfg.warm_start_frozen_layers} leaves none of the model's "
                         f"{n_blocks} transformer blocks to train: pass {n_blocks - 1} or less (0 trains the whole "
                         f"model)")
    demos = demonstrations(run.questions, run.tokenizer, run.browser, cfg, proc)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=cfg.warm_start_lr, weight_decay=0.0)
    per_rank = max(cfg.warm_start_batch // proc.world, 1)
    steps_per_epoch = int(all_reduce_dict({"steps": math.ceil(len(demos) / per_rank)}, "max", proc)["steps"])
    n_steps = steps_per_epoch * cfg.warm_start_epochs
    nll_per_token = []
    this_pass = demos
    run.model.frozen_blocks = cfg.warm_start_frozen_layers
    try:
        for step in tqdm(range(n_steps), desc="warm start", disable=not proc.main):
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            if step_in_epoch == 0 and epoch > 0:  # a later pass: the previous pass's demonstrations, seeded shuffle
                order = epoch_permutation(len(demos), epoch=epoch, seed=cfg.seed).tolist()
                this_pass = [this_pass[index] for index in order]
            part = this_pass[step_in_epoch * per_rank: (step_in_epoch + 1) * per_rank]
            step_nll, _ = supervised_step(run.model, optimizer, part, cfg, proc)
            nll_per_token.append(step_nll)
    finally:
        run.model.frozen_blocks = 0
    n_demos = all_reduce_dict({"demos": len(demos)}, "sum", proc)["demos"]
    metrics = {"warm_start_demos": n_demos, "warm_start_steps": n_steps,
               "warm_start_nll_first": nll_per_token[0] if nll_per_token else None,
               "warm_start_nll_last": nll_per_token[-1] if nll_per_token else None,
               "time_warm_start": time.perf_counter() - started}
    if proc.main:
        print("warm start | " + " | ".join(f"{key} {value:.4g}" for key, value in metrics.items() if value is not None))
    export_hf(run.model, run.tokenizer, Path(cfg.out_dir) / "warm_start" / "hf", cfg, proc)
    return metrics


# ================================================================================================================
# Plumbing: start-up checks, processes and FSDP, data, checkpoints, logging, the run. Nothing below changes the math.

# ----------------------------------------------------------------------------------------------------------------
# Start-up checks: bad input stops here with one line that says what to do, before any model loads. eval.py reuses
# `validate` for the fields it shares (a check applies when the config has that field).

DEMO_PLANS = ("question_first", "oracle")  # rollout.PLANS that know the supporting articles
# field -> smallest allowed value: the loop divides by some and ranges over others (0 = off for the optional ones)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # see the module docstring
MINIMUM = dict(steps=1, group_size=2, batch_size=1, max_turns=1, max_new_tokens=1, max_len=2, n_slots=1,
               micro_tokens=1, save_every=1, keep_last=1, n_minibatches=1, ppo_epochs=1, top_k=1, limit=0,
               warm_start_epochs=1, warmup_steps=0, plot_every=0, temperature=0, lr=0, kl_coef=0, entropy_coef=0,
               grad_clip=0, warm_start_frozen_layers=0)


def check_model(name: str) -> None:
    """A local model folder must exist and hold config.json (else resolve_model would report a hub failure)."""
    folder = Path(name).expanduser()
    if name == "tiny" or (folder / "config.json").exists():
        return
    if (folder / "hf" / "config.json").exists():
        raise SystemExit(f"--model={name}: that is a training checkpoint; its Hugging Face folder is {folder / 'hf'}")
    if folder.exists() or name.startswith(("/", ".", "~")) or name.count("/") >= 2:  # a folder, not "org/name"
        what = "has no config.json" if folder.exists() else "does not exist"
        raise SystemExit(f"--model={name}: {folder} {what}; pass a Hugging Face checkpoint folder (e.g. "
                         f"runs/train/ckpt/step_000004/hf) or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct")


def validate(cfg) -> None:
    """Every start-up check on a Config (train.py's or eval.py's): numbers in range, the model folder, the data
    file (read and parsed: empty, malformed or question-less rows stop here), out_dir writable."""
    for key, low in MINIMUM.items():
        value = getattr(cfg, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= low:  # catches NaN too
            why = ""
            if key == "group_size":
                why = "GRPO compares each trajectory with the others of its question, so a group needs at least 2; "
            raise SystemExit(f"--{key}={value}: must be at least {low}; {why}e.g. "
                             f"--{key}={getattr(type(cfg)(), key)}")
    if getattr(cfg, "loss_agg", "token-mean") not in LOSS_AGGS:
        raise SystemExit(f"--loss_agg={cfg.loss_agg}: use one of {', '.join(LOSS_AGGS)}")
    if getattr(cfg, "cpu_bf16", "auto").lower() not in {"auto", *BOOLS}:
        raise SystemExit(f"--cpu_bf16={cfg.cpu_bf16}: use auto (bf16 where the CPU has bf16 instructions), true or "
                         f"false")
    if getattr(cfg, "demo_plan", "question_first") not in DEMO_PLANS:
        raise SystemExit(f"--demo_plan={cfg.demo_plan}: use one of {', '.join(DEMO_PLANS)}")
    if getattr(cfg, "dry_run", False):  # an estimate needs neither the data nor the weights
        return
    check_model(cfg.model)
    load_questions(cfg.data)  # raises SystemExit with the file, the line and what to fix
    try:  # a read-only or missing mount fails here, not at the first save
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out_dir).close()
    except OSError as error:
        raise SystemExit(f"--out_dir={cfg.out_dir}: cannot write there ({error.strerror or error}); "
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
    proc = Dist()
    if torchrun:
        proc = Dist(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
                    local_rank=int(os.environ["LOCAL_RANK"]))
    proc.device = torch.device("cuda", proc.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(proc.device)
    if torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=proc.device if use_cuda else None)
    elif not dist.is_initialized():  # one GPU without torchrun: a 1-rank group anyway, so FSDP2's bf16 as on 8 GPUs
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return proc


def is_distributed() -> bool:
    """Whether a process group is up (torchrun, or one GPU): collectives and FSDP apply."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_dict(values: dict[str, float], op: str = "sum", proc: Dist | None = None) -> dict[str, float]:
    """Reduce named floats over ranks in one collective (float64, so sums of counts stay exact)."""
    if not is_distributed():
        return {key: float(value) for key, value in values.items()}
    device = "cpu"  # gloo reduces on the CPU
    if dist.get_backend() == "nccl":
        device = (proc or Dist()).device
    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=getattr(dist.ReduceOp, REDUCE_OPS[op]))
    return dict(zip(values, packed.tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Model: load, shard with FSDP2, unshard for rollouts

def fsdp_modules(model) -> list:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def build_model(path: str, cfg: Config, proc: Dist, trainable: bool = True):
    """Load an HF checkpoint (fp32 master weights) and, when distributed or on GPU, shard it with FSDP2. Rank 0 reads
    the weights; the other ranks build on the meta device and receive their shards by broadcast, so the job holds
    one full host copy in all, not one per GPU."""
    if not is_distributed():
        model = Transformer.from_pretrained(path, dtype=torch.float32, device=proc.device)
    else:
        full_sd = {}
        if proc.main:
            full_sd = Transformer.from_pretrained(path, dtype=torch.float32, device="cpu").state_dict()
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
    options = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    if proc.device.type == "cuda":  # fp32 master weights, bf16 compute, fp32 gradient reduction
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, **options)
        block.fsdp_reshard_after_forward = True  # FSDP2's default for a non-root group; `unsharded` restores it
    fully_shard(model, **options)  # the root group: embeddings, final norm and (tied or not) lm_head
    # FSDP2 keeps the root's parameters after forward (its lazy init sets False: they are needed again at once for
    # backward); recorded because the module offers no public getter and `unsharded` must put it back
    model.fsdp_reshard_after_forward = False
    if any(param.is_meta for param in model.parameters()):
        model.to_empty(device="cpu" if cpu_offload else proc.device)
        if model.config.tie_word_embeddings:  # keep one parameter under both names
            model.lm_head.weight = model.model.embed_tokens.weight
    return model


@contextlib.contextmanager
def unsharded(model):
    """All-gather every FSDP group once and keep them gathered for the whole rollout (else every decoded token would
    all-gather every layer), eval mode and no autograd inside; on exit reshard, and each group gets back its own
    setting (recorded by apply_fsdp; FSDP2's defaults otherwise: the root False, others True)."""
    modules = fsdp_modules(model)
    before = [getattr(module, "fsdp_reshard_after_forward", module is not model) for module in modules]
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        for module, previous in zip(modules, before):
            module.reshard()
            module.set_reshard_after_forward(bool(previous), recurse=False)


# ----------------------------------------------------------------------------------------------------------------
# Data: a fixed permutation per epoch, a global cursor, rank r takes every world-th question of the batch

def load_questions(path: str) -> list[dict]:
    """[{question, answers, ...}] from a data file (data/prepare.py's reader); a relative path not found here is taken
    from the repository (`torchrun train.py` from another folder)."""
    file = Path(path) if Path(path).is_absolute() or Path(path).exists() else ROOT / path
    if not path or not file.is_file():
        raise SystemExit(f"--data={path}: file not found; build one with the scripts in data/ "
                         f"(data/qa_train.jsonl is the offline default)")
    try:
        rows = load_examples(file)
    except (ValueError, OSError) as error:  # malformed JSON, a row without a question, an unreadable file
        raise SystemExit(f"--data={path}: {error}") from None
    if not rows:
        raise SystemExit(f"--data={path}: {file} holds no questions; point --data at a JSONL file with one "
                         f'{{"question": ..., "answers": [...]}} per line')
    return rows  # question and answers, and the research set's oracle_queries (the warm start's demonstrations)


def question_kinds(rows: list[dict]) -> list[str]:
    """The data's question kinds (its `template` field), sorted: the same list on every rank, so per-kind counts
    reduce in one collective."""
    return sorted({row["template"] for row in rows if row.get("template")})


def epoch_permutation(n: int, epoch: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the questions of global step `step`: epochs are seeded permutations, read in order. A pure
    function of (n, step, batch, seed), so the data position after a resume is exact by construction."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [int(epoch_permutation(n, pos // n, seed)[pos % n]) for pos in positions]


def rng_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the generator used at (seed, step, rank): distinct streams, reproducible after a resume."""
    return (seed * 1_000_003 + step) * 65_537 + rank


# ----------------------------------------------------------------------------------------------------------------
# Run hygiene and checkpoints: out_dir/ckpt/step_NNNNNN/{dcp/, hf/, state.json, rng_rank{r}.pt}, each written to a
# .tmp folder and renamed, so a step folder is complete or absent. --resume continues from one, --overwrite deletes
# the earlier run; without either, out_dir must not hold one (its metrics would be appended to).

# what --overwrite deletes
RUN_OUTPUTS = ("metrics.jsonl", "ckpt", "rollouts", "reward.png", "config.json", "report.html", "warm_start")


def step_folders(cfg: Config) -> list[Path]:
    """Step folders in out_dir, oldest first (`step_000003.tmp` is a save that was killed: never one of them)."""
    return sorted(folder for folder in (Path(cfg.out_dir) / "ckpt").glob("step_*[0-9]") if folder.is_dir())


def latest_checkpoint(cfg: Config) -> Path | None:
    folders = step_folders(cfg)
    return folders[-1] if folders else None


def step_number(folder: Path) -> int:
    return int(folder.name.split("_")[-1])


def resume_target(cfg: Config) -> str | None:
    """--resume: None (a new run), "auto" (the newest intact checkpoint in out_dir) or a step folder."""
    value = str(cfg.resume).strip()
    if value.lower() in ("", "0", "false", "no", "none"):
        return None
    return "auto" if value.lower() in ("1", "true", "yes", "auto", "latest") else value


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a step folder, naming the file, or None when it is complete: state.json, the DCP metadata
    and the RNG state of every rank that saved (state.json's world_size) read as a resume reads them, and each
    .distcp shard as long as the metadata says (dcp.load fails on a short one only half way, naming no file).
    A damaged file fails in many ways (unpickling can raise almost anything), hence the broad excepts."""
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
        saved_world = int(state.get("world_size", 1))
    except Exception as error:
        return f"{state_file}: {type(error).__name__}: {error}"
    try:
        metadata = dcp.FileSystemReader(str(path / "dcp")).read_metadata()
    except Exception as error:
        return f"{path / 'dcp' / '.metadata'}: {type(error).__name__}: {error}"
    for rank in range(saved_world):
        rng_file = path / f"rng_rank{rank}.pt"
        try:
            torch.load(rng_file, weights_only=False)
        except Exception as error:
            return f"{rng_file}: {type(error).__name__}: {error}"
    for info in metadata.storage_data.values():  # where each tensor's bytes are: shard file, offset, length
        shard = path / "dcp" / info.relative_path
        need = info.offset + info.length
        if not shard.exists():
            return f"{shard}: missing"
        if shard.stat().st_size < need:
            return f"{shard}: truncated ({shard.stat().st_size} of at least {need} bytes)"
    return None


def agree_on_step(intact_steps: list[int], proc: Dist | None = None) -> int:
    """The newest step every rank found intact, or -1. Each rank proposes its newest intact step not above the
    bound (at first its newest); the smallest proposal stands if every rank has it intact, else the bound goes
    below it and they try again. Every rank takes the same branches (they follow all-reduced values)."""
    bound = max(intact_steps, default=-1)
    while True:  # ends: `agreed` goes down every round
        proposal = max((step for step in intact_steps if step <= bound), default=-1)
        agreed = int(all_reduce_dict({"step": proposal}, "min", proc)["step"])
        if agreed < 0:
            return -1
        if all_reduce_dict({"intact": float(agreed in intact_steps)}, "min", proc)["intact"] == 1.0:
            return agreed
        bound = agreed - 1


def find_resume_checkpoint(cfg: Config, say=print, proc: Dist | None = None) -> Path | None:
    """The checkpoint --resume continues from: the folder given, or the newest step folder that is intact (every
    rank's files, checkpoint_problem) as seen by every rank (agree_on_step), a damaged newer one named and skipped;
    None when out_dir has none yet. All ranks return the same folder or all stop with the same message."""
    target = resume_target(cfg)
    if target != "auto":
        problem = checkpoint_problem(Path(target))
        damaged_anywhere = all_reduce_dict({"damaged": float(problem is not None)}, "max", proc)["damaged"]
        if damaged_anywhere:
            why = problem or "another rank cannot read it"
            raise SystemExit(f"--resume={target}: cannot resume from it ({why}); pass a step folder such as "
                             f"{Path(cfg.out_dir) / 'ckpt' / 'step_000003'}, or --resume=True for the newest")
        return Path(target)
    folders = step_folders(cfg)
    problems = {step_number(folder): checkpoint_problem(folder) for folder in folders}
    agreed = agree_on_step([step for step, problem in problems.items() if problem is None], proc)
    for folder in reversed(folders):  # the newer ones that are not resumed from: say why
        if step_number(folder) <= agreed:
            break
        say(f"checkpoint {folder.name} is damaged: {problems[step_number(folder)] or 'not intact on every rank'}")
    if agreed >= 0:
        chosen = Path(cfg.out_dir) / "ckpt" / f"step_{agreed:06d}"
        if folders and folders[-1] != chosen:
            say(f"resuming from the newest intact checkpoint, {chosen}, instead")
        return chosen
    if all_reduce_dict({"folders": len(folders)}, "max", proc)["folders"] > 0:
        raise SystemExit(f"no intact checkpoint in {Path(cfg.out_dir) / 'ckpt'} (see above); --overwrite=True "
                         f"starts the run again from step 0")
    return None


def disk_full(error: BaseException) -> bool:
    """Whether a failed save ran out of disk: ENOSPC in the exception chain (DCP's CheckpointException carries each
    rank's error in its text), or torch's zip writer's way of saying it ("unexpected pos 704 vs 598")."""
    text = "".join(traceback.format_exception(error))
    return any(sign in text for sign in ("No space left", f"[Errno {errno.ENOSPC}]", "unexpected pos"))


def export_hf(model, tokenizer, path: Path, cfg: Config, proc: Dist) -> None:
    """The Hugging Face folder of a checkpoint (rank 0 writes it). Its dtype with export_dtype=auto is the one the
    policy computed in: bf16 on GPU (FSDP's mixed precision casts the fp32 masters for every forward, so the bf16
    export is the model that sampled), fp32 on a CPU (a bf16 export of the default run rounds most of its update
    away: after 1 step at lr 2e-5, 92% of the changed weights round back to the base model's bf16 value)."""
    # FSDP2: gather full tensors on rank 0 (on the CPU); one process: the parameters themselves, no gathered copy
    if is_distributed():
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = model.state_dict()
    if model.config.tie_word_embeddings:
        full.pop("lm_head.weight", None)  # the same tensor as the embedding: HF files store it once
    if not proc.main:
        return
    dtype = torch.bfloat16 if proc.device.type == "cuda" else torch.float32
    if cfg.export_dtype != "auto":
        dtype = getattr(torch, cfg.export_dtype)
    for key in list(full):  # in place, key by key: at most one fp32 tensor and the bf16 export at once
        full[key] = full[key].detach().to(dtype)
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
        cuda_rng = torch.cuda.get_rng_state() if proc.device.type == "cuda" else None
        torch.save({"torch": torch.get_rng_state(), "cuda": cuda_rng}, tmp / f"rng_rank{proc.rank}.pt")
        export_hf(model, tokenizer, tmp / "hf", cfg, proc)
        if proc.main:  # written last: its presence says the folder is complete
            state = {"step": step, "data_position": step * cfg.batch_size, "world_size": proc.world,
                     "config": asdict(cfg), "history": history}
            (tmp / "state.json").write_text(json.dumps(state))
        barrier()
    except BaseException as error:  # anything, Ctrl-C included: clean up, then let it go on
        if proc.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, Exception) and disk_full(error):
            previous = latest_checkpoint(cfg)
            kept = f"the previous one, {previous}, is intact" if previous else "none kept"
            raise SystemExit(f"no space left on {final.parent.resolve()} while saving step {step}: removed the "
                             f"partial checkpoint; {kept}. Free some space (or --keep_last=1) and run again with "
                             f"--resume=True") from None
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
    state_dicts = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    dcp.load(state_dicts, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state_dicts["model"], optim_state_dict=state_dicts["optim"])
    rng_file = path / f"rng_rank{proc.rank}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and proc.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def trim_metrics(path: Path, last_step: int) -> None:
    """metrics.jsonl keeps the lines of steps up to `last_step` (the later ones will run again: the run died after
    logging them, before saving). A line that does not decode (torn by a full disk or a kill) is dropped."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def start_state(cfg: Config, proc: Dist, model, optimizer, resume_from: Path | None) -> tuple[int, list[dict]]:
    """(first step, history) of a resumed run: what the checkpoint saved, or 0 and [] when out_dir had none yet."""
    state = {"step": 0}
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer, proc)
    if proc.main:
        if resume_from:
            print(f"resumed from {resume_from} at step {state['step']}")
        else:
            print(f"--resume={cfg.resume} but no checkpoint in {Path(cfg.out_dir) / 'ckpt'}: starting from step 0")
        metrics_file = Path(cfg.out_dir) / "metrics.jsonl"
        if metrics_file.exists():
            trim_metrics(metrics_file, state["step"])
    return state["step"], state.get("history", [])


# ----------------------------------------------------------------------------------------------------------------
# Logging

def command_line(cfg: Config, script: str = "train.py", **changes) -> str:
    """A `python train.py ...` line that reproduces `cfg` (with `changes`): the options this process was given
    when it was started from the command line, else every field that differs from the defaults."""
    if Path(sys.argv[0]).name == script:
        args = [arg for arg in sys.argv[1:] if arg.split("=", 1)[0].lstrip("-").replace("-", "_") not in changes]
    else:  # called as a function (tests, notebooks): spell the config out
        args = [f"--{key}={value}" for key, value in config_changes(cfg).items() if key not in changes]
    args += [f"--{key}={value}" for key, value in changes.items()]
    launcher = "python"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = "torchrun <the same launcher options>"
    return " ".join([launcher, script] + [shlex.quote(arg) for arg in args])


def config_changes(cfg) -> dict:
    """The fields of a config dataclass that differ from its defaults."""
    defaults = asdict(type(cfg)())
    return {key: value for key, value in asdict(cfg).items() if value != defaults[key]}


# eval.py's offline preset is the AgentConfig defaults, greedy: these fields do not change its answers
NOT_FOR_EVAL = ("model", "temperature", "top_p", "seed", "device", "n_slots")


def eval_command(cfg: Config, model: str) -> str:
    """The eval.py line that scores `model` on the offline dev set with this run's agent settings."""
    base = AgentConfig()
    args = ["--preset=offline", f"--model={model}"]
    for agent_field in fields(AgentConfig):
        value = getattr(cfg, agent_field.name)
        if value != getattr(base, agent_field.name) and agent_field.name not in NOT_FOR_EVAL:
            args.append(f"--{agent_field.name}={value}")
    return " ".join(["python eval.py"] + [shlex.quote(arg) for arg in args])


def plot_rewards(history: list[dict], path: Path) -> None:
    """reward.png: mean reward, F1 and format-error rate per step (matplotlib, no display needed); a step whose
    value is missing (every trajectory masked) is a gap in its line."""
    import matplotlib  # optional for the loop itself: imported only when a plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("reward", "mean reward"), ("f1", "F1 (training samples)"),
                       ("format_error", "format-error rate")):
        values = [entry.get(key) for entry in history]
        ax.plot(steps, [float("nan") if value is None else value for value in values], marker="o", ms=3, label=label)
    dev = []
    for entry in history:  # the learning curve: greedy F1 on a fixed dev subset, measured every eval_every steps
        if entry.get("dev_f1") is not None:
            dev.append((entry["step"], entry["dev_f1"]))
        if entry.get("dev_f1_warm_start") is not None:  # after the warm start, before step 1: a jump at step 0
            dev.append((entry["step"], entry["dev_f1_warm_start"]))
    if dev:
        ax.plot([step for step, _ in dev], [f1 for _, f1 in dev], marker="s", ms=5, lw=2, color="black",
                label="dev F1 (greedy)")
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
    return [asdict(turn) if is_dataclass(turn) else dict(turn) for turn in traj.turns]


def trajectory_record(traj, gold: list[str], result, advantage: float, tokenizer) -> dict:
    """A full trajectory as JSON: the exact tokens with their loss mask and sampled log-probs (4 decimals: the
    report's per-token view), the decoded text, every turn, the reward and the advantage."""
    return {"question": traj.question, "gold": gold, "end_reason": traj.end_reason, "answer": traj.answer,
            "reward": result.score, "f1": result.f1, "format_ok": result.format_ok, "reason": result.reason,
            "advantage": advantage, "n_tokens": len(traj.tokens), "n_sampled": sum(traj.loss_mask),
            "prompt_len": traj.prompt_len, "stats": traj.stats, "tokens": list(traj.tokens),
            "loss_mask": list(traj.loss_mask), "logprobs": [round(float(lp), 4) for lp in traj.logprobs],
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


def step_line(step: int, metrics: dict) -> str:
    """`step 3 | reward 0.123 | f1 0.2 | ...`: one greppable line per step (missing values are left out, and so are
    the per-kind breakdowns, keys with a "/": metrics.jsonl and the report hold them)."""
    parts = [f"step {step}"]
    for key, value in metrics.items():
        if "/" in key:
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str)):
            parts.append(f"{key} {value}")
    return " | ".join(parts)


def log_step(step: int, metrics: dict, batch: Batch, run: Run, wandb_run, cfg: Config, proc: Dist) -> None:
    """Rank 0: the step's line, metrics.jsonl (and wandb), a few full trajectories, the curve; every rank: history."""
    run.history.append({"step": step, **{key: metrics.get(key) for key in ("reward", "f1", "format_error", "dev_f1")}})
    if not proc.main:
        return
    tqdm.write(step_line(step, metrics))
    with open(Path(cfg.out_dir) / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, **metrics}) + "\n")
    if wandb_run is not None:  # a missing value (None) is not logged: wandb would draw it as 0
        wandb_run.log({key: value for key, value in metrics.items() if isinstance(value, (int, float))}, step=step)
    dump = []
    for i in range(min(cfg.n_log_rollouts, len(batch.trajs))):
        traj = batch.trajs[i]
        dump.append(trajectory_record(traj, batch.golds[traj.group], batch.rewards[i], float(batch.advantages[i]),
                                      run.tokenizer))
    with open(Path(cfg.out_dir) / "rollouts" / f"step_{step:06d}.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in dump)
    if cfg.plot_every and step % cfg.plot_every == 0:
        plot_rewards(run.history, Path(cfg.out_dir) / "reward.png")


# ----------------------------------------------------------------------------------------------------------------
# The run

@dataclass
class Run:
    """What a training run holds from step to step (open_run builds it)."""
    tokenizer: object
    model: torch.nn.Module
    ref_model: torch.nn.Module | None   # the frozen initial policy (kl_coef > 0)
    optimizer: torch.optim.Optimizer
    questions: list[dict]               # the training set: [{question, answers}]
    dev: list[dict]                     # the fixed dev questions of the learning curve ([] = eval_every 0)
    browser: object
    rollout_cfg: object                 # rollout.RolloutConfig
    start: int                          # the first step to run (a resumed run's saved step)
    history: list[dict]                 # per step: reward, f1, format_error, dev_f1 (the curve; saved in state.json)
    engine: object                      # rollout's engine, built once: every rollout reseeds it (make_engine)
    kinds: list[str]                    # the training set's question kinds (templates): behaviour per kind


def dev_metrics(run: Run, cfg: Config, proc: Dist) -> dict:
    """Greedy F1 on a fixed list of dev questions (the learning curve; each rank runs its share), and what the
    agent did on them: dev_f1, then behaviour_metrics with the prefix "dev_" (per kind of the dev set's templates)."""
    mine = run.dev[proc.rank:: proc.world]
    trajs = []
    with unsharded(run.model):  # every rank joins the all-gather, even one with no question
        if mine:
            trajs = rollout(run.model, run.tokenizer, [q["question"] for q in mine], run.browser,
                            subconfig(RolloutConfig, cfg, temperature=0.0), group_size=1, seed=0, engine=run.engine)
    results = [reward([turn.text for turn in traj.turns], mine[traj.group]["answers"], protocol=cfg.protocol)
               for traj in trajs]
    sums = all_reduce_dict({"f1": sum(result.f1 for result in results), "n": len(results)}, "sum", proc)
    dev_kinds = question_kinds(run.dev)
    return {"dev_f1": sums["f1"] / max(sums["n"], 1.0),
            **behaviour_metrics(trajs, mine, results, dev_kinds, proc, prefix="dev_")}


def first_title_f1(run: Run, cfg: Config) -> float:
    """The shortcut's F1 on the learning curve's questions (search the question, answer the first title; no model):
    the line a trained agent must clear, printed beside the last dev F1. Cheap: searches only."""
    rollout_cfg = rule_config(subconfig(RolloutConfig, cfg))
    trajs = scripted_rollout(first_title_plan, run.tokenizer, run.dev, run.browser, rollout_cfg)
    f1s = [reward([turn.text for turn in traj.turns], run.dev[traj.group]["answers"], protocol=cfg.protocol).f1
           for traj in trajs]
    return sum(f1s) / max(len(f1s), 1)


def prepare_out_dir(cfg: Config, proc: Dist) -> tuple[str, Path | None]:
    """Checks that need the world size; out_dir wiped (--overwrite) or its checkpoint found (--resume); the model
    resolved; the config's changes printed, all of it saved. Returns (model folder, checkpoint to resume from)."""
    if cfg.batch_size % proc.world:
        raise SystemExit(f"batch_size={cfg.batch_size} must be divisible by the world size {proc.world}")
    if cfg.cpu_offload and proc.device.type != "cuda":
        raise SystemExit("--cpu_offload=True moves FSDP's sharded state from GPU to host memory: it needs GPUs")
    out = Path(cfg.out_dir)
    target = resume_target(cfg)
    earlier = [name for name in ("metrics.jsonl", "ckpt") if (out / name).exists()]
    if target is None and earlier and not cfg.overwrite:
        raise SystemExit(f"{out} already holds a run ({', '.join(earlier)}): --resume=True continues it, "
                         f"--out_dir=<new folder> starts another beside it, --overwrite=True deletes it first")
    if target is None and cfg.overwrite and proc.main:  # only the run's own outputs: out_dir may hold other files
        for output in (out / name for name in RUN_OUTPUTS):
            if output.is_dir():
                shutil.rmtree(output)
            else:
                output.unlink(missing_ok=True)
    barrier()
    resume_from = None
    if target:
        resume_from = find_resume_checkpoint(cfg, say=print if proc.main else say_nothing, proc=proc)
    # the first process of each node resolves (downloads or converts) the model into that node's cache, then the
    # others find it there; only rank 0 reads the weights, the others need config.json and the tokenizer
    path = resolve_model(cfg.model) if proc.local_rank == 0 else None
    barrier()
    path = path or resolve_model(cfg.model)
    if proc.main:
        (out / "rollouts").mkdir(parents=True, exist_ok=True)
        changes = " ".join(f"--{key}={value}" for key, value in config_changes(cfg).items())
        print(f"config: {changes or 'the defaults'} (all of it: {out / 'config.json'})")
        bf16 = bf16_updates(cfg, proc)
        if proc.device.type == "cpu":
            print(f"updates: {'bf16 autocast, fp32 weights' if bf16 else 'fp32'} (--cpu_bf16={cfg.cpu_bf16}; this "
                  f"CPU {'has' if cpu_has_bf16() else 'has no'} bf16 instructions)")
        resolved = {"resolved_model_path": str(path), "resolved_cpu_bf16": bf16}
        (out / "config.json").write_text(json.dumps({**asdict(cfg), **resolved}, indent=2))
    return path, resume_from


def say_nothing(*args) -> None:
    """`say` for the ranks that do not print."""


def open_run(cfg: Config, proc: Dist) -> Run:
    """Everything a run needs, built once: out_dir, the model (and the reference model), the optimizer, the data,
    the web, a resumed checkpoint; and the learning curve's first point, the model we were given."""
    path, resume_from = prepare_out_dir(cfg, proc)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = build_model(path, cfg, proc)
    ref_model = build_model(path, cfg, proc, trainable=False) if cfg.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=1e-8)
    questions = load_questions(cfg.data)
    start = 0
    history = []
    if resume_target(cfg):
        start, history = start_state(cfg, proc, model, optimizer, resume_from)
    browser = Browser(subconfig(BrowseConfig, cfg))
    dev = load_questions(cfg.eval_data)[: cfg.eval_n] if cfg.eval_every > 0 else []
    rollout_cfg = subconfig(RolloutConfig, cfg)
    with unsharded(model):  # the engine's cache takes the dtype the rollout computes in (bf16 under FSDP on a GPU)
        engine = make_engine(model, tokenizer, rollout_cfg, seed=cfg.seed)  # its KV pool lives as long as the run
    run = Run(tokenizer, model, ref_model, optimizer, questions, dev, browser, rollout_cfg, start, history, engine,
              question_kinds(questions))
    if dev and start == 0:  # the curve starts beside the no-model shortcut on the same questions
        history.append({"step": 0})
        if proc.main:
            history[-1]["dev_f1_first_title"] = first_title_f1(run, cfg)
            print(f"the first-title shortcut on {len(dev)} questions of {cfg.eval_data}: "
                  f"dev_f1 {history[-1]['dev_f1_first_title']:.4g}")
        if cfg.warm_start_demos == 0 or cfg.eval_before_warm_start:  # the model we were given
            history[-1].update(dev_metrics(run, cfg, proc))
            if proc.main:
                print(f"step 0 | dev_f1 {history[-1]['dev_f1']:.4g} (greedy)")
    if cfg.warm_start_demos > 0 and start == 0:
        point = warm_start(run, cfg, proc)
        if dev:  # the warm start alone, before any GRPO step: what RL adds is what comes after this point
            after = dev_metrics(run, cfg, proc)
            point.update({f"{key}_warm_start": value for key, value in after.items()})
            if proc.main:
                print(f"after the warm start | dev_f1 {point['dev_f1_warm_start']:.4g}")
        if history:
            history[-1].update(point)
        else:
            history.append({"step": 0, **point})
    return run


def numbers_problem(step: int, metrics: dict, finite_update: bool, cfg: Config) -> str:
    """Why the run must stop now, or "": a NaN/inf loss, reward or entropy, or a gradient that was not applied.
    The metrics are all-reduced, so every rank takes the same decision."""
    values = [metrics[key] for key in ("loss", "reward", "entropy") if metrics[key] is not None]
    if finite_update and all(math.isfinite(value) for value in values):
        return ""
    return (f"step {step}: loss or gradient is NaN/inf; the update was not applied. Stopping; the last good "
            f"checkpoint is {latest_checkpoint(cfg)}. Lower --lr or check the data.")


def end_run(cfg: Config, proc: Dist, history: list[dict], stop: str, saved_at: Path | None) -> None:
    """Ctrl-C exits 130 saying how to resume; otherwise the curve, the report, why it stopped, what to run next."""
    checkpoint = saved_at or latest_checkpoint(cfg)
    if stop == "interrupted":
        if proc.main:
            saved = f"nothing was saved yet (the first checkpoint comes at step {min(cfg.save_every, cfg.steps)})"
            if checkpoint:
                saved = f"the last checkpoint is {checkpoint} (step {step_number(checkpoint)})"
            print(f"interrupted: {saved}; to continue:\n  {command_line(cfg, resume='True')}", file=sys.stderr)
        raise SystemExit(130)
    if proc.main:
        if history:
            plot_rewards(history, Path(cfg.out_dir) / "reward.png")
        report = write_report(Path(cfg.out_dir))
        if stop:
            print(stop, file=sys.stderr)
        last_step = history[-1]["step"] if history else 0
        print(f"done: {last_step} steps; last checkpoint {checkpoint}")
        dev = [entry["dev_f1"] for entry in history if entry.get("dev_f1") is not None]
        shortcut = [entry["dev_f1_first_title"] for entry in history if entry.get("dev_f1_first_title") is not None]
        if dev:
            beside = f" | the first-title shortcut on the same questions: {shortcut[0]:.4g}" if shortcut else ""
            print(f"last dev F1 (greedy): {dev[-1]:.4g}{beside}")
        print(f"reward curve: {Path(cfg.out_dir) / 'reward.png'}; metrics: {Path(cfg.out_dir) / 'metrics.jsonl'}")
        if report is not None:
            print(f"report: {report}")
        if checkpoint is not None:
            print(f"evaluate the trained checkpoint on the dev questions (greedy), then the base model beside it:\n"
                  f"  {eval_command(cfg, str(checkpoint / 'hf'))}\n  {eval_command(cfg, cfg.model)}")
    if is_distributed():
        dist.destroy_process_group()


def write_report(folder: Path) -> Path | None:
    """report.html from the run's files, when report.py is there (`write_report(folder) -> Path`). The run's results
    are on disk already, so a report that fails says so and the run still ends as it would have."""
    try:
        import report
    except ModuleNotFoundError as error:
        if error.name == "report":  # no report.py: nothing to write
            return None
        print(f"no report: report.py needs {error.name} ({error}); the run's files are intact", file=sys.stderr)
        return None
    if not hasattr(report, "write_report"):
        return None
    try:
        return Path(report.write_report(folder))
    except Exception as error:  # whatever the report did wrong, the run's outputs stay as they are
        print(f"no report: report.write_report failed ({type(error).__name__}: {error}); the run's files are intact",
              file=sys.stderr)
        return None


def main(cfg: Config) -> dict:
    """Run training; returns the last step's metrics (tests use it)."""
    validate(cfg)  # bad options, data, model path or out_dir stop here, before anything loads
    proc = setup_distributed(cfg.device)
    if cfg.dry_run:
        return memory_per_gpu(cfg, cfg.world_size or proc.world, say=print if proc.main else None)
    run = open_run(cfg, proc)
    wandb_run = start_wandb(cfg, proc)
    last_metrics = {}
    low_entropy_steps = 0
    saved_at = None
    stop = ""
    try:
        for step in tqdm(range(run.start, cfg.steps), desc="train", disable=not proc.main, initial=run.start,
                         total=cfg.steps):
            batch, last_metrics, finite_update = train_step(run, cfg, proc, step)
            log_step(step + 1, last_metrics, batch, run, wandb_run, cfg, proc)
            stop = numbers_problem(step + 1, last_metrics, finite_update, cfg)
            if stop:  # no checkpoint of a broken state
                break
            entropy = last_metrics["entropy"]
            low_entropy_steps = low_entropy_steps + 1 if entropy is not None and entropy < cfg.min_entropy else 0
            if low_entropy_steps >= 3:
                stop = (f"step {step + 1}: entropy {entropy:.2e} < min_entropy={cfg.min_entropy} for 3 steps (the "
                        f"policy collapsed to near-deterministic outputs). Stopping.")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
                saved_at = save_checkpoint(run.model, run.optimizer, run.tokenizer, cfg, proc, step + 1, run.history)
            if stop:
                break
    except KeyboardInterrupt:  # Ctrl-C: no traceback; say what is on disk and how to go on (exit code 130)
        stop = "interrupted"
    finally:
        run.browser.close()
        if wandb_run is not None:
            wandb_run.finish()
    end_run(cfg, proc, run.history, stop, saved_at)
    return last_metrics


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:], PRESETS))
