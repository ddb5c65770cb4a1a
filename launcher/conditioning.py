"""The conditioning probe: condition numbers of the attention matrices, with and without the
preconditioner (README, "Is the matrix better conditioned?").

    python -m launcher.conditioning --model (HF_DIR | RUN_DIR) [--json OUT] [--batch N]

Per layer and head, for each sequence of a batch of validation windows, in float64:
    O, O_plain    head outputs (T, E) with the model's preconditioner / plain attention
    Q, Q_plain    queries as they enter the softmax (T, E), with / without C_Q
    K, K_plain    keys as they enter the softmax (T, E) per key/value head, with / without C_K
    A, A_plain    causal attention probabilities (T, T), with / without the preconditioner
kappa = sigma_max / sigma_min; a numerically singular matrix (sigma_min <= sigma_max * max(m, n)
* float64 eps, numpy's matrix_rank tolerance) has kappa = inf, written as the string "inf" in
JSON. Each head's number is the median over the batch; tables show the median over heads.
O and O_plain are both recomputed in float64 from the captured q, k, v (O matches the model's
own output to rounding), so they differ by the preconditioner only.

Legend: B batch, T tokens, H query heads, K key/value heads, E head dim.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data.config import ConfigError, run_main
from kernels import get_preconditioner
from model import ModelConfig, Transformer
from model.transformer import Attention

Tensor = torch.Tensor
NAMES = ("O", "O_plain", "Q", "Q_plain", "K", "K_plain", "A", "A_plain")


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


def _softmax_causal(q_BHTE: Tensor, k_BHTE: Tensor) -> Tensor:
    """Causal attention probabilities (B, H, T, T) in float64."""
    T, E = q_BHTE.shape[-2], q_BHTE.shape[-1]
    scores = q_BHTE @ k_BHTE.transpose(-1, -2) / math.sqrt(E)
    mask = torch.ones(T, T, dtype=torch.bool, device=q_BHTE.device).triu(1)
    return scores.masked_fill(mask, -math.inf).softmax(-1)


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
    for name in NAMES:
        m = mats[name]
        if id(m) not in done:  # shared tensors: one SVD
            done[id(m)] = np.median(condition_numbers(m).cpu().numpy(), axis=0)
        out[name] = done[id(m)]
    return out


# ---- capturing q, k, v from a model -------------------------------------------------------
@contextlib.contextmanager
def captured(module: torch.nn.Module) -> Iterator[dict[int, tuple[Tensor, ...]]]:
    """Install capture hooks on every Attention module of `module` (a Transformer or a DeepSpeed
    engine around one); yields layer -> (q, k, v, o) filled by a forward pass; hooks are removed."""
    store: dict[int, tuple[Tensor, ...]] = {}
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no Attention modules to probe")

    def capture(layer_idx, q, k, v, o):
        store[layer_idx] = tuple(t.detach() for t in (q, k, v, o))

    for m in layers:
        m.capture = capture
    try:
        yield store
    finally:
        for m in layers:
            m.capture = None


def capture_forward(module: torch.nn.Module, input_ids_BT: Tensor, autocast: Callable | None = None) -> dict:
    """One forward pass with the hooks installed (no grad, eval mode, mode restored); returns
    layer -> (q, k, v, o). Every rank must call it under ZeRO-3 (parameters are gathered)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), captured(module) as store, autocast() if autocast else contextlib.nullcontext():
            module(input_ids_BT)
    finally:
        module.train(was_training)
    return dict(store)


def probe(module: torch.nn.Module, input_ids_BT: Tensor, cfg: ModelConfig, autocast=None) -> list[dict]:
    """Per layer: name -> kappa per head (numpy). input_ids_BT (B, T) on the model's device."""
    store = capture_forward(module, input_ids_BT, autocast)
    layers = []
    for i in sorted(store):
        q, k, v, _ = store[i]
        layers.append(head_kappas(q, k, v, cfg.precondition, cfg.precondition_eps))
    return layers


