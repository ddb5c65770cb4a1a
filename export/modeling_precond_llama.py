"""Llama with a diagonal attention preconditioner, for `transformers` (remote code).

This file is copied into every export that no stock architecture expresses (`qkv`, `row`, ...)
and loaded with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` through
the config's `auto_map`. It imports only torch and transformers, and it reuses Llama's config,
layers and attention interface; only the attention forward changes. config.json's
`precondition_rows` names the rows that are divided by their rms, e.g. "qkv":

    q, k, v:  x_i <- x_i / rms(x_i)                                     (before attention)
    o:        O = softmax(Q K^T / sqrt(d) + M) V,  o_i <- o_i / rms(o_i)  (after attention)

with rms(x) = sqrt(mean_k x_k^2 + precondition_eps), per head and per token. RoPE is a
rotation, so normalising before or after it gives the same rows. Because the prologue
acts per token, the KV cache holds already-preconditioned keys and values.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


class PrecondLlamaConfig(LlamaConfig):
    """LlamaConfig plus the preconditioner: its name, the rows it scales (letters of "qkvo") and its eps."""

    model_type = "precond_llama"
    precondition: str = "qkv"
    precondition_rows: str = "qkv"
    precondition_eps: float = 1e-6

    def validate_architecture(self):
        super().validate_architecture()
        if not set(self.precondition_rows) <= set("qkvo"):
            raise ValueError(f"precondition_rows={self.precondition_rows!r}; expected letters of 'qkvo'")
        if not self.precondition_eps > 0:
            raise ValueError(f"precondition_eps={self.precondition_eps!r}; expected a positive float")


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, last dim) + eps), computed in fp32 at least, returned in x's dtype."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class PrecondLlamaAttention(LlamaAttention):
    """LlamaAttention with the preconditioner around whichever attention kernel is configured."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, eps = self.config.precondition_rows, self.config.precondition_eps
        input_shape = hidden_states.shape[:-1]
        heads_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)
        q, k, v = (rms_normalize(x, eps) if name in rows else x for name, x in zip("qkv", (q, k, v), strict=True))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        if "o" in rows:
            out = rms_normalize(out, eps)  # out is (B, T, H, E): one row per token and head
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class PrecondLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PrecondLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = PrecondLlamaAttention(config, layer_idx)


class PrecondLlamaModel(LlamaModel):
    config_class = PrecondLlamaConfig

    def __init__(self, config: PrecondLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(PrecondLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class PrecondLlamaForCausalLM(LlamaForCausalLM):
    """Causal LM head over PrecondLlamaModel; generation (GenerationMixin) comes from LlamaForCausalLM."""

    config_class = PrecondLlamaConfig

    def __init__(self, config: PrecondLlamaConfig):
        super().__init__(config)
        self.model = PrecondLlamaModel(config)
        self.post_init()
