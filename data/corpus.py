"""The passes `prepare_data` makes over a corpus: check the files, choose the held-out
documents, feed the tokenizer trainer, count tokens and pack the validation windows.

The validation split holds out whole documents: those whose 64-bit doc_hash is among the
smallest `val_fraction` of the corpus (at least one), recorded as a hash threshold so that
every rank and every later run filters the same documents out of the training stream without
a list. The default corpus instead holds out whole plays as separate files (data/default_corpus.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.errors import ConfigError
from data.config import DataConfig
from data.default_corpus import fetch_default_corpus, split_plays
from data.shards import ShardFiles
from data.sources import (
    ScanReport,
    SourceSpec,
    check_files,
    doc_hash,
    file_sources,
    held_out,
    hub_source,
    iter_checked_texts,
)
from data.stream import TOKENIZE_BATCH, WindowPacker

DEFAULT_CORPUS = "default corpus (Shakespeare's plays)"
CHECK_HEAD_BYTES = 1 << 20
"""Bytes of each file checked up front when the corpus is too large to read twice."""


def resolve_sources(cfg: DataConfig) -> tuple[list[SourceSpec], list[SourceSpec]]:
    """(training sources, separate validation sources): the latter only for the default corpus."""
    if cfg.files and cfg.hf_dataset:
        raise ConfigError("data.files and data.hf_dataset: both are set; give one of them (or neither for the default)")
    if cfg.files:
        return file_sources(cfg), []
    if cfg.hf_dataset:
        return [hub_source(cfg)], []
    train, val = split_plays(fetch_default_corpus(cfg.cache_dir), cfg.val_fraction)
    return [SourceSpec(DEFAULT_CORPUS, "text", tuple(train))], [SourceSpec(DEFAULT_CORPUS, "text", tuple(val))]


def source_fingerprint(specs: list[SourceSpec]) -> list:
    """What identifies the corpus for the cache: each file's path, size and mtime; a hub dataset's name."""
    out = []
    for s in specs:
        files = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in s.files]
        out.append([s.name, s.format, s.hf_subset, s.hf_split, files])
    return out


class CorpusPass:
    """Streams the documents of a corpus for `prepare_data`; holds what the passes learn."""

    def __init__(self, specs: list[SourceSpec], val_specs: list[SourceSpec], cfg: DataConfig, progress: bool):
        self.specs, self.val_specs, self.cfg, self.progress = specs, val_specs, cfg, progress
        self.user_weights = list(cfg.weights) or [None] * len(specs)
        self.report = ScanReport()
        self.val_threshold = 0
        self.counts: dict[str, int] = {}
        self.source_bytes: list[int] = []

    def _docs(self, specs: list[SourceSpec], desc: str) -> Iterator[tuple[int, str]]:
        bar = tqdm(desc=desc, unit=" docs", disable=not self.progress, leave=False)
        for k, spec in enumerate(specs):
            for text in iter_checked_texts(spec):
                bar.update()
                yield k, text
        bar.close()

    def _check(self) -> None:
        """Check the files: whole, or the first CHECK_HEAD_BYTES of each when the corpus is larger
        than the tokenizer sample (the sharding pass then reads the rest once)."""
        kept, weights, n_files = [], [], 0
        size = sum(os.stat(f).st_size for s in self.specs + self.val_specs for f in s.files)
        head = CHECK_HEAD_BYTES if size > self.cfg.tokenizer_sample_bytes else None
        for spec, weight in zip(self.specs, self.user_weights, strict=True):
            if spec.format != "hub":
                n_files += len(spec.files)
                files = check_files(spec, self.report, head)
                if not files:
                    continue  # a source whose files are all empty drops out of the mixture
                spec = replace(spec, files=tuple(files))
            kept.append(spec)
            weights.append(weight)
        if not kept:
            raise ConfigError(f"data.files: all {n_files} matched files are empty; give files that hold text")
        self.val_specs = [replace(s, files=tuple(check_files(s, self.report, head))) for s in self.val_specs]
        self.specs, self.user_weights = kept, weights

    def sample_and_split(self, cap: int) -> list[str]:
        """Check every file, read up to `cap` bytes of documents (shared among the sources) and
        choose the held-out documents (sets val_threshold); returns the sample's training texts.
        When the sample is the whole corpus the split is exact (the smallest val_fraction of
        doc hashes, as the module docstring says); else a document is held out when its hash
        falls in the lowest val_fraction of the hash range."""
        self._check()
        texts, hashes, whole = [], [], True
        for spec in self.specs:
            size = 0
            for _, text in self._docs([spec], "reading a sample"):
                if size >= cap // len(self.specs):
                    whole = False
                    break
                texts.append(text)
                hashes.append(doc_hash(text))
                size += len(text.encode("utf-8"))
        if not hashes:
            raise ConfigError(f"data: {self.specs[0].name!r} yields no documents with text; check data.text_field")
        if self.val_specs:
            self.val_threshold = 0
        elif not whole:
            self.val_threshold = int(self.cfg.val_fraction * 2**64)
        elif len(hashes) < 2:
            raise ConfigError("data: the corpus has 1 document; give at least 2 (whole documents are held out)")
        else:
            n_val = min(len(hashes) - 1, max(1, round(self.cfg.val_fraction * len(hashes))))
            self.val_threshold = int(np.sort(np.array(hashes, dtype=np.uint64))[n_val - 1]) + 1
        return [t for t in texts if self._is_train(t)]

    def _is_train(self, text: str) -> bool:
        return not held_out(text, self.val_threshold)

    def useful_workers(self, shard_bytes: int) -> int:
        """Worker processes that can have a shard to tokenise (local files: by their size)."""
        if any(s.format == "hub" for s in self.specs):
            return 1 << 16
        size = sum(os.stat(f).st_size for s in self.specs + self.val_specs for f in s.files)
        return max(1, -(-size // shard_bytes))

    def _train_texts(self) -> Iterator[tuple[int, str]]:
        return ((k, t) for k, t in self._docs(self.specs, "counting tokens") if self._is_train(t))

    def val_texts(self) -> Iterator[str]:
        if self.val_specs:
            return (t for _, t in self._docs(self.val_specs, "validation"))
        return (t for _, t in self._docs(self.specs, "validation") if not self._is_train(t))

    def _count(self, split: str, texts: list[str], tok) -> list[list[int]]:
        encoded = [e.ids for e in tok.encode_batch(texts)]
        self.counts[f"{split}_documents"] = self.counts.get(f"{split}_documents", 0) + len(texts)
        self.counts[f"{split}_bytes"] = self.counts.get(f"{split}_bytes", 0) + sum(len(t.encode()) for t in texts)
        self.counts[f"{split}_tokens"] = self.counts.get(f"{split}_tokens", 0) + sum(map(len, encoded))
        return encoded

    def count_and_pack(self, tok, eos_id: int) -> np.ndarray:
        """Count documents, bytes and tokens of both splits; returns the validation windows (N, seq_len + 1)."""
        for split in ("train", "val"):
            for key in ("documents", "bytes", "tokens"):
                self.counts[f"{split}_{key}"] = 0
        batch, self.source_bytes = [], [0] * len(self.specs)
        for k, t in self._train_texts():
            self.source_bytes[k] += len(t.encode("utf-8"))
            batch.append(t)
            if len(batch) == TOKENIZE_BATCH:
                self._count("train", batch, tok)
                batch = []
        self._count("train", batch, tok)
        return self._pack(self._count("val", [t], tok)[0] + [eos_id] for t in self.val_texts())

    def count_shards(self, shards: list[dict], folder: Path) -> np.ndarray:
        """Take the counts from the sharding pass's records; returns the validation windows
        packed from the held-out documents the shards set aside, in shard order."""
        self.source_bytes = [0] * len(self.specs)
        for split in ("train", "val"):
            for key in ("documents", "bytes", "tokens"):
                self.counts[f"{split}_{key}"] = sum(r[f"{split}_{key}"] for r in shards)
        for r in shards:
            if r["source"] >= 0:
                self.source_bytes[r["source"]] += r["train_bytes"]
        self.counts["shards"] = len(shards)
        return self._pack(np.load(ShardFiles(folder, r["name"]).val) for r in shards if r["val_documents"])

    def _pack(self, pieces: Iterator) -> np.ndarray:
        """The first data.val_windows windows of seq_len + 1 tokens of the held-out documents."""
        packer, windows = WindowPacker(self.cfg.seq_len + 1), []
        for ids in pieces:
            packer.push(ids)
            while packer.ready() and len(windows) < self.cfg.val_windows:
                windows.append(packer.pop())
        if not windows:
            raise ConfigError(
                f"data: the validation split has {self.counts['val_tokens']} tokens, fewer than data.seq_len + 1 = "
                f"{self.cfg.seq_len + 1}; raise data.val_fraction or add documents"
            )
        return np.stack(windows)

    def weights(self) -> list[float]:
        """Mixture weights: data.weights, or each source's training bytes."""
        if self.user_weights and self.user_weights[0] is not None:
            return [float(w) for w in self.user_weights]
        return [float(max(b, 1)) for b in self.source_bytes]

    def replaced_message(self) -> str:
        r = self.report
        return (
            f"data: {r.replaced} invalid UTF-8 sequences in {len(r.replaced_files)} files were replaced by U+FFFD "
            f"(first: {r.replaced_files[0]})"
        )

    def stats(self, vocab_size: int, n_val_windows: int) -> dict:
        c = self.counts
        total_bytes = c["train_bytes"] + c["val_bytes"]
        return {
            **c,
            "sources": [{"name": s.name, "files": len(s.files)} for s in self.specs],
            "files": sum(len(s.files) for s in self.specs + self.val_specs),
            "empty_files": len(self.report.empty_files),
            "non_utf8_replaced": self.report.replaced,
            "non_utf8_files": len(self.report.replaced_files),
            "tokens_per_byte": (c["train_tokens"] + c["val_tokens"]) / max(total_bytes, 1),
            "vocab_size": vocab_size,
            "val_windows": n_val_windows,
        }


