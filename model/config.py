"""The model's configuration: the `model` section of a run config."""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import check_choice, check_range
from kernels import BACKENDS, PRECONDITIONERS


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    """Rows of the embedding and the LM head (at least the tokenizer's vocabulary)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per block; head_dim = d_model / n_heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads."""
    ffn_hidden: int = 688
    """Hidden width of the SwiGLU MLP."""
    max_seq_len: int = 512
    """Longest sequence the model is built for."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    precondition: str = "qk"
    """Diagonal attention preconditioner: none, qk, qkv or row (see docs/kernels.md)."""
    precondition_eps: float = 1e-6
    """Epsilon inside the preconditioner's rms."""
    attn_backend: str = "auto"
    """Attention kernel: auto, eager, sdpa, flash or triton."""
    init_std: float = 0.02
    """Standard deviation of the weight init; output projections are scaled by 1/sqrt(2 n_layers)."""

    def __post_init__(self) -> None:
        check_choice("model", "precondition", self.precondition, tuple(PRECONDITIONERS))
        check_choice("model", "attn_backend", self.attn_backend, ("auto", *BACKENDS))
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, key)
            check_range("model", key, value, value >= 1, "a positive int")
        check_range("model", "d_model", self.d_model, self.d_model % self.n_heads == 0, "a multiple of model.n_heads")
        check_range(
            "model", "n_kv_heads", self.n_kv_heads, self.n_heads % self.n_kv_heads == 0, "a divisor of model.n_heads"
        )
        check_range("model", "head_dim", self.head_dim, self.head_dim % 2 == 0, "even (RoPE rotates pairs)")
        for key in ("precondition_eps", "norm_eps", "rope_theta"):
            value = getattr(self, key)
            check_range("model", key, value, 0 < value < math.inf, "a positive float")
        check_range("model", "init_std", self.init_std, 0 <= self.init_std < math.inf, "a float >= 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