def layer_medians(layers: list[dict]) -> dict[str, float]:
    """TensorBoard tags: "cond/layer{i}/{name}" -> median over heads."""
    return {f"cond/layer{i}/{n}": float(np.median(h[n])) for i, h in enumerate(layers) for n in NAMES}


def probe_during_training(engine_or_module, batch_BT: Tensor, cfg, autocast: Callable | None = None) -> dict:
    """The in-training probe. Call on EVERY rank (ZeRO-3 gathers parameters collectively) with
    the same small fixed batch of input ids (B, T), e.g. `val[:2, :-1]`; cfg is the RunConfig
    (or its ModelConfig); autocast a zero-argument callable returning the training autocast
    context. One forward pass under no_grad with the hooks installed, then removed; the
    training state is untouched. Returns tag -> value on rank 0 ({} elsewhere); inf means singular."""
    mcfg = getattr(cfg, "model", cfg)
    params = list(engine_or_module.parameters())
    device = params[0].device if params else batch_BT.device
    store = capture_forward(engine_or_module, batch_BT.to(device), autocast)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {}
    layers = [head_kappas(*store[i][:3], mcfg.precondition, mcfg.precondition_eps) for i in sorted(store)]
    return layer_medians(layers)


# ---- reporting ----------------------------------------------------------------------------
def json_number(x: float) -> float | str:
    return "inf" if math.isinf(x) else float(x)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def report(layers: list[dict], meta: dict) -> dict:
    """The JSON document: meta, then per layer the per-head numbers and their median."""
    out = dict(meta)
    out["kappa"] = "sigma_max / sigma_min of each (T, E) or (T, T) matrix, float64, median over the batch"
    out["infinity"] = 'numerically singular matrices (kappa = inf) are written as the string "inf"'
    out["layers"] = [
        {
            "layer": i,
            "heads": {n: [json_number(x) for x in h[n]] for n in NAMES},
            "median_over_heads": {n: json_number(float(np.median(h[n]))) for n in NAMES},
        }
        for i, h in enumerate(layers)
    ]
    return out


def table(layers: list[dict]) -> str:
    """A compact text table: one row per layer, median over heads."""
    rows = [f"{'layer':>5} " + " ".join(f"{n:>9}" for n in NAMES)]
    for i, h in enumerate(layers):
        rows.append(f"{i:>5} " + " ".join(f"{_fmt(float(np.median(h[n]))):>9}" for n in NAMES))
    return "\n".join(rows)


def read_json(path: str | Path) -> dict:
    """Load a probe JSON with "inf" strings turned back into float infinity."""
    fix = lambda x: math.inf if x == "inf" else x
    doc = json.loads(Path(path).read_text())
    for layer in doc["layers"]:
        layer["heads"] = {n: [fix(x) for x in xs] for n, xs in layer["heads"].items()}
        layer["median_over_heads"] = {n: fix(x) for n, x in layer["median_over_heads"].items()}
    return doc


