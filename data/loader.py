"""Training windows from token shards, and batches prepared ahead of the step.

ShardLoader: each training source's shards, memory-mapped, read as one token sequence cut into
non-overlapping windows of seq_len + 1 tokens. Epoch e visits the windows in an order seeded
by (seed, e) that does not depend on the world size; a global batch is the next B x W windows
of that order and rank r takes windows [r*B, (r+1)*B) of it. The loader's whole state is
(epoch, position in the epoch's order), the same on every rank, so a run resumes on any
number of ranks with exactly the same global batches.

Without data.weights an epoch visits every window once. With weights, source k contributes
round(w_k / sum(w) x N) windows to an epoch of N (its own windows in a seeded order, repeated
when it contributes more than it has).

Prefetcher: wraps any loader with next_batch / state_dict / load_state_dict and prepares the
next batches in a background thread; its state is the one after the last batch handed out.
"""

from __future__ import annotations

import copy
import queue
import threading

import numpy as np
import torch

from core.errors import ConfigError
from data.shards import ShardFiles


class SourceWindows:
    """The windows of one source: window j is tokens [j*L, (j+1)*L) of its shards in order."""

    def __init__(self, paths: list, window: int):
        shards = [np.load(p, mmap_mode="r") for p in paths]
        self.shards = [s for s in shards if len(s)]
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
        self.window = window
        self.count = int(self.ends[-1]) // window if len(self.ends) else 0

    def read(self, j: int, out: np.ndarray) -> None:
        """Copy window j into `out` (shape (L,), int64)."""
        start, filled = j * self.window, 0
        s = int(np.searchsorted(self.ends, start, side="right"))
        offset = start - (int(self.ends[s - 1]) if s else 0)
        while filled < self.window:
            piece = self.shards[s][offset : offset + self.window - filled]
            out[filled : filled + len(piece)] = piece
            filled, s, offset = filled + len(piece), s + 1, 0


def contributions(counts: list[int], weights: list[float] | None) -> list[int]:
    """Windows each source gives an epoch: all of its own without weights; else shares of the
    same total by weight, rounded by largest remainder so that they sum to that total."""
    if not weights:
        return list(counts)
    total, w = sum(counts), np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[: total - out.sum()]] += 1
    return out.tolist()


class ShardLoader:
    """Training windows for one rank from token shards: `next_batch(B)` -> LongTensor (B, seq_len + 1)."""

    elastic = True
    """Its state does not depend on the world size: a resume may change the number of ranks."""

    def __init__(self, prepared, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ConfigError(f"ShardLoader: rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.window = prepared.seq_len + 1
        by_source = [[] for _ in prepared.sources]
        for shard in prepared.shards:
            by_source[shard["source"]].append(ShardFiles(prepared.shard_dir, shard["name"]).tokens)
        self.sources = [SourceWindows(paths, self.window) for paths in by_source]
        counts = [s.count for s in self.sources]
        self.per_epoch = contributions(counts, list(prepared.weights) if prepared.weighted else None)
        self.epoch_size = sum(self.per_epoch)
        if self.epoch_size == 0:
            raise ConfigError(
                f"data: the training shards hold fewer than data.seq_len + 1 = {self.window} tokens; "
                "lower data.seq_len or add documents"
            )
        self.offsets = np.cumsum([0] + counts[:-1])
        self.position = 0  # windows handed out on all ranks together, over all epochs
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s windows as global window ids (source offset + window index)."""
        if epoch != self._epoch:
            parts = []
            for k, (src, m) in enumerate(zip(self.sources, self.per_epoch, strict=True)):
                own = np.random.default_rng([self.seed, epoch, k]).permutation(src.count) if m != src.count else None
                own = np.arange(src.count) if own is None else np.resize(own, m)
                parts.append(self.offsets[k] + own)
            ids = np.concatenate(parts)
            self._order = ids[np.random.default_rng([self.seed, epoch]).permutation(len(ids))]
            self._epoch = epoch
        return self._order

    def _read(self, position: int, out: np.ndarray) -> None:
        epoch, i = divmod(position, self.epoch_size)
        g = int(self.order(epoch)[i])
        k = int(np.searchsorted(self.offsets, g, side="right")) - 1
        self.sources[k].read(g - int(self.offsets[k]), out)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """LongTensor (batch_size, seq_len + 1): this rank's slice of the next global batch."""
        out = np.empty((batch_size, self.window), dtype=np.int64)
        start = self.position + self.rank * batch_size
        for b in range(batch_size):
            self._read(start + b, out[b])
        self.position += batch_size * self.world_size
        return torch.from_numpy(out)

    def state_dict(self) -> dict:
        epoch, position = divmod(self.position, self.epoch_size)
        return {"epoch": epoch, "position": position, "epoch_size": self.epoch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the global batches that produced `state` (any world size)."""
        mine, theirs = (self.epoch_size, self.seed), (state.get("epoch_size"), state.get("seed"))
        if mine != theirs:
            raise ConfigError(
                f"data state: saved for (windows per epoch, seed)={theirs}, this run has {mine}; "
                "resume with the same corpus, data settings and train.seed"
            )
        self.position = state["epoch"] * self.epoch_size + state["position"]


class Prefetcher:
    """Prepares the next `depth` batches of `loader` in a background thread."""

    def __init__(self, loader, batch_size: int, depth: int = 4, pin_memory: bool = False):
        self.loader, self.batch_size, self.depth, self.pin_memory = loader, batch_size, depth, pin_memory
        self.elastic = loader.elastic
        self._state = copy.deepcopy(loader.state_dict())
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.depth)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._halt.is_set():
                batch = self.loader.next_batch(self.batch_size)
                if self.pin_memory:
                    batch = batch.pin_memory()
                self._put((batch, copy.deepcopy(self.loader.state_dict())))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, e))

    def _put(self, item) -> None:
        while not self._halt.is_set():
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue

    def next_batch(self, batch_size: int) -> torch.Tensor:
        if batch_size != self.batch_size:
            raise ValueError(f"Prefetcher: made for batches of {self.batch_size}, asked for {batch_size}")
        batch, state = self._queue.get()
        if batch is None:
            raise state
        self._state = state
        return batch

    def state_dict(self) -> dict:
        """The loader's state after the last batch handed out (not after those prepared ahead)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._state = copy.deepcopy(state)
        self._start()

    def close(self) -> None:
        self._halt.set()
        self._thread.join()


def training_batches(prepared, rank: int, world_size: int, seed: int, batch_size: int, pin_memory: bool = False):
    """This rank's training batches for data.loader (shards or stream), prepared ahead."""
    if prepared.loader == "shards":
        loader = ShardLoader(prepared, rank=rank, world_size=world_size, seed=seed)
    else:
        from data.stream import TokenStream

        loader = TokenStream(prepared, rank=rank, world_size=world_size, seed=seed)
    return Prefetcher(loader, batch_size, pin_memory=pin_memory)
