"""The Hugging Face mapping (export.convert) both ways: native -> HF -> native is the
identity for the weights and the ModelConfig, for every preconditioner, tied head or not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import ConfigError
from export import convert
from kernels import PRECONDITIONERS
from model import ModelConfig, Transformer

TOKEN_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)


def odd_cfg(**kw) -> ModelConfig:
    """Every field away from its default, so a field the mapping drops shows."""
    base = dict(vocab_size=96, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=80, max_seq_len=40)
    base.update(rope_theta=5e5, norm_eps=3e-5, precondition_eps=2e-6, init_std=0.03)
    return ModelConfig(**(base | kw))


def round_trip(model: Transformer, tmp_path) -> tuple[dict, ModelConfig, dict]:
    """Export to files as export.cli does, read back; returns (HF tensors, config, native)."""
    cfg = model.cfg
    save_file(convert.hf_state_dict(model.state_dict(), cfg, torch.float32), str(tmp_path / "model.safetensors"))
    convert.hf_config(cfg, TOKEN_IDS, torch.float32).save_pretrained(tmp_path)
    back = convert.native_config(json.loads((tmp_path / "config.json").read_text()))
    hf = load_file(str(tmp_path / "model.safetensors"))
    return hf, back, convert.native_state_dict(hf, back)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("precondition", sorted(PRECONDITIONERS))
def test_native_hf_native_is_the_identity(tmp_path, precondition, tie):
    torch.manual_seed(0)
    model = Transformer(odd_cfg(precondition=precondition, tie_embeddings=tie))
    hf, back, native = round_trip(model, tmp_path)
    assert back == model.cfg
    assert ("lm_head.weight" in hf) == (not tie) and "model.layers.1.self_attn.k_proj.weight" in hf
    want = model.state_dict()
    assert native.keys() == want.keys()
    for name, t in want.items():
        if precondition == "qk" and "qkv_proj" in name:  # scaled by qk_scale and back: rounding
            torch.testing.assert_close(native[name], t, rtol=3e-7, atol=0)
        else:
            assert torch.equal(native[name], t), name
    assert (native["lm_head.weight"] is native["embed_tokens.weight"]) == tie
    reloaded = Transformer(back)
    reloaded.load_state_dict(native, strict=True)
    x = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_qk_export_scales_q_and_k_rows_only(tmp_path):
    torch.manual_seed(0)
    model = Transformer(odd_cfg(precondition="qk"))
    hf, _, _ = round_trip(model, tmp_path)
    qkv = model.state_dict()["layers.0.self_attn.qkv_proj.weight"]
    q_rows, kv_rows = 48, 2 * 8
    c = convert.qk_scale(model.cfg)
    assert c == pytest.approx((3e-5 / 2e-6) ** 0.5)
    torch.testing.assert_close(hf["model.layers.0.self_attn.q_proj.weight"], qkv[:q_rows] * c)
    torch.testing.assert_close(hf["model.layers.0.self_attn.k_proj.weight"], qkv[q_rows : q_rows + kv_rows] * c)
    assert torch.equal(hf["model.layers.0.self_attn.v_proj.weight"], qkv[q_rows + kv_rows :])
    assert torch.equal(hf["model.layers.1.self_attn.q_norm.weight"], torch.ones(8))


def test_older_qk_export_without_precondition_eps(tmp_path):
    """Without the key, Qwen3's own eps is the preconditioner's and the weights are read unscaled:
    the same function as the export."""
    torch.manual_seed(0)
    model = Transformer(odd_cfg(precondition="qk"))
    hf, _, _ = round_trip(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["precondition_eps"]
    old = convert.native_config(config)
    assert old.precondition_eps == old.norm_eps and convert.qk_scale(old) == 1.0
    reloaded = Transformer(old)
    reloaded.load_state_dict(convert.native_state_dict(hf, old), strict=True)
    x = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_foreign_exports_are_errors(tmp_path):
    hf, _, _ = round_trip(Transformer(odd_cfg(precondition="qk")), tmp_path)
    hf["model.layers.0.self_attn.q_norm.weight"] = torch.full((8,), 2.0)
    with pytest.raises(ConfigError, match="q_norm.weight is not all ones"):
        convert.native_state_dict(hf, odd_cfg(precondition="qk"))
    config = json.loads((tmp_path / "config.json").read_text()) | {"architectures": ["MistralForCausalLM"]}
    with pytest.raises(ConfigError, match="no 'precondition' key"):
        convert.native_config(config, "here")