# ---- loading a model and windows ----------------------------------------------------------
def _run_state_dict(run_dir: Path, cfg) -> dict[str, Tensor]:
    """The newest checkpoint's weights: through the export's consolidation (any ZeRO stage, fp32
    masters) when present, else ZeRO-0's "module" entry or DeepSpeed's ZeRO 1-3 merger."""
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise ConfigError(f"--model {run_dir}: no checkpoint ({latest} is missing); train first or pass --untrained")
    folder = ckpt_dir / latest.read_text().strip()
    try:
        from launcher.hf.checkpoint import consolidate
    except ImportError:
        consolidate = None
    if consolidate is not None:
        return consolidate(folder, cfg.model).state_dict
    if any(folder.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=folder.name)
    return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def _load_native(model: Transformer, sd: dict[str, Tensor], where: Path) -> None:
    """Load our-named weights; a tied head may be missing (it is the embedding)."""
    sd = {k: v.float() for k, v in sd.items()}
    if model.cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"--model {where}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _hf_model_config(hf: dict, where: Path) -> ModelConfig:
    """config.json of our export -> ModelConfig (llama: none, qwen3: qk, else its `precondition`)."""
    kind = hf.get("model_type")
    precondition = {"llama": "none", "qwen3": "qk"}.get(kind, hf.get("precondition"))
    if precondition is None:
        raise ConfigError(f"--model {where}: config.json has model_type {kind!r} and no 'precondition' key")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // n_heads) * n_heads != hf["hidden_size"]:
        raise ConfigError(f"--model {where}: head_dim * num_attention_heads != hidden_size; not one of our exports")
    rope = hf.get("rope_parameters") or {}
    # Qwen3's QK-norm uses rms_norm_eps: the export scaled q/k rows so that is equivalent (kappa is scale-free)
    eps = hf["rms_norm_eps"] if kind == "qwen3" else hf.get("precondition_eps", 1e-6)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads),
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
        norm_eps=hf["rms_norm_eps"],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        precondition=precondition,
        precondition_eps=eps,
    )


def hf_to_native(tensors: dict[str, Tensor], where: Path) -> dict[str, Tensor]:
    """HF names -> ours: drop `model.`, merge q,k,v into qkv_proj and gate,up into gate_up_proj,
    drop QK-norm gains (which must be ones: the preconditioner has none)."""
    sd = {k.removeprefix("model."): v.float() for k, v in tensors.items()}
    for name in [k for k in sd if k.endswith(("q_norm.weight", "k_norm.weight"))]:
        if not torch.all(sd.pop(name) == 1):
            raise ConfigError(f"--model {where}: {name} is not all ones; only our exports can be probed")
    for name in [k for k in sd if k.endswith("self_attn.q_proj.weight")]:
        base = name.removesuffix("q_proj.weight")
        parts = [sd.pop(base + p) for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")]
        sd[base + "qkv_proj.weight"] = torch.cat(parts)
    for name in [k for k in sd if k.endswith("mlp.gate_proj.weight")]:
        base = name.removesuffix("gate_proj.weight")
        gate, up = sd.pop(base + "gate_proj.weight"), sd.pop(base + "up_proj.weight")
        sd[base + "gate_up_proj.weight"] = torch.cat([gate, up])
    return sd


def load_model(path: Path, untrained: bool = False) -> tuple[Transformer, ModelConfig, dict]:
    """An HF export folder or a run directory -> (model in eval mode, its config, metadata)."""
    from launcher.config import load_run_config

    if (path / "config.json").is_file() and not (path / "model.safetensors").is_file():
        raise ConfigError(f"--model {path}: config.json but no model.safetensors; pass a complete export or a run dir")
    if (path / "config.json").is_file():
        if untrained:
            raise ConfigError(f"--untrained needs a run directory; {path} is an HF export")
        from safetensors.torch import load_file

        mcfg = _hf_model_config(json.loads((path / "config.json").read_text()), path)
        model = Transformer(mcfg)
        _load_native(model, hf_to_native(load_file(str(path / "model.safetensors")), path), path)
        return model.eval(), mcfg, {"model": str(path), "kind": "hf", "precondition": mcfg.precondition}
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"--model {path}: neither an HF export (config.json + model.safetensors) nor a run "
            "directory (config.yaml + checkpoints/)"
        )
    cfg = load_run_config(path / "config.yaml")
    cfg.model.attn_backend = "auto"  # the probe may run where the run's kernel does not
    torch.manual_seed(cfg.train.seed)  # --untrained: the trainer's init, seed for seed
    model = Transformer(cfg.model)
    meta = {"model": str(path), "kind": "run", "precondition": cfg.model.precondition, "run_config": cfg}
    if untrained:
        meta["step"] = 0
    else:
        _load_native(model, _run_state_dict(path, cfg), path)
        meta["step"] = int((path / "checkpoints" / "latest").read_text().strip().removeprefix("global_step") or 0)
    return model.eval(), cfg.model, meta


