"""The `data` section of a run config."""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import check_choice, check_range
from core.errors import ConfigError

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
        if isinstance(self.files, str) or self.files is None:  # None: an empty override, data.files=
            self.files = [self.files] if self.files else []
        if not isinstance(self.files, list) or not all(isinstance(f, str) for f in self.files):
            raise ConfigError(f"data.files: {self.files!r} is not a glob or a list of globs, e.g. [data/*.txt]")
        weights = self.weights or []
        numbers = all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights)
        if not isinstance(weights, list) or not numbers:
            raise ConfigError(f"data.weights: {self.weights!r} is not a list of numbers, one per glob in data.files")
        self.weights = [float(w) for w in weights]
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
            check_range("data", "weights", w, 0 < w < math.inf, "positive weights, one per glob in data.files")
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
