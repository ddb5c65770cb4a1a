"""A Llama-style decoder whose attention heads carry a diagonal preconditioner.

Legend: B batch, T tokens, D model width, H query heads, K key/value heads, E head dim,
V vocabulary. Parameter names follow Hugging Face's Llama (without its `model.` prefix)
except for the fused `qkv_proj` and `gate_up_proj`, which the HF export splits.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import attention
from model.config import ModelConfig

Tensor = torch.Tensor


class ModelOutput(NamedTuple):
    logits: Tensor
    """(B, T, V)"""
    loss: Tensor | None
    """mean cross-entropy over labels != -100, when labels were given"""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (max_seq_len, head_dim), in Hugging Face Llama's half-split layout."""
    # integer aranges, cast after: a constructor wrapper that casts new float tensors to the
    # parameter dtype (DeepSpeed's zero.Init) must not round the positions
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).double() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len).double(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x_BTNE: Tensor, cos_TE: Tensor, sin_TE: Tensor) -> Tensor:
    """RoPE on N heads (B, T, N, E) as the projection lays them out, so that q and k take one call."""
    half = x_BTNE.shape[-1] // 2
    rotated = torch.cat((-x_BTNE[..., half:], x_BTNE[..., :half]), dim=-1)
    return (x_BTNE * cos_TE[:, None] + rotated * sin_TE[:, None]).to(x_BTNE.dtype)


class HeadAttention(nn.Module):
    """`kernels.attention` as a module: a forward hook (the probe's) sees q (B, H, T, E), k, v
    (B, K, T, E) after RoPE and before the preconditioner, and the head outputs (B, H, T, E)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, q_BHTE: Tensor, k_BKTE: Tensor, v_BKTE: Tensor) -> Tensor:
        c = self.cfg
        return attention(
            q_BHTE, k_BKTE, v_BKTE, precondition=c.precondition, backend=c.attn_backend, eps=c.precondition_eps
        )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.attend = HeadAttention(cfg)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: Tensor, cos_TE: Tensor, sin_TE: Tensor) -> Tensor:
        B, T, _ = x_BTD.shape
        H, K = self.n_heads, self.n_kv
        qkv_BTNE = self.qkv_proj(x_BTD).view(B, T, H + 2 * K, self.head_dim)  # heads: H of q, K of k, K of v
        qk_BTNE = apply_rope(qkv_BTNE[:, :, : H + K], cos_TE, sin_TE)
        q_BHTE, k_BKTE = qk_BTNE[:, :, :H].transpose(1, 2), qk_BTNE[:, :, H:].transpose(1, 2)
        o_BHTE = self.attend(q_BHTE, k_BKTE, qkv_BTNE[:, :, H + K :].transpose(1, 2))
        return self.o_proj(o_BHTE.transpose(1, 2).reshape(B, T, H * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x_BTD).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: Tensor, cos_TE: Tensor, sin_TE: Tensor) -> Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TE, sin_TE)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Transformer(nn.Module):
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of keeping its activations (set by the
    trainer from train.activation_checkpointing); only while training with gradients."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None, around=None) -> None:
        """Normal(0, init_std) weights; residual-output projections scaled by 1/sqrt(2 n_layers);
        norm gains 1. Drawn from `generator` (default: torch's global RNG) in named_parameters
        order. `around(p)`, a context manager, wraps each parameter's init: a trainer whose
        parameters are sharded gathers the whole parameter there."""
        for name, p in self.named_parameters():
            with around(p) if around else contextlib.nullcontext():
                self.init_parameter(name, p, generator)

    def init_weights(self, seed: int, around=None) -> None:
        """The trainer's initial weights for `seed` (the global RNG is left alone)."""
        self.reset_parameters(torch.Generator().manual_seed(seed), around)

    def init_parameter(self, name: str, p: nn.Parameter, generator: torch.Generator | None = None) -> None:
        """One parameter's init, drawn in fp32 and then cast, so a bf16 parameter holds the
        rounded fp32 init whether it was built in bf16 or cast later."""
        std = self.cfg.init_std
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std = std / math.sqrt(2 * self.cfg.n_layers)
        if p.dim() < 2:
            value = torch.ones(p.shape, dtype=torch.float32)
        else:  # drawn on the CPU (where the generator lives), the same numbers on any device
            value = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        with torch.no_grad():
            p.copy_(value)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) int64; labels (B, T), -100 = ignored. Returns logits (B, T, V) and loss."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        cos_TE, sin_TE = self.rope_cos[:T], self.rope_sin[:T]
        x_BTD = self.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # keeps only each block's input for the backward pass
                x_BTD = checkpoint(layer, x_BTD, cos_TE, sin_TE, use_reentrant=False)
            else:
                x_BTD = layer(x_BTD, cos_TE, sin_TE)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return ModelOutput(logits_BTV, loss)


def count_parameters(model: nn.Module, *, exclude_embedding: bool = False) -> int:
    """Distinct parameters (a tied head counts once); optionally without the input embedding."""
    seen = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for p in seen.values())
    if exclude_embedding and isinstance(model, Transformer) and not model.cfg.tie_embeddings:
        n -= model.embed_tokens.weight.numel()
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's convention: 6 N + 12 L D T, where
    N counts the matmul weights (blocks and LM head, not the embedding lookup)."""
    E = cfg.head_dim
    per_layer = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * E + cfg.n_heads * E * cfg.d_model
    per_layer += 3 * cfg.d_model * cfg.ffn_hidden
    n_matmul = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def param_groups(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(name, parameter) of the matrices (weight decay) and of the other parameters (none), each
    in named_parameters order, a tied parameter once: the optimizer's two param groups."""
    # a parameter built under ZeRO-3's zero.Init is an empty 1-d tensor; ds_shape is its real shape
    is_matrix = lambda p: len(getattr(p, "ds_shape", p.shape)) >= 2
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if is_matrix(p)], [(n, p) for n, p in named if not is_matrix(p)]
