"""An export to GGUF, for llama.cpp: `python -m launcher.gguf --model HF_DIR [--out FILE] [--outtype f32|f16|bf16]`.

The `qk` export is a stock Qwen3 and the `none` export a stock Llama, so llama.cpp's own
converter (convert_hf_to_gguf.py) reads them. It is fetched once from the package registry
(the llama-cpp-python source package vendors llama.cpp) into the cache. One thing needs our
help: the converter names a BPE pre-tokenizer by a hash of its output on a fixed text, and a
tokenizer trained here has a hash of its own. Ours is a byte-level BPE with GPT-2's split,
which this module reads from tokenizer.json's pre_tokenizer (not from a hash), so the
converter is told `gpt-2`; another tokenizer keeps the converter's own decision.

When llama-cpp-python is installed (`pip install llama-cpp-python==0.3.36`, a 9-minute build
on 2 cores), the result is checked: llama.cpp's logits on a few tokens against transformers'.
The remote-code exports (`qkv`, `row`) have no llama.cpp architecture and are refused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from core.cli import run_main
from core.config import check_output_path
from core.errors import ConfigError
from core.files import staged_folder, temporary_name

LLAMA_CPP_PYTHON = "0.3.36"
SOURCE = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
STOCK = {"LlamaForCausalLM": "none", "Qwen3ForCausalLM": "qk"}
CHECK_TEXT = "To be, or not to be, that is the question:"

# Run in a child process: the converter with our pre-tokenizer answer where its hash table has none.
DRIVER = """
import sys
converter, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [converter, converter + "/gguf-py"]
import conversion.base as base
table = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return table(self, tokenizer)
    except NotImplementedError:
        if pre == "-":
            raise
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
convert_hf_to_gguf.main()
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.gguf", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="an export folder (python -m launcher.export_hf)")
    p.add_argument("--out", type=Path, default=None, help="the GGUF file (default: MODEL/model-OUTTYPE.gguf)")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f32")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="where the converter is kept")
    p.add_argument("--no-check", action="store_true", help="skip the logits check against transformers")
    return p.parse_args(argv)


def check_convertible(model: Path) -> dict:
    """The export's config.json; a ConfigError for one llama.cpp cannot read."""
    from export.files import check_model_dir

    check_model_dir(model)
    config = json.loads((model / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in STOCK or "auto_map" in config:
        raise ConfigError(
            f"--model {model}: a {arch} export (model.precondition={config.get('precondition', '?')}) runs our own "
            "remote code, which llama.cpp has no architecture for; only the qk (Qwen3) and none (Llama) exports convert"
        )
    if not (model / "tokenizer.json").is_file():
        raise ConfigError(f"--model {model}: no tokenizer.json; export the run again with python -m launcher.export_hf")
    return config


def gpt2_split(tokenizer_json: dict) -> bool:
    """True for a byte-level BPE that splits text with GPT-2's pattern before merging (what
    `tokenizers` ByteLevel(use_regex=True) does, alone or last in a Sequence)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    return (
        tokenizer_json.get("model", {}).get("type") == "BPE"
        and len(steps) == 1
        and len(byte_level) == 1
        and byte_level[0].get("use_regex", True)
    )


def fetch_converter(cache_dir: Path) -> Path:
    """llama.cpp's converter from the llama-cpp-python source package, fetched once with pip
    from the configured registry and unpacked (the converter, its `conversion` package and
    gguf-py) into the cache."""
    out = cache_dir / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    print(f"fetching llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON}, source) into {out} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        cmd += [f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob(f"{SOURCE}.tar.gz"))
        if proc.returncode or not archives:
            last = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
            raise ConfigError(f"llama-cpp-python=={LLAMA_CPP_PYTHON}: the source package could not be fetched ({last})")
        prefix = f"{SOURCE}/vendor/llama.cpp/"
        with staged_folder(out) as staged, tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)]
            members = [m for m in members if m.name[len(prefix) :].startswith(CONVERTER_PARTS)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staged, members=members, filter="data")
    return out


def convert(model: Path, out: Path, outtype: str, converter: Path) -> None:
    """Run the converter into a temporary name beside `out`, then rename it into place."""
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    pre = "gpt-2" if gpt2_split(tokenizer) else "-"
    tmp = temporary_name(out)
    cmd = [sys.executable, "-c", DRIVER, str(converter), pre, str(model), "--outfile", str(tmp), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tmp.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ConfigError(f"--model {model}: llama.cpp's converter failed ({last})")
    try:
        tmp.replace(out)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def logits_gap(model: Path, gguf: Path, text: str = CHECK_TEXT) -> tuple[float, int] | None:
    """(largest |llama.cpp logit - transformers logit| over the tokens of `text`, tokens), or
    None when llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model))(text)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].double().numpy()
    llm = Llama(model_path=str(gguf), n_ctx=max(64, len(ids)), logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    return float(np.abs(got - expected).max()), len(ids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = check_convertible(args.model)
    out = args.out or args.model / f"model-{args.outtype}.gguf"
    check_output_path("--out", out, folder=False)
    converter = fetch_converter(args.cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(args.model, out, args.outtype, converter)
    precondition = STOCK[config["architectures"][0]]
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype}, precondition {precondition})")
    if args.no_check:
        return 0
    gap = logits_gap(args.model, out)
    if gap is None:
        print(
            f"llama-cpp-python is not installed: logits not checked (pip install llama-cpp-python=={LLAMA_CPP_PYTHON})"
        )
    else:
        print(f"llama.cpp vs transformers: largest logit difference {gap[0]:.2e} over {gap[1]} tokens")
    print(f"run it: llama-cli -m {out} -p 'Once upon a time'")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
