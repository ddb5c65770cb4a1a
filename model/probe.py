"""The conditioning probe's math and hooks: condition numbers of the attention matrices, with
and without the preconditioner. The command that loads models and writes reports is
research.conditioning; this module imports neither `transformers` nor the HF export.

Per layer and head, for each sequence of a batch of validation windows, in float64:
    O, O_plain    head outputs (T, E) with the model's preconditioner / plain attention
    Q, Q_plain    queries as they enter the softmax (T, E), with / without C_Q
    K, K_plain    keys as they enter the softmax (T, E) per key/value head, with / without C_K
    A, A_plain    causal attention probabilities (T, T), with / without the preconditioner
The in-training probe also logs each layer's largest attention logit (q . k / sqrt(E) as the
softmax sees it: after the preconditioner, causal positions only), the reading Wortsman et al.
(2023) follow for attention-logit growth at high learning rates.
kappa = sigma_max / sigma_min; a numerically singular matrix (sigma_min <= sigma_max * max(m, n)
* float64 eps, numpy's matrix_rank tolerance) has kappa = inf. Each head's number is the median
over the batch. O and O_plain are both recomputed in float64 from the captured q, k, v (O
matches the model's own output to rounding), so they differ by the preconditioner only.

Legend: B batch, T tokens, H query heads, K key/value heads, E head dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch

from kernels import get_preconditioner
from model import ModelConfig
from model.transformer import HeadAttention

Tensor = torch.Tensor
PROBED = ("O", "O_plain", "Q", "Q_plain", "K", "K_plain", "A", "A_plain")


# ---- the numbers ---------------------------------------------------------------------------
def condition_numbers(m: Tensor) -> Tensor:
    """kappa of each matrix of a stack (..., m, n) in float64 singular values; inf where
    numerically singular (numpy matrix_rank's tolerance). Returns float64 (...)."""
    threads = torch.get_num_threads()
    if m.device.type == "cpu":
        torch.set_num_threads(1)  # batched small SVDs: threads only contend (10x slower on 2 busy cores)
    try:
        s = torch.linalg.svdvals(m.double())
    finally:
        torch.set_num_threads(threads)
    smax, smin = s[..., 0], s[..., -1]
    tol = smax * max(m.shape[-2:]) * torch.finfo(torch.float64).eps
    return torch.where(smin > tol, smax / smin.clamp_min(torch.finfo(torch.float64).tiny), math.inf)


def _logits_causal(q_BHTE: Tensor, k_BHTE: Tensor) -> Tensor:
    """Attention logits (B, H, T, T), -inf above the diagonal."""
    T, E = q_BHTE.shape[-2], q_BHTE.shape[-1]
    scores = q_BHTE @ k_BHTE.transpose(-1, -2) / math.sqrt(E)
    mask = torch.ones(T, T, dtype=torch.bool, device=q_BHTE.device).triu(1)
    return scores.masked_fill(mask, -math.inf)


def _softmax_causal(q_BHTE: Tensor, k_BHTE: Tensor) -> Tensor:
    """Causal attention probabilities (B, H, T, T) in float64."""
    return _logits_causal(q_BHTE, k_BHTE).softmax(-1)


def max_logit(q: Tensor, k: Tensor, precondition: str, eps: float) -> float:
    """The largest attention logit over the batch, heads and causal positions, in float64, with
    the model's preconditioner; q (B, H, T, E), k (B, K, T, E) after RoPE."""
    q, k = q.double(), k.double()
    qp, kp, _ = get_preconditioner(precondition).before(q, k, k, eps)
    return _logits_causal(qp, kp.repeat_interleave(q.shape[1] // k.shape[1], dim=1)).max().item()


def attention_matrices(q: Tensor, k: Tensor, v: Tensor, precondition: str, eps: float) -> dict[str, Tensor]:
    """The probed matrices in float64. q (B, H, T, E), k and v (B, K, T, E) after RoPE and before
    the preconditioner. Returns name -> (B, H or K, rows, cols); a name whose matrix is the same
    object as its plain twin (the preconditioner leaves it alone) shares the tensor."""
    pre = get_preconditioner(precondition)
    q, k, v = q.double(), k.double(), v.double()
    qp, kp, vp = pre.before(q, k, v, eps)
    groups = q.shape[1] // k.shape[1]
    rep = lambda x: x.repeat_interleave(groups, dim=1)  # the kernels' GQA convention
    a_plain = _softmax_causal(q, rep(k))
    a = a_plain if (qp is q and kp is k) else _softmax_causal(qp, rep(kp))
    o_plain = a_plain @ rep(v)
    o = pre.after(a @ rep(vp), eps)
    return dict(O=o, O_plain=o_plain, Q=qp, Q_plain=q, K=kp, K_plain=k, A=a, A_plain=a_plain)


def head_kappas(q: Tensor, k: Tensor, v: Tensor, precondition: str, eps: float) -> dict[str, np.ndarray]:
    """name -> kappa per head (median over the batch), float64 numpy (H,) or (K,)."""
    mats = attention_matrices(q, k, v, precondition, eps)
    done: dict[int, np.ndarray] = {}
    out = {}
    for name in PROBED:
        m = mats[name]
        if id(m) not in done:  # shared tensors: one SVD
            done[id(m)] = np.median(condition_numbers(m).cpu().numpy(), axis=0)
        out[name] = done[id(m)]
    return out


# ---- capturing q, k, v from a model -------------------------------------------------------
def capture_forward(module: torch.nn.Module, input_ids_BT: Tensor, autocast: Callable | None = None) -> dict:
    """One forward pass of `module` (a Transformer or a DeepSpeed engine around one) with a forward
    hook on every HeadAttention (no grad, eval mode; hooks removed and mode restored after);
    returns layer -> (q, k, v, o). Every rank must call it under ZeRO-3 (parameters are gathered)."""
    store: dict[int, tuple[Tensor, ...]] = {}
    heads = [m for m in module.modules() if isinstance(m, HeadAttention)]
    if not heads:
        raise ValueError(f"{type(module).__name__} has no HeadAttention modules to probe")

    def keep(layer: int) -> Callable:
        return lambda _module, qkv, o: store.__setitem__(layer, tuple(t.detach() for t in (*qkv, o)))

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(heads)]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), autocast() if autocast else contextlib.nullcontext():
            module(input_ids_BT)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return store


def layer_kappas(store: dict, cfg: ModelConfig) -> list[dict]:
    """Per layer of a capture_forward store: name -> kappa per head (numpy)."""
    return [head_kappas(*store[i][:3], cfg.precondition, cfg.precondition_eps) for i in sorted(store)]


def probe(module: torch.nn.Module, input_ids_BT: Tensor, cfg: ModelConfig, autocast=None) -> list[dict]:
    """Per layer: name -> kappa per head (numpy). input_ids_BT (B, T) on the model's device."""
    return layer_kappas(capture_forward(module, input_ids_BT, autocast), cfg)


def layer_medians(layers: list[dict]) -> dict[str, float]:
    """TensorBoard tags: "cond/layer{i}/{name}" -> median over heads."""
    return {f"cond/layer{i}/{n}": float(np.median(h[n])) for i, h in enumerate(layers) for n in PROBED}


def layer_max_logits(store: dict, cfg: ModelConfig) -> dict[str, float]:
    """TensorBoard tags: "logit/layer{i}/max" -> the layer's largest attention logit."""
    return {
        f"logit/layer{i}/max": max_logit(*store[i][:2], cfg.precondition, cfg.precondition_eps) for i in sorted(store)
    }


def probe_during_training(engine_or_module, batch_BT: Tensor, cfg, autocast: Callable | None = None) -> dict:
    """The in-training probe. Call on EVERY rank (ZeRO-3 gathers parameters collectively) with
    the same small fixed batch of input ids (B, T), e.g. `val[:2, :-1]`; cfg is the RunConfig
    (or its ModelConfig); autocast a zero-argument callable returning the training autocast
    context. One forward pass under no_grad with the hooks installed, then removed; the
    training state is untouched. Returns tag -> value on rank 0 ({} elsewhere): the condition
    numbers (inf means singular) and each layer's largest attention logit."""
    mcfg = getattr(cfg, "model", cfg)
    params = list(engine_or_module.parameters())
    device = params[0].device if params else batch_BT.device
    store = capture_forward(engine_or_module, batch_BT.to(device), autocast)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {}
    return layer_medians(layer_kappas(store, mcfg)) | layer_max_logits(store, mcfg)
