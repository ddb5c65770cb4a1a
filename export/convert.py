"""Our Transformer's state dict and ModelConfig <-> a Hugging Face config and weights, both ways.

Which architecture each preconditioner exports as:
    none      -> stock LlamaForCausalLM
    qk        -> stock Qwen3ForCausalLM (QK-norm with unit gains)
    others    -> PrecondLlamaForCausalLM, the remote-code file in this package (qkv, row, any
                 preconditioner declared by rows=; a custom one is refused)

Weight names gain Llama's `model.` prefix; the fused `qkv_proj` (rows: q heads, k heads,
v heads) and `gate_up_proj` (rows: gate, up) are split; a tied head is left out (HF ties it);
a qk export scales q_proj/k_proj (qk_scale) and adds unit QK-norm gains. native_state_dict and
native_config undo each step (tests/test_hf_mapping.py: the round trip is the identity).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from core.errors import ConfigError
from kernels import get_preconditioner
from model import ModelConfig

Tensor = torch.Tensor

MODELING_FILE = Path(__file__).with_name("modeling_precond_llama.py")
REMOTE_MODULE = MODELING_FILE.stem
ARCHITECTURES = {"none": "LlamaForCausalLM", "qk": "Qwen3ForCausalLM"}
"""The preconditioners a stock architecture computes exactly; every other one declared by rows=
(kernels/precondition.py) exports as REMOTE_ARCHITECTURE, its rows in config.json."""
REMOTE_ARCHITECTURE = "PrecondLlamaForCausalLM"


def architecture(precondition: str) -> str:
    """The architecture `precondition` exports as; ConfigError naming one the export cannot express."""
    if get_preconditioner(precondition).rows is None:
        raise ConfigError(
            f"model.precondition={precondition!r} cannot be exported: the Hugging Face model implements "
            "only preconditioners declared by rows= (kernels/precondition.py)"
        )
    return ARCHITECTURES.get(precondition, REMOTE_ARCHITECTURE)


def needs_remote_code(precondition: str) -> bool:
    """True when the export needs `trust_remote_code=True` (no stock architecture matches)."""
    return architecture(precondition) == REMOTE_ARCHITECTURE


def qk_scale(cfg: ModelConfig) -> float:
    """Factor on q_proj/k_proj rows so Qwen3's QK-norm, which shares rms_norm_eps with the
    layer norms, computes rms with precondition_eps: rms_norm(c x, e) = rms_norm(x, e / c^2)."""
    return math.sqrt(cfg.norm_eps / cfg.precondition_eps)


def _fused(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """Our fused weights -> their HF parts, in row order, with the rows of each."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        "qkv_proj.weight": {"q_proj.weight": q_rows, "k_proj.weight": kv_rows, "v_proj.weight": kv_rows},
        "gate_up_proj.weight": {"gate_proj.weight": cfg.ffn_hidden, "up_proj.weight": cfg.ffn_hidden},
    }


def _row_scale(hf_name: str, cfg: ModelConfig) -> float:
    """The export's factor on one HF tensor: qk_scale on q_proj/k_proj of a qk model, else 1."""
    qk = cfg.precondition == "qk" and hf_name.endswith((".q_proj.weight", ".k_proj.weight"))
    return qk_scale(cfg) if qk else 1.0


def split_fused(name: str, t: Tensor, cfg: ModelConfig) -> dict[str, Tensor]:
    """One native tensor -> its HF tensors (named without the `model.` prefix)."""
    for fused, parts in _fused(cfg).items():
        if name.endswith("." + fused):
            base = name.removesuffix(fused)
            return {base + p: x for p, x in zip(parts, t.split(list(parts.values())), strict=True)}
    return {name: t}


