"""Typed configuration: the `data` section, and the small machinery every section uses.

The machinery lives here because data/ is the bottom layer: launcher/ composes the full
run config from these pieces, and `python -m data.prepare` reads the same file without
importing anything above data/.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


class ConfigError(ValueError):
    """A user error in a config file or an override; the message is one line."""


def check_choice(section: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(
            f"{section}.{key}: {value!r} is not a valid choice; choose one of {', '.join(map(str, choices))}"
        )


def check_range(section: str, key: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{key}: {value!r} is out of range; expected {expected}")


def build_section(cls: type, raw: Any, section: str):
    """Validate a mapping against dataclass `cls` and return an instance.

    Unknown keys list the valid keys of the section, wrong types name the key and the
    expected type; range and choice checks run in the dataclass's __post_init__.
    """
    if raw is None:
        raw = {}
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {raw!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{section}.{key}: unknown key; valid keys of {section}: {', '.join(valid)}")
    merged = OmegaConf.structured(cls)
    for key, value in raw.items():
        try:
            merged = OmegaConf.merge(merged, {key: value})
        except (ValidationError, ConfigKeyError):
            ftype = next(f.type for f in dataclasses.fields(cls) if f.name == key)
            tname = getattr(ftype, "__name__", str(ftype))
            raise ConfigError(f"{section}.{key}: {value!r} is not a valid {tname}") from None
    return OmegaConf.to_object(merged)


def load_yaml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """Read a YAML config and apply dotted `section.key=value` overrides; returns a plain dict."""
    cfg = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/tiny.yaml")
        try:
            cfg = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends: report in one line
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=100")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"overrides {list(overrides)}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_container(cfg, resolve=True) or {}


FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_SPLITS = ("file", "blank_lines")


@dataclass
class DataConfig:
    files: Any = field(default_factory=list)
    """A glob or a list of globs of corpus files; empty (and no hf_dataset) = the default corpus."""
    format: str = "auto"
    """File format: auto (by extension), text, jsonl or parquet."""
    text_field: str = "text"
    """The field that holds the text in jsonl and parquet records."""
    text_split: str = "file"
    """For text files: a whole file is one document ('file') or blank lines separate documents."""
    weights: Any = field(default_factory=list)
    """Mixture weights, one per glob in `files` (empty = every source weighted by its size)."""
    hf_dataset: str = ""
    """A hub dataset name (or local dataset folder) streamed with `datasets`."""
    hf_subset: str = ""
    """The hub dataset's configuration name."""
    hf_split: str = "train"
    """The hub dataset's split."""
    tokenizer: str = ""
    """A tokenizer.json or a Hugging Face tokenizer folder; empty = train a BPE on the corpus."""
    vocab_size: int = 4096
    """Vocabulary size of a trained tokenizer (at most model.vocab_size)."""
    seq_len: int = 256
    """Tokens per training window (at most model.max_seq_len)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (whole documents, chosen deterministically)."""
    val_windows: int = 64
    """Number of fixed validation windows."""
    cache_dir: str = ".cache"
    """Where the default corpus and trained tokenizers are cached."""

    def __post_init__(self) -> None:
        if isinstance(self.files, str):
            self.files = [self.files] if self.files else []
        self.files = [str(f) for f in (self.files or [])]
        self.weights = [float(w) for w in (self.weights or [])]
        check_choice("data", "format", self.format, FORMATS)
        check_choice("data", "text_split", self.text_split, TEXT_SPLITS)
        check_range("data", "vocab_size", self.vocab_size, self.vocab_size >= 260, "an int >= 260")
        check_range("data", "seq_len", self.seq_len, self.seq_len >= 1, "a positive int")
        check_range("data", "val_fraction", self.val_fraction, 0.0 < self.val_fraction < 1.0, "0 < x < 1")
        check_range("data", "val_windows", self.val_windows, self.val_windows >= 1, "a positive int")
        if self.weights and len(self.weights) != len(self.files):
            raise ConfigError(
                f"data.weights: {len(self.weights)} weights for {len(self.files)} globs in data.files; "
                "give one weight per glob"
            )

    def matched_files(self) -> list[list[str]]:
        """The files each glob matches, sorted; a glob that matches nothing is an error."""
        out = []
        for pattern in self.files:
            hits = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not hits:
                raise ConfigError(f"data.files: {pattern!r} matches no file")
            out.append(hits)
        return out


def run_main(main, argv=None) -> int:
    """Run a command's main(argv); a user error (ConfigError, or FileNotFoundError naming a
    path) prints one line to stderr and exits 2, without a traceback."""
    import sys

    try:
        return main(argv) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