def _text_windows(text_file: Path, tokenizer_file: Path, seq_len: int) -> Tensor:
    from tokenizers import Tokenizer

    if not text_file.is_file():
        raise ConfigError(f"--text {text_file}: no such file")
    if not tokenizer_file.is_file():
        raise ConfigError(f"--text needs {tokenizer_file}; the model folder has no tokenizer")
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(read_text(text_file)).ids
    n = len(ids) // (seq_len + 1)
    if n == 0:
        raise ConfigError(f"--text {text_file}: {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def read_text(path: Path) -> str:
    """The UTF-8 text of --text; a binary file (say, gzip) is an error that names it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--text {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); pass a plain text file"
        ) from None


def load_windows(args: argparse.Namespace, meta: dict, mcfg: ModelConfig) -> Tensor:
    """Validation windows (N, seq_len + 1): --text, --data-config, or the run's own data."""
    from launcher.config import load_run_config

    if args.text is not None:
        windows = _text_windows(args.text, args.model / "tokenizer.json", args.seq_len or min(mcfg.max_seq_len, 256))
    else:
        cfg = load_run_config(args.data_config, name="--data-config") if args.data_config else meta.get("run_config")
        if cfg is None:
            raise ConfigError(f"--model {args.model} is an HF export: pass --data-config FILE or --text FILE")
        from data import prepare_data, validation_windows

        prepared = prepare_data(cfg.data, model_vocab_size=mcfg.vocab_size, model_max_seq_len=mcfg.max_seq_len)
        windows = validation_windows(prepared)
    if int(windows.max()) >= mcfg.vocab_size or windows.shape[1] - 1 > mcfg.max_seq_len:
        raise ConfigError(
            f"windows of {windows.shape[1] - 1} tokens with ids up to {int(windows.max())} do not fit "
            f"the model (vocab {mcfg.vocab_size}, max_seq_len {mcfg.max_seq_len})"
        )
    return windows


# ---- the command --------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.conditioning", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="an HF export folder or a run directory")
    p.add_argument("--json", default=None, type=Path, help="write the full per-head numbers here")
    p.add_argument("--batch", default=8, type=int, help="validation windows to probe (default 8)")
    p.add_argument("--untrained", action="store_true", help="RUN_DIR only: the step-0 model (the run's seed)")
    p.add_argument("--data-config", default=None, type=Path, help="a run YAML whose validation windows to use")
    p.add_argument("--text", default=None, type=Path, help="a text file, tokenized with the model's tokenizer")
    p.add_argument("--seq-len", default=None, type=int, help="window length for --text (default: the model's)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="forward pass precision")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every input and the output path, before the model is loaded."""
    from data.config import check_output_path, read_yaml

    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: expected a positive int")
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigError(f"--seq-len {args.seq_len}: expected a positive int")
    if not args.model.is_dir():
        raise ConfigError(f"--model {args.model}: no such folder; pass an HF export folder or a run directory")
    if args.text is not None and not args.text.is_file():
        raise ConfigError(f"--text {args.text}: no such file; pass a plain text file")
    if args.data_config is not None:
        read_yaml(args.data_config, "--data-config")
    if args.json is not None:
        check_output_path("--json", args.json, folder=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    model, mcfg, meta = load_model(args.model, untrained=args.untrained)
    windows = load_windows(args, meta, mcfg)[: args.batch]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    bf16 = args.precision == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    layers = probe(model, windows[:, :-1].to(device), mcfg, autocast)
    meta.pop("run_config", None)
    meta.update(batch=len(windows), seq_len=windows.shape[1] - 1, precision=args.precision)
    print(f"{args.model}: precondition {mcfg.precondition}, {len(windows)} x {windows.shape[1] - 1} tokens")
    print(table(layers))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report(layers, meta), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
