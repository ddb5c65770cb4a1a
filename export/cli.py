"""Export a run's DeepSpeed checkpoint as a Hugging Face folder that `transformers` loads offline.

    python -m launcher.export_hf --run RUN_DIR [--tag TAG] [--out DIR] [--dtype fp32|bf16]

Writes config.json, model.safetensors, generation_config.json, the tokenizer, a model card
(README.md) and export.json (our marker) into a temporary folder beside --out, then
renames it into place (core.files.staged_folder). An existing --out is replaced only
when it is one of our exports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from core.cli import run_main
from core.config import check_output_path
from core.errors import ConfigError
from run.config import RunConfig, load_run_config
from run.rundir import RunDir

DTYPES = ("fp32", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.export_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step300 (default: checkpoints/latest)")
    p.add_argument("--out", default=None, type=Path, help="output folder (default: RUN_DIR/hf)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="weight dtype (default fp32, lossless)")
    return p.parse_args(argv)


def check_out_dir(out: Path) -> None:
    """--out may be absent, empty, or a previous export; anything else is left untouched."""
    from export.files import MARKER, is_export

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ConfigError(f"--out {out}: exists and is not an export (no {MARKER}); choose another --out or remove it")
    check_output_path("--out", out)


def load_run(run_dir: Path) -> RunConfig:
    if not run_dir.is_dir():
        raise ConfigError(f"--run {run_dir}: no such directory")
    run = RunDir(run_dir)
    for path in (run.config, run.tokenizer_file):
        if not path.is_file():
            raise ConfigError(f"--run {run_dir}: no {path.name}; is it a run directory written by launcher.train?")
    return load_run_config(run.config)


def last_val_loss(run_dir: Path, step: int | None) -> float | None:
    """The last val_loss in metrics.jsonl at or before `step` (for checkpoints without one)."""
    rows = RunDir(run_dir).rows()
    found = [r["val_loss"] for r in rows if r.get("val_loss") is not None and (step is None or r["step"] <= step)]
    return float(found[-1]) if found else None


def write_export(tmp: Path, run_dir: Path, cfg: RunConfig, ckpt, dtype_name: str) -> None:
    """Every file of the export, into the empty folder `tmp`."""
    import torch
    from safetensors.torch import save_file

    from export import convert, files

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    tokenizer = files.run_tokenizer(run_dir)
    tensors = convert.hf_state_dict(ckpt.state_dict, cfg.model, dtype)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(tmp / "model.safetensors", 0o644)  # safetensors creates it owner-only; exports are shared
    convert.hf_config(cfg.model, tokenizer.ids, dtype).save_pretrained(str(tmp))
    if convert.needs_remote_code(cfg.model.precondition):
        shutil.copyfile(convert.MODELING_FILE, tmp / convert.MODELING_FILE.name)
    files.write_generation_config(tmp, tokenizer.ids)
    files.write_tokenizer(tokenizer, tmp, cfg.model.max_seq_len)
    n_params = sum(t.numel() for t in ckpt.state_dict.values())
    (tmp / "README.md").write_text(files.model_card(cfg, ckpt, dtype_name, n_params, tokenizer.tokens["eos_token"]))
    files.write_marker(tmp, run_dir, ckpt, cfg.model.precondition, dtype_name)


def export(run_dir: Path, tag: str | None = None, out: Path | None = None, dtype: str = "fp32") -> Path:
    """Export checkpoint `tag` of `run_dir` to `out` (default RUN_DIR/hf); returns the folder."""
    from core.files import staged_folder
    from export.consolidate import consolidate, resolve_tag

    out = out if out is not None else RunDir(run_dir).export
    cfg = load_run(run_dir)
    folder = resolve_tag(run_dir, tag)
    check_out_dir(out)
    ckpt = consolidate(folder, cfg.model)
    if ckpt.val_loss is None:
        ckpt.val_loss = last_val_loss(run_dir, ckpt.step)
    with staged_folder(out) as tmp:
        write_export(tmp, run_dir, cfg, ckpt, dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = export(args.run, args.tag, args.out, args.dtype)
    print(f"exported {args.run} -> {out}")
    print(f'try: python -m launcher.generate --model {out} --prompt "Once upon a time"')
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
