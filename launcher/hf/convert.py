"""Our Transformer's state dict and ModelConfig -> a Hugging Face config and weights.

Which architecture each preconditioner exports as:
    none      -> stock LlamaForCausalLM
    qk        -> stock Qwen3ForCausalLM (QK-norm with unit gains)
    qkv, row  -> PrecondLlamaForCausalLM, the remote-code file in this package

Weight names gain Llama's `model.` prefix; the fused `qkv_proj` (rows: q heads, k heads,
v heads) and `gate_up_proj` (rows: gate, up) are split; a tied head is left out (HF ties it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from model import ModelConfig

Tensor = torch.Tensor

MODELING_FILE = Path(__file__).with_name("modeling_precond_llama.py")
REMOTE_MODULE = MODELING_FILE.stem
ARCHITECTURES = {
    "none": "LlamaForCausalLM",
    "qk": "Qwen3ForCausalLM",
    "qkv": "PrecondLlamaForCausalLM",
    "row": "PrecondLlamaForCausalLM",
}


def needs_remote_code(precondition: str) -> bool:
    """True when the export needs `trust_remote_code=True` (no stock architecture matches)."""
    return ARCHITECTURES[precondition].startswith("Precond")


def qk_scale(cfg: ModelConfig) -> float:
    """Factor on q_proj/k_proj rows so Qwen3's QK-norm, which shares rms_norm_eps with the
    layer norms, computes rms with precondition_eps: rms_norm(c x, e) = rms_norm(x, e / c^2)."""
    return math.sqrt(cfg.norm_eps / cfg.precondition_eps)


def split_fused(name: str, t: Tensor, cfg: ModelConfig) -> dict[str, Tensor]:
    """One native tensor -> its HF tensors (named without the `model.` prefix)."""
    E = cfg.head_dim
    if name.endswith("self_attn.qkv_proj.weight"):
        base = name[: -len("qkv_proj.weight")]
        q, k, v = t.split([cfg.n_heads * E, cfg.n_kv_heads * E, cfg.n_kv_heads * E], dim=0)
        return {base + "q_proj.weight": q, base + "k_proj.weight": k, base + "v_proj.weight": v}
    if name.endswith("mlp.gate_up_proj.weight"):
        base = name[: -len("gate_up_proj.weight")]
        gate, up = t.chunk(2, dim=0)
        return {base + "gate_proj.weight": gate, base + "up_proj.weight": up}
    return {name: t}


def hf_state_dict(native: dict[str, Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Native (consolidated, lm_head already dropped when tied) -> HF tensors, contiguous copies in dtype."""
    out: dict[str, Tensor] = {}
    for name, t in native.items():
        for hf_name, part in split_fused(name, t.float(), cfg).items():
            if cfg.precondition == "qk" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                part = part * qk_scale(cfg)
            key = hf_name if hf_name == "lm_head.weight" else "model." + hf_name
            out[key] = part
    if cfg.precondition == "qk":
        for i in range(cfg.n_layers):
            for norm in ("q_norm", "k_norm"):
                out[f"model.layers.{i}.self_attn.{norm}.weight"] = torch.ones(cfg.head_dim)
    # clone: safetensors refuses tensors that share storage (the q/k/v views of one matrix)
    return {k: v.to(dtype).contiguous().clone() for k, v in out.items()}


def _llama_fields(cfg: ModelConfig, token_ids: dict[str, int], dtype: torch.dtype) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        dtype=str(dtype).removeprefix("torch."),
        **token_ids,
    )


def hf_config(cfg: ModelConfig, token_ids: dict[str, int], dtype: torch.dtype):
    """The transformers config object for this model (architectures and auto_map filled in).

    token_ids: bos_token_id, eos_token_id, pad_token_id.
    """
    fields = _llama_fields(cfg, token_ids, dtype)
    arch = ARCHITECTURES[cfg.precondition]
    if cfg.precondition == "none":
        from transformers import LlamaConfig

        config = LlamaConfig(mlp_bias=False, **fields)
    elif cfg.precondition == "qk":
        from transformers import Qwen3Config

        # one full-attention layer type everywhere: no sliding window
        config = Qwen3Config(use_sliding_window=False, max_window_layers=cfg.n_layers, **fields)
    else:
        from launcher.hf.modeling_precond_llama import PrecondLlamaConfig

        config = PrecondLlamaConfig(
            mlp_bias=False, precondition=cfg.precondition, precondition_eps=cfg.precondition_eps, **fields
        )
        config.auto_map = {
            "AutoConfig": f"{REMOTE_MODULE}.PrecondLlamaConfig",
            "AutoModel": f"{REMOTE_MODULE}.PrecondLlamaModel",
            "AutoModelForCausalLM": f"{REMOTE_MODULE}.PrecondLlamaForCausalLM",
        }
    config.architectures = [arch]
    return config
