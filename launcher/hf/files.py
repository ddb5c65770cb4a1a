"""The files of an export beside config.json and the weights: tokenizer, generation config,
model card and the marker that says the folder is one of our exports."""

from __future__ import annotations

import json
from pathlib import Path

from data.config import ConfigError
from launcher.config import RunConfig
from launcher.hf.checkpoint import Checkpoint
from launcher.hf.convert import ARCHITECTURES, needs_remote_code, qk_scale

EOT = "<|endoftext|>"
MARKER = "export.json"
MARKER_FORMAT = "precond-lm-hf-export"


def eot_id(tokenizer_file: Path) -> int:
    """The id of the end-of-text token in the run's tokenizer.json."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(f"{tokenizer_file}: not a tokenizers file ({str(e).splitlines()[0]})") from None
    token_id = tok.token_to_id(EOT)
    if token_id is None:
        raise ConfigError(f"{tokenizer_file}: has no {EOT} token; the exporter uses it as eos/bos/pad")
    return token_id


def write_tokenizer(tokenizer_file: Path, out: Path, max_seq_len: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (EOT as eos, bos and pad)."""
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), model_max_length=max_seq_len, clean_up_tokenization_spaces=False, **special
    )
    tok.save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a name transformers 4.x and 5.x both know
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_generation_config(out: Path, token_id: int) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=token_id, eos_token_id=token_id, pad_token_id=token_id).save_pretrained(str(out))


def write_marker(out: Path, run_dir: Path, ckpt: Checkpoint, precondition: str, dtype: str) -> None:
    info = {
        "format": MARKER_FORMAT,
        "run_dir": str(run_dir),
        "tag": ckpt.tag,
        "step": ckpt.step,
        "tokens": ckpt.tokens,
        "val_loss": ckpt.val_loss,
        "precondition": precondition,
        "architecture": ARCHITECTURES[precondition],
        "dtype": dtype,
    }
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


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


def model_card(cfg: RunConfig, ckpt: Checkpoint, dtype: str, n_params: int) -> str:
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
        f"# {ARCHITECTURES[m.precondition]} with `{m.precondition}` attention preconditioning",
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
    lines += ["Documents were separated by `<|endoftext|>` during training.", ""]
    lines += ["## Training config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
