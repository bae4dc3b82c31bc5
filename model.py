"""Decoder-only transformer for the Qwen2 / Qwen3 / Llama family in plain PyTorch, with Hugging Face's parameter names
(`model.layers.0.self_attn.q_proj.weight`, ...), so real checkpoints load and save without conversion tables.

- `ModelConfig.from_json`: old and new rope layouts, Llama-3 rope scaling, GQA, Qwen2's q/k/v bias, Qwen3's q/k norm,
  tied embeddings. `Transformer.from_pretrained(path)` reads (sharded) safetensors; `save_pretrained(model, path)`
  writes a folder `transformers.AutoModelForCausalLM` loads.
- `model(tokens)` is a plain causal forward. The engine (rollout.py) also passes a paged `KVCache` (an argument, never
  module state), per-row positions and a block table per row: ragged batches, parked rows, shared prompt blocks. The
  cached forward has no host sync and no data-dependent shape, so a CUDA graph can capture the decode step.
- Attention is PyTorch SDPA; with the paged cache a row's blocks are gathered into a contiguous view and masked
  (exact, but one more read and write of its K/V than a paged kernel). Nothing else is fused.
Not here: finding or downloading checkpoints (data/models.py), sliding windows, MoE, quantisation, tensor parallelism.
Tests: `python -m pytest tests/test_model.py` (logits against transformers); bench: `python bench/model.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


# Masked attention (the KV-cache path) skips cuDNN's kernel: on an H100 with torch 2.11 it spent ~10 ms of CPU per
# call (a graph build each time), 80 ms per decode step of a 24-layer model; the efficient kernel takes masks.
MASKED_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


# --------------------------------------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style: factor, low/high_freq_factor, original_max_position_embeddings
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "llama"
    raw: dict = field(default_factory=dict, repr=False)  # the config.json we came from, written back on save

    @classmethod
    def from_json(cls, src: str | os.PathLike | dict) -> "ModelConfig":
        path = None if isinstance(src, dict) else Path(src)
        d = src if path is None else json.loads((path / "config.json" if path.is_dir() else path).read_text())
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "qwen2", "qwen3", "mistral"):
            raise ValueError(f"model_type {mt!r} is not supported (Qwen2/Qwen3/Llama family only)")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported; set use_sliding_window=false")
        # transformers 5 writes rope settings under "rope_parameters"; older files use rope_theta + rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported (default and llama3 are)")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=dict(rope) if rope_type == "llama3" else None,
            attention_bias=bool(d.get("attention_bias", mt == "qwen2")),  # Qwen2 configs omit it: always biased
            qk_norm=mt == "qwen3", tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768), model_type=mt, raw=dict(d))

    @property
    def n_params(self) -> int:
        """Parameter count, without building the model (dry runs and MFU need it)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        block = attn + 3 * h * self.intermediate_size + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * block + h


def rope_inv_freq(cfg: ModelConfig, device) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, in fp32, with Llama-3 scaling when the config asks for it."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if s := cfg.rope_scaling:  # Llama 3.1: long wavelengths / factor, short ones kept, a smooth ramp between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(is_mid, mid, scaled)
    return inv


# ------- KV cache: one pool of fixed-size blocks for all layers (paged); the engine owns block tables and lengths

@dataclass
class KVCache:
    """Paged KV cache. Block b of layer l holds the keys/values of `block_size` consecutive positions of whichever
    row's block table lists b; a row's position p lives in block `block_table[row, p // block_size]` at offset
    `p % block_size`. Rows can share blocks (a GRPO group's prompt). The caller reserves a scratch block (the engine
    uses block 0) for table padding: pad tokens and padding rows write there and nothing unmasked reads it.
    A contiguous cache is the special case block_size = max_len, one block per row."""

    k: torch.Tensor  # (L, N, bs, Hkv, D): the layout of flash-attn's paged kernels
    v: torch.Tensor  # (L, N, bs, Hkv, D)

    @classmethod
    def allocate(cls, cfg: ModelConfig, n_blocks: int, block_size: int, dtype=torch.float32, device=None,
                 zero: bool = True) -> "KVCache":
        """zero=False leaves the memory untouched, so a CPU process's resident memory grows only with the blocks the
        caller zeroes as it hands them out (the engine does: masked garbage would still turn 0 x NaN into NaN)."""
        shape = (cfg.num_hidden_layers, n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        make = torch.zeros if zero else torch.empty
        return cls(make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device))

    @staticmethod
    def nbytes_for(cfg: ModelConfig, n_tokens: int, dtype=torch.float32) -> int:
        """Bytes of keys + values for `n_tokens` positions over all layers."""
        return 2 * cfg.num_hidden_layers * n_tokens * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]


