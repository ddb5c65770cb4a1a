"""Token shards: the corpus tokenised once, by N worker processes, into files of token ids.

The documents of each source, in stream order, are cut into pieces of about data.shard_bytes
of text, and piece 12 of source 1 becomes one shard in the shard folder:

    s01_00012.tokens.npy     token ids, each training document followed by EOS; uint16 when
                             the vocabulary fits (<= 65,536 entries), else uint32
    s01_00012.docs.npy       int64 end offset of each document in the tokens (the document index)
    s01_00012.val.npy        the held-out documents' ids (+ EOS), for the validation windows
    s01_00012.json           counts, the source and the tokens' SHA-256; written last, it marks
                             the shard as finished

Every file is written under a temporary name and renamed, so an interrupted preparation
resumes with the shards already finished. One worker tokenises a whole piece, so the shards
do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.files import write_atomic
from data.sources import SourceSpec, held_out, iter_checked_texts

LOOKAHEAD = 2
"""Pieces queued per worker beyond the one it tokenises."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a vocabulary of `vocab_size` entries."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Piece:
    """One shard's work: its documents."""

    name: str
    source: int
    """The training source (data.files glob) it belongs to; -1 for held-out sources."""
    texts: list[str]
    held_out: bool = False
    """All documents go to validation (the default corpus holds out whole files)."""


@dataclass(frozen=True)
class ShardJob:
    """What every worker needs besides the piece."""

    folder: Path
    tokenizer_path: Path
    eos_id: int
    val_threshold: int
    dtype: str


def shard_name(ordinal: int, index: int) -> str:
    """Shard `index` of the `ordinal`-th source sharded (held-out sources first)."""
    return f"s{ordinal:02d}_{index:05d}"


class ShardFiles:
    """The files of one shard: training tokens, document ends, held-out tokens and its record."""

    def __init__(self, folder: Path, name: str):
        self.tokens = folder / f"{name}.tokens.npy"
        self.docs = folder / f"{name}.docs.npy"
        self.val = folder / f"{name}.val.npy"
        self.record = folder / f"{name}.json"


def save_npy(path: Path, array: np.ndarray) -> bytes:
    """Write `array` as .npy atomically; returns the file's bytes (for the checksum)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getvalue())
    return buffer.getvalue()


def finished(folder: Path, name: str) -> dict | None:
    """The record of a finished shard whose token file is whole, else None."""
    files = ShardFiles(folder, name)
    try:
        record = json.loads(files.record.read_text())
        whole = files.tokens.stat().st_size == record["file_bytes"]
    except (OSError, ValueError, KeyError):
        return None
    return record if whole else None


_tokenizer = (None, None)  # (path, tokenizer): each worker process loads the tokenizer once


def _load_tokenizer(tokenizer_path: str):
    global _tokenizer
    if _tokenizer[0] != tokenizer_path:
        from data.tokenizer import open_tokenizer

        _tokenizer = (tokenizer_path, open_tokenizer(tokenizer_path))
    return _tokenizer[1]


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenizer_threads(workers: int) -> int:
    """Each worker's share of the cores for the tokenizer's own threads: `encode_batch` runs on a
    thread pool as wide as the machine, so N workers with all the threads each would fight
    over the cores (and be slower than one worker)."""
    return max(1, usable_cores() // workers)


def _init_worker(tokenizer_path: str, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizer first starts its pool
    _load_tokenizer(tokenizer_path)


def _encode(tok, texts: list[str], eos_id: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids of all documents, each + EOS; end offset of each document)."""
    ids = [np.asarray(e.ids + [eos_id], dtype=dtype) for e in tok.encode_batch(texts)]
    ends = np.cumsum([len(x) for x in ids], dtype=np.int64)
    return (np.concatenate(ids) if ids else np.empty(0, dtype=dtype)), ends