def merge_fused(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF tensors named without `model.` -> the same with q,k,v and gate,up fused as ours."""
    sd = dict(sd)
    for fused, parts in _fused(cfg).items():
        first = next(iter(parts))
        for base in [k.removesuffix(first) for k in sd if k.endswith("." + first)]:
            sd[base + fused] = torch.cat([sd.pop(base + p) for p in parts])
    return sd


def tie_head(native: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A native state dict with a tied head restored as the embedding, as the Transformer loads it."""
    return {**native, "lm_head.weight": native["embed_tokens.weight"]} if cfg.tie_embeddings else native


def hf_state_dict(native: dict[str, Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Native -> HF tensors, new contiguous tensors in dtype; a tied head is left out (HF ties it)."""
    out: dict[str, Tensor] = {}
    for name, t in native.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        for hf_name, part in split_fused(name, t.float(), cfg).items():
            key = hf_name if hf_name == "lm_head.weight" else "model." + hf_name
            out[key] = part * _row_scale(hf_name, cfg)  # a new tensor: safetensors refuses shared storage
    if cfg.precondition == "qk":
        for i in range(cfg.n_layers):
            for norm in ("q_norm", "k_norm"):
                out[f"model.layers.{i}.self_attn.{norm}.weight"] = torch.ones(cfg.head_dim)
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def native_state_dict(hf: dict[str, Tensor], cfg: ModelConfig, where: str = "HF weights") -> dict[str, Tensor]:
    """HF tensors -> native fp32, the inverse of hf_state_dict: QK-norm gains dropped (they must be
    ones: the preconditioner has none), the qk scaling undone, q,k,v and gate,up fused, a tied head restored."""
    sd = {}
    for key, t in hf.items():
        name = key.removeprefix("model.")
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            if not torch.all(t == 1):
                raise ConfigError(f"{where}: {key} is not all ones; only our exports can be read")
            continue
        sd[name] = t.float() / _row_scale(name, cfg)
    return tie_head(merge_fused(sd, cfg), cfg)


HF_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "ffn_hidden": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "precondition_eps": "precondition_eps",
}
"""ModelConfig field -> the key of a Llama-style config.json that holds it (both directions)."""


def _llama_fields(cfg: ModelConfig, token_ids: dict[str, int], dtype: torch.dtype) -> dict:
    return dict(
        {hf: getattr(cfg, ours) for ours, hf in HF_FIELDS.items()},
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False,
        dtype=str(dtype).removeprefix("torch."),
        **token_ids,
    )


def hf_config(cfg: ModelConfig, token_ids: dict[str, int], dtype: torch.dtype):
    """The transformers config object for this model (architectures and auto_map filled in).

    token_ids: bos_token_id, eos_token_id, pad_token_id.
    """
    fields = _llama_fields(cfg, token_ids, dtype)
    arch = architecture(cfg.precondition)
    if cfg.precondition == "none":
        from transformers import LlamaConfig

        config = LlamaConfig(mlp_bias=False, **fields)
    elif cfg.precondition == "qk":
        from transformers import Qwen3Config

        # one full-attention layer type everywhere: no sliding window
        config = Qwen3Config(use_sliding_window=False, max_window_layers=cfg.n_layers, **fields)
    else:
        from export.modeling_precond_llama import PrecondLlamaConfig

        rows = get_preconditioner(cfg.precondition).rows
        config = PrecondLlamaConfig(mlp_bias=False, precondition=cfg.precondition, precondition_rows=rows, **fields)
        config.auto_map = {
            "AutoConfig": f"{REMOTE_MODULE}.PrecondLlamaConfig",
            "AutoModel": f"{REMOTE_MODULE}.PrecondLlamaModel",
            "AutoModelForCausalLM": f"{REMOTE_MODULE}.PrecondLlamaForCausalLM",
        }
    config.architectures = [arch]
    return config


def native_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """An export's config.json (as a dict) -> ModelConfig, the inverse of hf_config. Without a
    `precondition_eps` key (older exports) it is rms_norm_eps: a qk export's QK-norm eps."""
    stock = [p for p, arch in ARCHITECTURES.items() if arch in hf.get("architectures", ())]
    precondition = hf.get("precondition") or (stock[0] if len(stock) == 1 else None)
    if precondition is None:
        raise ConfigError(f"{where}: architectures {hf.get('architectures')} and no 'precondition' key")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // n_heads) * n_heads != hf["hidden_size"]:
        raise ConfigError(f"{where}: head_dim * num_attention_heads != hidden_size; not one of our exports")
    rope = hf.get("rope_parameters") or {}
    given = {ours: hf[key] for ours, key in HF_FIELDS.items() if key in hf}
    given.setdefault("n_kv_heads", n_heads)
    given.setdefault("precondition_eps", hf["rms_norm_eps"])
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 1e4)))
    return ModelConfig(**given, rope_theta=theta, precondition=precondition)
