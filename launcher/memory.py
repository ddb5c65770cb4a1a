"""Model-state memory per rank: parameters, gradients and AdamW state, as each ZeRO stage splits them.

The ZeRO paper's count (Rajbhandari et al. 2020, section 3: 16 bytes per parameter in mixed
precision), adjusted to what DeepSpeed 0.19.8 keeps for our two modes, rather than DeepSpeed's
estimate_zero{2,3}_model_states_mem_needs, which know only stages 2 and 3 in 16-bit mode.
Activations, communication buckets, ZeRO-3's gathered parameters and the process itself come
on top (bench/scale_check.py measures the whole).
"""

from __future__ import annotations

from launcher.ds_config import precision_mode

# bytes per parameter: (parameters, gradients, optimizer state)
BYTES_PER_PARAM = {
    "bf16": (2, 2, 12),  # DeepSpeed's bf16 mode: bf16 weights and gradients; fp32 master weights + AdamW's moments
    "fp32": (4, 4, 8),  # fp32 weights and gradients; AdamW's two moments
}


def bytes_per_param(zero_stage: int, precision: str) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes per parameter before any split. bf16 at
    ZeRO-0 trains under autocast over fp32 weights (launcher.ds_config.precision_mode), so it
    keeps what fp32 keeps (the bf16 copies of the weights the matmuls take are transient). Under
    ZeRO 1-3 DeepSpeed accumulates bf16 gradients in fp32 buffers (4 bytes; the bf16 ones are
    transient) and, in fp32 mode, keeps an fp32 copy of the weights it steps (+4)."""
    params, grads, optim = BYTES_PER_PARAM["fp32" if zero_stage == 0 else precision]
    if zero_stage > 0 and precision == "bf16":
        grads = 4
    if zero_stage > 0 and precision == "fp32":
        optim += 4
    return params, grads, optim


def model_state_bytes(n_params: int, zero_stage: int, world_size: int, precision: str) -> float:
    """Bytes of model states per rank: stage 1 splits the optimizer state over the ranks,
    stage 2 the gradients too, stage 3 the parameters too."""
    params, grads, optim = bytes_per_param(zero_stage, precision)
    W = world_size
    split_params, split_grads, split_optim = [(1, 1, 1), (1, 1, W), (1, W, W), (W, W, W)][zero_stage]
    return n_params * (params / split_params + grads / split_grads + optim / split_optim)


def describe(n_params: int, zero_stage: int, world_size: int, precision: str) -> str:
    """One line for the run summary, e.g. `2.92 GiB per rank (estimate: 2 + 4 + 12 bytes/param ...)`."""
    params, grads, optim = bytes_per_param(zero_stage, precision)
    split = ["nothing", "optimizer state", "gradients + optimizer state", "everything"][zero_stage]
    size = model_state_bytes(n_params, zero_stage, world_size, precision)
    size_text = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    weights = {"bf16 autocast": "fp32 (bf16 autocast)", "bf16 weights": "bf16"}.get(
        precision_mode(zero_stage, precision), precision
    )
    return (
        f"{size_text} per rank (estimate: {params} + {grads} + {optim} bytes/param for {weights} "
        f"params + grads + optimizer; ZeRO-{zero_stage} splits {split} over {world_size} ranks)"
    )
