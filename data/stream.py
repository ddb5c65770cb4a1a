"""Streaming training windows: per-rank `datasets` streams, batched tokenisation, a weighted
mixture of sources, and packing into windows of seq_len + 1 tokens, with exact resume.

Shapes: a window is (seq_len + 1,) token ids; a batch is (B, seq_len + 1), inputs = [:, :-1],
labels = [:, 1:]. Documents are joined as doc_1 EOS doc_2 EOS ...; windows do not overlap,
so every token of the stream lands in exactly one window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from core.errors import ConfigError
from data.sources import SourceSpec, held_out, open_texts

TOKENIZE_BATCH = 16
"""Documents per batched tokenisation call (the unit `datasets` recomputes on resume)."""


class WindowPacker:
    """Concatenates token sequences and cuts them into non-overlapping windows of `window` tokens."""

    def __init__(self, window: int):
        self.window = window
        self.buf = np.empty(0, dtype=np.int64)

    def push(self, ids: Sequence[int]) -> None:
        self.buf = np.concatenate([self.buf, np.asarray(ids, dtype=np.int64)])

    def ready(self) -> bool:
        return len(self.buf) >= self.window

    def pop(self) -> np.ndarray:
        """The next window, shape (window,); call only when ready()."""
        out, self.buf = self.buf[: self.window], self.buf[self.window :]
        return out


def make_tokenize(encode_batch: Callable, column: str, eos_id: int, val_threshold: int) -> Callable:
    """The batched map function: drop empty and held-out documents, encode, append EOS."""

    def tokenize(batch: dict) -> dict:
        texts = [t for t in batch[column] if t and not held_out(t, val_threshold)]
        return {"ids": [enc.ids + [eos_id] for enc in encode_batch(texts)]}

    return tokenize


class DocumentSource:
    """One source's token documents for one rank, repeating forever; epoch e reads the files
    in an order seeded by (seed, e), so every epoch differs but all ranks agree on it."""

    def __init__(self, spec: SourceSpec, tokenizer, eos_id: int, val_threshold: int, rank: int, world: int, seed: int):
        self.spec, self.rank, self.world, self.seed = spec, rank, world, seed
        self._args = (tokenizer.encode_batch, eos_id, val_threshold)
        self.epoch, self.docs_in_epoch = 0, 0
        self._open(epoch=0)

    def _epoch_files(self, epoch: int) -> list[str] | None:
        if self.spec.format == "hub":
            return None  # a hub dataset repeats in its own order
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.spec.files))
        return [self.spec.files[i] for i in order]

    def _open(self, epoch: int, state: dict | None = None) -> None:
        from datasets.distributed import split_dataset_by_node

        ds, column = open_texts(self.spec, self._epoch_files(epoch))
        # Split before tokenising, so each rank encodes only its own documents.
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        fn = make_tokenize(self._args[0], column, *self._args[1:])
        self.ds = ds.map(fn, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=[column])
        if state is not None:
            self.ds.load_state_dict(state)
        self.epoch, self._it = epoch, iter(self.ds)

    def next_doc(self) -> list[int]:
        """The next document's ids (EOS included); moves to the next epoch when one ends."""
        while True:
            try:
                ids = next(self._it)["ids"]
                self.docs_in_epoch += 1
                return ids
            except StopIteration:
                if self.docs_in_epoch == 0:
                    raise ConfigError(
                        f"data: source {self.spec.name!r} has no training documents for rank {self.rank} of "
                        f"{self.world}; give it more documents (or files) than ranks"
                    ) from None
                self.docs_in_epoch = 0
                self._open(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "docs_in_epoch": self.docs_in_epoch, "datasets": self.ds.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._open(state["epoch"], state["datasets"])
        self.docs_in_epoch = state["docs_in_epoch"]


class TokenStream:
    """Training windows for one rank: `next_batch(B)` -> LongTensor (B, seq_len + 1).

    Sources are mixed by weight on tokens: the next document comes from the source with the
    fewest tokens drawn per unit of weight, a deterministic schedule that needs no RNG state.
    """

    elastic = False
    """Its state is per rank: a resume must keep the number of ranks."""

    def __init__(self, prepared, rank: int = 0, world_size: int = 1, seed: int = 0):
        from data.tokenizer import open_tokenizer

        if not 0 <= rank < world_size:
            raise ConfigError(f"TokenStream: rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        tokenizer = open_tokenizer(prepared.tokenizer_path)
        self.sources = [
            DocumentSource(spec, tokenizer, prepared.eos_id, prepared.val_threshold, rank, world_size, seed)
            for spec in prepared.sources
        ]
        self.weights = np.asarray(prepared.weights, dtype=np.float64)
        self.drawn = np.zeros(len(self.sources), dtype=np.int64)
        self.packer = WindowPacker(prepared.seq_len + 1)
        self.windows = 0

    def _fill(self) -> None:
        while not self.packer.ready():
            k = int(np.argmin(self.drawn / self.weights))
            ids = self.sources[k].next_doc()
            self.drawn[k] += len(ids)
            self.packer.push(ids)

    def next_window(self) -> np.ndarray:
        """One window, shape (seq_len + 1,) int64."""
        self._fill()
        self.windows += 1
        return self.packer.pop()

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """LongTensor (batch_size, seq_len + 1): inputs = [:, :-1], labels = [:, 1:]."""
        return torch.from_numpy(np.stack([self.next_window() for _ in range(batch_size)]))

    def state_dict(self) -> dict:
        """A small picklable dict that reflects exactly the windows returned so far."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "windows": self.windows,
            "drawn": self.drawn.tolist(),
            "leftover": self.packer.buf.tolist(),
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that produced `state` stopped (same rank and world size)."""
        mine = (self.rank, self.world_size, self.seed, len(self.sources))
        theirs = (state["rank"], state["world_size"], state["seed"], len(state["sources"]))
        if mine != theirs:
            raise ConfigError(
                f"data state: saved for (rank, world_size, seed, sources)={theirs}, this stream is {mine}; "
                "resume with the same world size and seed"
            )
        for source, s in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(s)
        self.drawn = np.asarray(state["drawn"], dtype=np.int64)
        self.packer.buf = np.asarray(state["leftover"], dtype=np.int64)
        self.windows = state["windows"]