# ---------------------------------------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, exactly as transformers does (matters in bf16).
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache: KVCache | None, block_table, shared=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, hd)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv, hd)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv, hd)  # (B, T, Hkv, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if shared is not None:
            y = self.prefix_attention(q, k, v, *shared)
        elif cache is None:
            # Plain causal attention inside `x`: flash/efficient kernels, GQA without copying K/V.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads)
        else:
            kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]  # (N, bs, Hkv, D)
            bs = kc.shape[1]
            # Write the new tokens into their blocks. No host sync and no data-dependent shape, so a CUDA graph
            # can capture it: the table's width is the caller's (fixed per graph bucket).
            blk = block_table.gather(1, positions // bs)  # (B, T) physical block of each new token
            off = positions % bs  # (B, T)
            kc[blk, off] = k.transpose(1, 2)  # (B, T, Hkv, D)
            vc[blk, off] = v.transpose(1, 2)  # (B, T, Hkv, D)
            # Gather each row's blocks into a contiguous view; positions past a row's own are masked below.
            keys = kc[block_table].flatten(1, 2).transpose(1, 2)  # (B, Hkv, S, D), S = table width x bs
            vals = vc[block_table].flatten(1, 2).transpose(1, 2)  # (B, Hkv, S, D)
            S = keys.shape[2]
            # Each query sees the keys of its own row at positions <= its own: ragged rows and pads are exact.
            mask = torch.arange(S, device=x.device) <= positions[:, :, None]  # (B, T, S)
            # GQA without repeating K/V: fold the G query heads of one KV head into the query-length dim.
            G = self.n_heads // self.n_kv
            qg = q.reshape(B, self.n_kv, G * T, hd)  # (B, Hkv, G*T, D)
            mg = mask[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
            with sdpa_kernel(MASKED_SDPA):
                y = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mg)  # (B, Hkv, G*T, D)
            y = y.reshape(B, self.n_heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))

    def prefix_attention(self, q, k, v, P: int, R: int):
        """q, k, v (1, H|Hkv, P + R*S, D): a prefix of P tokens followed by R rows of S tokens that each continue
        it. The prefix attends causally to itself; each row to the whole prefix and causally to itself: the same
        result as R separate rows, with the prefix computed once."""
        gqa = self.n_kv != self.n_heads
        yp = F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=P > 1, enable_gqa=gqa)

        def rows(t):  # (1, H, P + R*S, D) -> (R, H, S, D)
            return t[0, :, P:].unflatten(1, (R, -1)).transpose(0, 1)

        qs, ks, vs = rows(q), rows(k), rows(v)
        S = qs.shape[2]
        keys = torch.cat((k[:, :, :P].expand(R, -1, -1, -1), ks), dim=2)  # (R, Hkv, P + S, D)
        vals = torch.cat((v[:, :, :P].expand(R, -1, -1, -1), vs), dim=2)
        mask = torch.ones(S, P + S, dtype=torch.bool, device=q.device).tril(P)  # row token i sees keys <= P + i
        ys = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, enable_gqa=gqa)  # (R, H, S, D)
        return torch.cat((yp, ys.transpose(0, 1).flatten(1, 2)[None]), dim=2)  # (1, H, P + R*S, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache, block_table, shared=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, block_table, shared)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Holds the `model.` prefix of Hugging Face parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        # the embeddings and the first `frozen_blocks` blocks run without autograd: no gradient reaches their weights
        # and the backward stops above them (train.py's warm start); a tied lm_head still gets its output gradient
        self.frozen_blocks = 0
        self._inv_freq: dict = {}  # device -> fp32 inverse frequencies; not a buffer so .to(bf16) never rounds it

    def forward(self, tokens, positions=None, cache: KVCache | None = None, block_table=None, logits_at=None,
                prefix: int = 0):
        """tokens (B, T) -> logits (B, T, V), or (B, K, V) at the time indices `logits_at` (B, K).

        positions (B, T): absolute positions for RoPE (and, with a cache, for the cache slot and the causal mask).
        cache/block_table (B, nb): see KVCache; the table must cover every position written, so pads of a ragged
        batch point at a scratch block. Without a cache attention is causal inside `tokens`: pad on the right.
        prefix: the first `prefix` tokens are the same in every row (a GRPO group's prompt, in training): they are
        computed once, in one row of P + B * (T - P) tokens; the logits are those of the plain forward.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if cache is not None and block_table is None:
            raise ValueError("a KV cache needs a block table (B, n_blocks) saying where each row's tokens live")
        shared = (prefix, B) if 0 < prefix < T and cache is None else None
        if shared:
            tokens = torch.cat((tokens[0, :prefix], tokens[:, prefix:].flatten()))[None]  # (1, P + B * (T - P))
            positions = torch.cat((positions[0, :prefix], positions[:, prefix:].flatten()))[None]
        frozen = self.model.layers[: self.frozen_blocks]
        with torch.no_grad() if self.frozen_blocks else contextlib.nullcontext():
            x = self.model.embed_tokens(tokens)  # (B, T, C), or (1, P + B * (T - P), C) with a shared prefix
            cos, sin = self._rope(positions, x.dtype)  # (B, 1, T, D)
            args = (cos, sin, positions, cache, block_table, shared)
            for layer in frozen:
                x = layer(x, *args)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers[self.frozen_blocks:]:
            x = checkpoint(layer, x, *args, use_reentrant=False) if ckpt else layer(x, *args)
        if shared:  # back to (B, T, C), each row with its own copy of the prefix
            x = torch.cat((x[:, :prefix].expand(B, -1, -1), x[0, prefix:].unflatten(0, (B, -1))), dim=1)
        if logits_at is not None:
            x = x.gather(1, logits_at[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
        return self.lm_head(self.model.norm(x))  # (B, T|K, V)

    def _rope(self, positions, dtype):
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.config, dev)
        freqs = positions[..., None].float() * self._inv_freq[dev]  # (B, T, D/2), fp32 like transformers
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Load an HF checkpoint folder (config.json + single or sharded *.safetensors) with no extra copy."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}/config.json not found: pass a Hugging Face checkpoint folder")
        cfg = ModelConfig.from_json(path)
        with torch.device("meta"):
            model = cls(cfg)
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = [path / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            if absent := [str(f) for f in files if not f.exists()]:
                raise FileNotFoundError(f"{index} lists shards that are missing: {absent}")
        elif (path / "model.safetensors").exists():
            files = [path / "model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
        expected = {k: v.shape for k, v in model.state_dict().items()
                    if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}  # tied: shares embed_tokens.weight
        sd, seen_in = {}, {}
        for f in files:
            try:
                with safe_open(f, framework="pt", device="cpu") as st:
                    for key in st.keys():
                        if key == "lm_head.weight" and cfg.tie_word_embeddings:
                            continue  # some tied checkpoints store the shared matrix twice
                        if key not in expected:
                            raise ValueError(f"{f}: unexpected tensor {key!r} (not a {cfg.model_type} parameter)")
                        if key in seen_in:
                            raise ValueError(f"{f}: tensor {key!r} already loaded from {seen_in[key]}")
                        t = st.get_tensor(key)
                        if t.shape != expected[key]:
                            raise ValueError(f"{f}: {key!r} has shape {tuple(t.shape)}, "
                                             f"config.json implies {tuple(expected[key])}")
                        sd[key], seen_in[key] = t, f.name
            except (OSError, SafetensorError) as e:  # truncated or corrupt files
                raise ValueError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt") from e
        if missing := sorted(set(expected) - set(sd)):
            raise ValueError(f"{path}: {len(missing)} tensors missing from {[f.name for f in files]}, "
                             f"e.g. {missing[:3]}; the checkpoint is incomplete")
        model.load_state_dict(sd, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(dtype=dtype or torch.float32, device=device)


def save_pretrained(model: Transformer, path, state_dict=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors (sharded above `max_shard_bytes`, by huggingface_hub) that transformers loads
    as is; earlier weight files in `path` are replaced. `state_dict`: full tensors a caller gathered (FSDP2)."""
    from huggingface_hub import save_torch_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu") for k, v in sd.items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    raw = dict(cfg.raw) or {"model_type": cfg.model_type}
    raw.pop("dtype", None)
    raw["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    for old in [*path.glob("model*.safetensors"), *path.glob("model.safetensors.index.json")]:
        old.unlink()
    save_torch_state_dict(sd, path, max_shard_size=max_shard_bytes, metadata={"format": "pt"})
