"""Typed configuration: the `data` section, and the small machinery every section uses.

The machinery lives here because data/ is the bottom layer: launcher/ composes the full
run config from these pieces, and `python -m data.prepare` reads the same file without
importing anything above data/.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import inspect
import os
import sys
import textwrap
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
    types = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(cls)}
    merged = OmegaConf.structured(cls)
    for key, value in raw.items():
        if value is None and types[key] == "str":
            value = ""  # `key=` on the command line or `key:` in YAML: the empty string
        try:
            merged = OmegaConf.merge(merged, {key: value})
        except (ValidationError, ConfigKeyError):
            shown = "an empty value" if value is None else repr(value)
            raise ConfigError(f"{section}.{key}: {shown} is not a valid {types[key]}") from None
    return OmegaConf.to_object(merged)


def read_yaml(path: Path, name: str = "--config") -> DictConfig:
    """A YAML file whose top level is a mapping; `name` is the option that gave the path."""
    if path.is_dir():
        raise ConfigError(f"{name} {path}: is a folder; pass a YAML file such as configs/tiny.yaml")
    if not path.is_file():
        raise ConfigError(f"{name} {path}: no such file; pass a YAML file such as configs/tiny.yaml")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError and friends: report in one line
        raise ConfigError(f"{name} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{name} {path}: holds a list; expected a mapping of sections (model:, data:, train:, ...)")
    return cfg


def load_yaml(path: str | Path | None, overrides: list[str] = (), name: str = "--config") -> dict:
    """Read a YAML config and apply dotted `section.key=value` overrides; returns a plain dict.
    `name` is the option that gave the path, for error messages."""
    cfg = OmegaConf.create({}) if path is None else read_yaml(Path(path), name)
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
LOADERS = ("shards", "stream")


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
    """Where the default corpus, trained tokenizers and token shards are cached."""
    loader: str = "shards"
    """How training reads the corpus: 'shards' (tokenised once by data.prepare into token shards,
    read memory-mapped in a seeded global order; resumes on any number of ranks) or 'stream'
    (each rank tokenises its own share of a `datasets` stream while training; for hub corpora
    that should not be copied)."""
    shard_bytes: int = 16 << 20
    """Text bytes per token shard: the unit of parallel tokenisation and of resuming data.prepare."""
    max_tokens: int = 0
    """With loader=shards: at most about this many training tokens from each source (whole shards;
    0 = the whole corpus)."""
    tokenizer_sample_bytes: int = 128 << 20
    """Text bytes (spread over the sources) that a trained BPE learns from; a smaller corpus is
    read whole, and its validation split is then exact."""

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
        check_choice("data", "loader", self.loader, LOADERS)
        check_range("data", "shard_bytes", self.shard_bytes, self.shard_bytes >= 1, "a positive int")
        check_range("data", "max_tokens", self.max_tokens, self.max_tokens >= 0, "an int >= 0 (0 = no cap)")
        sample_ok = self.tokenizer_sample_bytes >= 1
        check_range("data", "tokenizer_sample_bytes", self.tokenizer_sample_bytes, sample_ok, "a positive int")
        for w in self.weights:
            check_range("data", "weights", w, w > 0, "positive weights, one per glob in data.files")
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


def check_output_path(name: str, path: str | Path, folder: bool = True) -> None:
    """An output `path` (a folder, or a file when folder=False) must be absent or of that kind,
    and the nearest existing folder on its way must be writable; checked before any work."""
    path = Path(path)
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{name} {path}: is a {other}, expected a {kind}; choose another {name}")
    start = path if folder else path.parent
    base = next((p for p in (start, *start.parents) if p.exists()), Path("."))
    if not base.is_dir():
        raise ConfigError(f"{name} {path}: cannot be created, {base} is a file; choose another {name}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {path}: cannot be written, {base} is not writable; choose another {name}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (Python keeps none at run time)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: " ".join(doc.value.value.split())
        for node, doc in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }


def config_help(sections: dict[str, type]) -> str:
    """Every key of `sections` with its default and field docstring: the epilog of a CLI's --help."""
    lines = ["config keys (section.key=value overrides; defaults in brackets):"]
    for name, cls in sections.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  {name}.{f.name} [{default!r}]")
            lines.append(textwrap.fill(docs.get(f.name, ""), 92, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(line for line in lines if line.strip())


def help_parser(prog: str, description: str, sections: dict[str, type]) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help ends with the config keys of `sections`."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=config_help(sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _usage_error(parser, message: str) -> None:
    raise ConfigError(f"{message}; see {parser.prog} --help")


@contextlib.contextmanager
def _usage_errors_in_one_line():
    """argparse's usage errors raise ConfigError instead of printing the usage and exiting."""
    saved, argparse.ArgumentParser.error = argparse.ArgumentParser.error, _usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class _DropOnBrokenPipe:
    """A text stream that goes quiet instead of raising once its reader has gone away."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):
            self._go_quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._go_quiet()

    def _go_quiet(self) -> None:
        devnull = open(os.devnull, "w")
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull.fileno(), self._stream.fileno())  # the interpreter's last flush goes there too
        self._stream = devnull

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_stdout() -> None:
    """From now on, output to a stdout whose reader has gone away is dropped, not an error."""
    if not isinstance(sys.stdout, _DropOnBrokenPipe):
        sys.stdout = _DropOnBrokenPipe(sys.stdout)


def run_main(main, argv=None) -> int:
    """Run a command's main(argv). A user error prints one line `error: ...` to stderr and returns
    2, without a traceback: a ConfigError, an argparse usage error, or a FileNotFoundError (or
    another of PATH_ERRORS) that names a path. A reader of stdout that goes away
    (`... | head`) does not make the command fail: what it prints is dropped from then on."""
    survive_closed_stdout()
    try:
        with _usage_errors_in_one_line():
            return main(argv) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PATH_ERRORS as e:
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
