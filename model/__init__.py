"""The model: pure PyTorch (never imports deepspeed)."""

from model.config import ModelConfig
from model.transformer import ModelOutput, Transformer, count_parameters, flops_per_token, param_groups

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "count_parameters", "flops_per_token", "param_groups"]