def tokenize_piece(job: ShardJob, piece: Piece) -> dict:
    """Tokenise one piece into its shard files (in a worker); returns the shard's record."""
    tok = _load_tokenizer(str(job.tokenizer_path))
    val, train = [], []
    for text in piece.texts:
        (val if piece.held_out or held_out(text, job.val_threshold) else train).append(text)
    tokens, ends = _encode(tok, train, job.eos_id, job.dtype)
    files = ShardFiles(job.folder, piece.name)
    data = save_npy(files.tokens, tokens)
    save_npy(files.docs, ends)
    val_ids, _ = _encode(tok, val, job.eos_id, job.dtype)
    save_npy(files.val, val_ids)
    record = {
        "name": piece.name,
        "source": piece.source,
        "train_documents": len(train),
        "train_bytes": sum(len(t.encode("utf-8")) for t in train),
        "train_tokens": len(tokens) - len(train),  # without the EOS after each document
        "val_documents": len(val),
        "val_bytes": sum(len(t.encode("utf-8")) for t in val),
        "val_tokens": len(val_ids) - len(val),
        "file_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_atomic(files.record, json.dumps(record).encode())
    return record


class _Done:
    def __init__(self, record: dict):
        self.record = record

    def get(self) -> dict:
        return self.record


class _Inline:
    """workers=1: tokenise in this process, as a pool of one would, the tokenizer on every core
    while it runs (also where TOKENIZERS_PARALLELISM=false keeps training ranks to one thread)."""

    def __init__(self):
        self.parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # read by the tokenizer at each call

    def submit(self, job: ShardJob, piece: Piece) -> _Done:
        return _Done(tokenize_piece(job, piece))

    def close(self) -> None:
        if self.parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.parallelism


class _Pool:
    def __init__(self, workers: int, tokenizer_path: Path):
        import multiprocessing

        # spawn, not fork: the caller may be a training rank with threads of its own
        ctx = multiprocessing.get_context("spawn")
        init = (str(tokenizer_path), tokenizer_threads(workers))
        self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=init)

    def submit(self, job: ShardJob, piece: Piece):
        return self.pool.apply_async(tokenize_piece, (job, piece))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    def terminate(self) -> None:
        self.pool.terminate()
        self.pool.join()


def _pieces(spec: SourceSpec, ordinal: int, source: int, held_out: bool, shard_bytes: int, folder: Path):
    """The pieces of one source in order; a shard finished earlier comes as its record."""

    def piece(texts: list[str]) -> Piece | dict:
        """The work for a shard, or the record of a shard finished earlier."""
        name = shard_name(ordinal, index)
        return finished(folder, name) or Piece(name, source, texts, held_out)

    index, texts, size = 0, [], 0
    for text in iter_checked_texts(spec):
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= shard_bytes:
            yield piece(texts)
            index, texts, size = index + 1, [], 0
    if texts:
        yield piece(texts)


class ShardWriter:
    """Runs the sharding pass over a corpus (see the module docstring)."""

    def __init__(self, job: ShardJob, workers: int, shard_bytes: int, max_tokens: int, progress: bool):
        self.job, self.workers, self.shard_bytes, self.max_tokens = job, workers, shard_bytes, max_tokens
        self.bar = tqdm(desc="tokenising", unit="tok", unit_scale=True, disable=not progress, leave=False)
        self.records: list[dict] = []

    def run(self, specs: list[SourceSpec], val_specs: list[SourceSpec]) -> list[dict]:
        """Shard the held-out sources (if any), then every training source; returns the records."""
        self.job.folder.mkdir(parents=True, exist_ok=True)
        runner = _Inline() if self.workers == 1 else _Pool(self.workers, self.job.tokenizer_path)
        try:
            sources = [(s, -1) for s in val_specs] + list(zip(specs, range(len(specs)), strict=True))
            for ordinal, (spec, source) in enumerate(sources):
                self._source(runner, spec, ordinal, source)
            runner.close()
        except BaseException:
            getattr(runner, "terminate", runner.close)()
            raise
        finally:
            self.bar.close()
        return self.records

    def _source(self, runner, spec: SourceSpec, ordinal: int, source: int) -> None:
        """Shard one source; stop after the shard that reaches data.max_tokens (training sources)."""
        held_out = source < 0
        pieces = _pieces(spec, ordinal, source, held_out, self.shard_bytes, self.job.folder)
        tokens = 0
        for record in self._in_order(runner, pieces):
            self.records.append(record)
            tokens += record["train_tokens"]
            self.bar.update(record["train_tokens"] + record["val_tokens"])
            if self.max_tokens and not held_out and tokens >= self.max_tokens:
                return

    def _in_order(self, runner, pieces: Iterator[Piece | dict]) -> Iterator[dict]:
        """Records of `pieces` in order, with up to LOOKAHEAD pieces per worker queued ahead."""
        inflight: deque = deque()
        for piece in pieces:
            inflight.append(_Done(piece) if isinstance(piece, dict) else runner.submit(self.job, piece))
            if len(inflight) > self.workers * (1 + LOOKAHEAD):
                yield inflight.popleft().get()
        while inflight:
            yield inflight.popleft().get()
