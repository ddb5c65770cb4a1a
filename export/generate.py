"""Generate text from an exported Hugging Face folder (ours or any causal LM with a tokenizer).

    python -m launcher.generate --model HF_DIR --prompt TEXT [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S]

temperature 0 is greedy decoding. The prompt is preceded by the tokenizer's bos token
(our exports: <|endoftext|>, the document separator seen in training), and generation
stops at eos. Prints the prompt followed by its continuation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from core.cli import run_main
from core.config import field_docs
from core.errors import ConfigError, first_line


@dataclasses.dataclass
class Sampling:
    """How to pick each next token; each field is an option of the command (--max-new-tokens, ...)."""

    max_new_tokens: int = 100
    """Tokens to generate at most."""
    temperature: float = 0.8
    """Sampling temperature; 0 = greedy."""
    top_k: int = 50
    """Sample among the k likeliest tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 = off."""
    seed: int = 0
    """Random seed of the sampler."""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: expected a positive int")
        if not 0 <= self.temperature < math.inf:
            raise ConfigError(f"--temperature {self.temperature}: expected a finite value >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: expected >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: expected 0 < p <= 1")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed {self.seed}: expected 0 <= seed < 2^63")

    def generate_kwargs(self) -> dict:
        """transformers' generate() arguments: greedy at temperature 0, else sampling with the filters."""
        kwargs = {"do_sample": self.temperature > 0, "max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        return kwargs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="an export folder (python -m launcher.export_hf)")
    p.add_argument("--prompt", required=True, help="text to continue")
    docs = field_docs(Sampling)
    for f in dataclasses.fields(Sampling):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=docs[f.name])
    return p.parse_args(argv)


def trusted(folder: Path) -> bool:
    """Remote code is trusted only in our own exports."""
    from export.files import is_export

    return is_export(folder)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trusted(folder))
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        hint = "pass a folder written by python -m launcher.export_hf"
        raise ConfigError(f"--model {folder}: no loadable tokenizer ({first_line(e)}); {hint}") from None


def load(folder: Path):
    """(model, tokenizer) from an export folder."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trusted(folder), dtype="auto")
    return model.eval(), tokenizer


def prompt_ids(tokenizer, prompt: str, limit: int | None) -> list[int]:
    """bos (if the tokenizer has one) + the prompt's tokens; at most limit - 1 of them."""
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    if limit is not None and len(ids) >= limit:
        raise ConfigError(f"--prompt: {len(ids)} tokens; the model handles at most {limit}, prompt included")
    return ids


def max_positions(folder: Path) -> int | None:
    return json.loads((folder / "config.json").read_text()).get("max_position_embeddings")


def generate_ids(model, tokenizer, prompt: str, sampling: Sampling) -> list[int]:
    """The new token ids (the KV cache is on, as generate's default); stops at eos."""
    import torch

    sampling.check()
    limit = getattr(model.config, "max_position_embeddings", None)
    ids = prompt_ids(tokenizer, prompt, limit)
    new = sampling.max_new_tokens if limit is None else min(sampling.max_new_tokens, limit - len(ids))
    kwargs = {**sampling.generate_kwargs(), "max_new_tokens": new}
    torch.manual_seed(sampling.seed)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return out[0, len(ids) :].tolist()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sampling = Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})
    sampling.check()
    if not args.prompt:
        raise ConfigError('--prompt "": empty; pass some text to continue, e.g. --prompt "Once upon a time"')
    from export.files import check_model_dir

    check_model_dir(args.model)
    prompt_ids(load_tokenizer(args.model), args.prompt, max_positions(args.model))  # fail before the slow load
    from transformers.utils import logging

    logging.disable_progress_bar()
    model, tokenizer = load(args.model)
    new = generate_ids(model, tokenizer, args.prompt, sampling)
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