def format_stats(stats: dict, tokenizer_path: Path, eos_token: str) -> str:
    """The statistics table `python -m data.prepare` prints."""
    s = stats
    sources = ", ".join(f"{x['name']} ({x['files']} files)" for x in s["sources"])
    lines = [
        f"sources           {sources}",
        f"files             {s['files']} ({s['empty_files']} empty, skipped)",
        f"documents         {s['train_documents'] + s['val_documents']:,} "
        f"(train {s['train_documents']:,}, validation {s['val_documents']:,})",
        f"bytes             {s['train_bytes'] + s['val_bytes']:,} "
        f"(train {s['train_bytes']:,}, validation {s['val_bytes']:,})",
        f"tokens            {s['train_tokens'] + s['val_tokens']:,} "
        f"(train {s['train_tokens']:,}, validation {s['val_tokens']:,})",
        f"tokens per byte   {s['tokens_per_byte']:.3f}",
        f"non-UTF-8         {s['non_utf8_replaced']} sequences replaced in {s['non_utf8_files']} files",
        f"tokenizer         {tokenizer_path} (vocab {s['vocab_size']}, eos {eos_token!r})",
        f"validation        {s['val_windows']} windows",
    ]
    if "shards" in s:
        lines.append(f"token shards      {s['shards']} (data.loader=shards)")
    return "\n".join(lines)
