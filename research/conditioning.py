"""The conditioning probe: condition numbers of the attention matrices, with and without the
preconditioner (docs/research.md).

    python -m launcher.conditioning --model (HF_DIR | RUN_DIR) [--json OUT] [--batch N]

It loads an HF export or a run directory, probes a batch of validation windows (model.probe:
what is measured, and how), prints a table (median over heads per layer) and writes the full
per-head numbers as JSON, with kappa = inf written as the string "inf".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from core.cli import run_main
from core.errors import ConfigError
from export import convert
from export.consolidate import consolidate, resolve_tag
from export.files import check_model_dir
from model import ModelConfig, Transformer
from model.probe import PROBED, probe
from run.rundir import RunDir

Tensor = torch.Tensor


# ---- reporting ----------------------------------------------------------------------------
def kappa_fmt(x: float | None) -> str:
    """A kappa in a table: 3 significant digits, "inf" when singular, "n/a" when missing."""
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.3g}")


def jsonable(x):
    """Infinity as the string "inf" (standard JSON has none; read_json reads it back); tuples as lists."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return x


def report(layers: list[dict], meta: dict) -> dict:
    """The JSON document: meta, then per layer the per-head numbers and their median."""
    out = dict(meta)
    out["kappa"] = "sigma_max / sigma_min of each (T, E) or (T, T) matrix, float64, median over the batch"
    out["infinity"] = 'numerically singular matrices (kappa = inf) are written as the string "inf"'
    out["layers"] = [
        {
            "layer": i,
            "heads": {n: [float(x) for x in h[n]] for n in PROBED},
            "median_over_heads": {n: float(np.median(h[n])) for n in PROBED},
        }
        for i, h in enumerate(layers)
    ]
    return jsonable(out)


def table(layers: list[dict]) -> str:
    """A compact text table: one row per layer, median over heads."""
    rows = [f"{'layer':>5} " + " ".join(f"{n:>9}" for n in PROBED)]
    for i, h in enumerate(layers):
        rows.append(f"{i:>5} " + " ".join(f"{kappa_fmt(float(np.median(h[n]))):>9}" for n in PROBED))
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
    """The newest checkpoint's weights, through the export's consolidation (any ZeRO stage)."""
    run = RunDir(run_dir)
    tag = run.latest_tag()
    if tag is None:
        raise ConfigError(
            f"--model {run_dir}: no checkpoint ({run.latest_file} is missing); train first or pass --untrained"
        )
    return consolidate(resolve_tag(run_dir, tag, option=None), cfg.model).state_dict


def _load_native(model: Transformer, sd: dict[str, Tensor], where: Path) -> None:
    """Load our-named weights; a tied head may be missing (it is the embedding)."""
    sd = convert.tie_head({k: v.float() for k, v in sd.items()}, model.cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"--model {where}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def load_model(path: Path, untrained: bool = False) -> tuple[Transformer, ModelConfig, dict]:
    """An HF export folder or a run directory -> (model in eval mode, its config, metadata)."""
    from run.config import load_run_config

    if (path / "config.json").is_file():
        check_model_dir(path, hint="pass a complete export or a run directory")
        if not (path / "model.safetensors").is_file():
            raise ConfigError(f"--model {path}: the probe reads model.safetensors; re-export with launcher.export_hf")
        if untrained:
            raise ConfigError(f"--untrained needs a run directory; {path} is an HF export")
        from safetensors.torch import load_file

        mcfg = convert.native_config(json.loads((path / "config.json").read_text()), f"--model {path}")
        model = Transformer(mcfg)
        hf_tensors = load_file(str(path / "model.safetensors"))
        _load_native(model, convert.native_state_dict(hf_tensors, mcfg, f"--model {path}"), path)
        return model.eval(), mcfg, {"model": str(path), "kind": "hf", "precondition": mcfg.precondition}
    run = RunDir(path)
    if not run.config.is_file():
        raise ConfigError(
            f"--model {path}: neither an HF export (config.json + model.safetensors) nor a run "
            "directory (config.yaml + checkpoints/)"
        )
    cfg = load_run_config(run.config)
    cfg.model.attn_backend = "auto"  # the probe may run where the run's kernel does not
    model = Transformer(cfg.model)
    model.init_weights(cfg.train.seed)  # --untrained: the trainer's init, seed for seed
    meta = {"model": str(path), "kind": "run", "precondition": cfg.model.precondition, "run_config": cfg}
    if untrained:
        meta["step"] = 0
    else:
        _load_native(model, _run_state_dict(path, cfg), path)
        meta["step"] = run.latest_step()
    return model.eval(), cfg.model, meta


def _text_windows(path: Path, tokenizer_file: Path, seq_len: int) -> Tensor:
    """--text as windows (N, seq_len + 1); a file that is not UTF-8 text (say, gzip) is an error that names it."""
    from data.tokenizer import read_tokenizer_json

    if not tokenizer_file.is_file():
        raise ConfigError(f"--text needs {tokenizer_file}; the model folder has no tokenizer")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--text {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); pass a plain text file"
        ) from None
    ids = read_tokenizer_json(tokenizer_file, tokenizer_file.parent, option="--model").encode(text).ids
    n = len(ids) // (seq_len + 1)
    if n == 0:
        raise ConfigError(f"--text {path}: {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def load_windows(args: argparse.Namespace, meta: dict, mcfg: ModelConfig) -> Tensor:
    """Validation windows (N, seq_len + 1): --text, --data-config, or the run's own data."""
    from run.config import load_run_config

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
    from core.config import check_output_path, read_yaml

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
