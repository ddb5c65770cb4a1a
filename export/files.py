"""The files of an export beside config.json and the weights: tokenizer, generation config,
model card and the marker that says the folder is one of our exports; and the run directory's
copy of the tokenizer that training used, which the export reads its special tokens from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from data.tokenizer import PAD_TOKEN, find_eos, read_tokenizer_json
from export.consolidate import Checkpoint
from export.convert import architecture, needs_remote_code, qk_scale
from run.config import RunConfig
from run.rundir import RunDir

MARKER = "export.json"
MARKER_FORMAT = "precond-lm-hf-export"


@dataclass(frozen=True)
class RunTokenizer:
    """The tokenizer a run trained with: its tokenizer.json and its special tokens by role."""

    file: Path
    tokens: dict[str, str]
    """{"eos_token": ..., "bos_token": ..., "pad_token": ...}"""
    ids: dict[str, int]
    """{"eos_token_id": ..., "bos_token_id": ..., "pad_token_id": ...}"""


def _configured(folder: Path) -> dict[str, str]:
    """The special tokens a tokenizer_config.json in `folder` names, by role (none if it has none)."""
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise ConfigError(f"{path}: not valid JSON; remove it to fall back to tokenizer.json alone") from None
    values = {role: config.get(role) for role in ("eos_token", "bos_token", "pad_token")}
    return {role: v.get("content") if isinstance(v, dict) else v for role, v in values.items() if v}


def run_tokenizer(run_dir: Path) -> RunTokenizer:
    """The special tokens RUN_DIR/tokenizer/tokenizer_config.json names. A run directory with
    only tokenizer.json gets what data.prepare would have written: the end-of-text token data/
    finds as eos and bos, and <|pad|> (else eos) as pad."""
    run = RunDir(run_dir)
    kept = run.tokenizer_dir / "tokenizer.json"
    file = kept if kept.is_file() else run.tokenizer_file
    tok, configured = read_tokenizer_json(file, file, option="--run"), _configured(file.parent)
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = find_eos(tok, configured.get("eos_token"), str(file))
    tokens = {"eos_token": eos, "bos_token": eos, "pad_token": PAD_TOKEN if PAD_TOKEN in vocab else eos}
    tokens.update({role: name for role, name in configured.items() if role != "eos_token"})
    for role, name in tokens.items():
        if name not in vocab:
            path = file.parent / "tokenizer_config.json"
            raise ConfigError(f"{path}: {role} {name!r} is not in {file}; name one of its tokens or remove {role}")
    return RunTokenizer(file, tokens, {f"{role}_id": vocab[name] for role, name in tokens.items()})


def write_tokenizer(tokenizer: RunTokenizer, out: Path, max_seq_len: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json with the run's special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer.file),
        model_max_length=max_seq_len,
        clean_up_tokenization_spaces=False,
        **tokenizer.tokens,
    )
    tok.save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a name transformers 4.x and 5.x both know
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(tokenizer.tokens, indent=2) + "\n")


def write_generation_config(out: Path, token_ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**token_ids).save_pretrained(str(out))


def write_marker(out: Path, run_dir: Path, ckpt: Checkpoint, precondition: str, dtype: str) -> None:
    info = {
        "format": MARKER_FORMAT,
        "run_dir": str(run_dir),
        "tag": ckpt.tag,
        "step": ckpt.step,
        "tokens": ckpt.tokens,
        "val_loss": ckpt.val_loss,
        "precondition": precondition,
        "architecture": architecture(precondition),
        "dtype": dtype,
    }
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(folder: Path, hint: str = "pass a folder written by python -m launcher.export_hf") -> None:
    """What every command that loads a Hugging Face model folder checks first: a config.json
    that parses and a weights file (is_export says, further, whether we wrote it)."""
    if not folder.is_dir():
        raise ConfigError(f"--model {folder}: no such folder; {hint}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model {folder}: no config.json; {hint}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:  # UnicodeDecodeError too
        raise ConfigError(f"--model {folder}: config.json is not valid JSON ({e}); {hint}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--model {folder}: config.json is not a JSON object; {hint}")
    if not any((folder / name).is_file() for name in WEIGHTS):
        raise ConfigError(f"--model {folder}: no model.safetensors (nor another weights file); {hint}")


def is_export(folder: Path) -> bool:
    """True when `folder` holds our marker (so re-exporting may replace it)."""
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _fmt(value, spec: str = "") -> str:
    return "not recorded" if value is None else format(value, spec)


def _params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def model_card(cfg: RunConfig, ckpt: Checkpoint, dtype: str, n_params: int, eos_token: str) -> str:
    """README.md: what the model is, how to load it, and the run it came from."""
    m = cfg.model
    remote = needs_remote_code(m.precondition)
    load_args = ", trust_remote_code=True" if remote else ""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [causal-lm, preconditioned-attention]",
        "---",
        f"# {architecture(m.precondition)} with `{m.precondition}` attention preconditioning",
        "",
        f"A {_params(n_params)}-parameter decoder ({m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, "
        f"{m.n_kv_heads} KV heads) pretrained from scratch, exported from checkpoint `{ckpt.tag}`.",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {_fmt(ckpt.step)} |",
        f"| tokens seen | {_fmt(ckpt.tokens, ',')} |",
        f"| final validation loss | {_fmt(ckpt.val_loss, '.4f')} |",
        f"| precondition | `{m.precondition}` (eps {m.precondition_eps:g}) |",
        f"| weights | {dtype} |",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("PATH"{load_args})',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH"{load_args})',
        "```",
        "",
    ]
    if remote:
        lines += ["`modeling_precond_llama.py` (torch + transformers only) adds the preconditioner to Llama.", ""]
    if m.precondition == "qk" and qk_scale(m) != 1.0:
        lines += [
            f"Qwen3 has one rms_norm_eps for all norms, so q_proj and k_proj are scaled by {qk_scale(m):.6g}: "
            f"its QK-norm then computes exactly our rms with eps {m.precondition_eps:g}.",
            "",
        ]
    lines += [f"Documents were separated by `{eos_token}` during training.", ""]
    lines += ["## Training config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
