"""The tokenizer: train a byte-level BPE with `tokenizers`, or load an existing one.

Either way the result is a folder holding `tokenizer.json` plus the `tokenizer_config.json`
and `special_tokens_map.json` that `transformers.PreTrainedTokenizerFast` reads, so the
export can copy the folder next to the model unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from core.errors import ConfigError, first_line
from core.files import staged_folder

EOS_TOKEN = "<|endoftext|>"
"""The end-of-text token of trained tokenizers: it separates packed documents."""
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# End-of-text names used by common tokenizers, tried in order when loading one.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, no normalizer, so decode(encode(s)) == s)
    with the special tokens at ids 0.. and at most `vocab_size` entries."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def find_eos(tok: Tokenizer, preferred: str | None, source: str) -> str:
    """The end-of-text token of `tok`: `preferred` (from a tokenizer_config.json) or a known name."""
    vocab = tok.get_vocab(with_added_tokens=True)
    for name in ([preferred] if preferred else []) + list(KNOWN_EOS_TOKENS):
        if name in vocab:
            return name
    raise ConfigError(
        f"data.tokenizer: {source} has no end-of-text token; expected one of {', '.join(KNOWN_EOS_TOKENS)} "
        "or an eos_token in its tokenizer_config.json"
    )


def _config_eos(folder: Path) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except ValueError:  # UnicodeDecodeError too
        config = None
    if not isinstance(config, dict):
        raise ConfigError(f"data.tokenizer: {cfg} is not a JSON object; fix or remove it")
    eos = config.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def read_tokenizer_json(file: Path, given: str | Path, option: str = "data.tokenizer") -> Tokenizer:
    """tokenizer.json `file`, found through `given` (that file, or its folder) of `option`; one
    that the tokenizers library cannot read is a ConfigError naming them."""
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception
        where = given if Path(given) == file else f"{given} (its {file.name})"
        raise ConfigError(f"{option}: {where} is not a valid tokenizer.json ({first_line(e)})") from None


def open_tokenizer(path: str | Path) -> Tokenizer:
    """A prepared tokenizer.json, ready to encode documents whole (no padding, no truncation)."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_tokenizer(path: str) -> tuple[Tokenizer, str]:
    """Load a tokenizer.json or a Hugging Face tokenizer folder; returns (tokenizer, eos token)."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            tok = read_tokenizer_json(p / "tokenizer.json", path)
        else:  # a folder with only slow-tokenizer files: let transformers convert it
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(p)).backend_tokenizer
            except Exception as e:
                raise ConfigError(f"data.tokenizer: {path} is not a loadable tokenizer folder ({e})") from None
        return tok, find_eos(tok, _config_eos(p), path)
    if p.is_file():
        tok = read_tokenizer_json(p, path)
        return tok, find_eos(tok, _config_eos(p.parent), path)
    raise ConfigError(f"data.tokenizer: {path} does not exist; give a tokenizer.json or a tokenizer folder")


def save_tokenizer(tok: Tokenizer, eos_token: str, folder: Path, max_len: int) -> Path:
    """Write tokenizer.json + the transformers config files into `folder` atomically (a
    temporary folder renamed into place); returns the path of tokenizer.json."""
    folder = Path(folder)
    with staged_folder(folder, replace=False) as tmp:  # another process may finish first: same copy
        _write_tokenizer_files(tok, eos_token, tmp, max_len)
    return folder / "tokenizer.json"


def _write_tokenizer_files(tok: Tokenizer, eos_token: str, tmp: Path, max_len: int) -> None:
    tok.save(str(tmp / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {"eos_token": eos_token, "bos_token": eos_token, "unk_token": eos_token}
    if PAD_TOKEN in vocab:
        special["pad_token"] = PAD_TOKEN
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        # Byte-level BPE decodes exactly; cleaning spaces would break the round trip.
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
