"""Throughput of the data path: sharding, the shard loader, the stream, and a training step fed by the loader.

    python bench/data_throughput.py [--config configs/tiny.yaml] [--steps 30]

Prints four tables (Markdown) for docs/benchmarks.md:
1. data.prepare of --copies copies of the corpus files with 1, 2 and all cores as workers (a
   fresh cache, the config's tokenizer given, so that the file check, the sample read and the
   sharding pass are timed, not the BPE): tokens/s.
2. The shard loader on one core: windows/s and tokens/s per rank.
3. The streamed path (data.loader=stream) on one core: tokens/s of tokenise + pack.
4. The training step of the config's model fed by the prefetching shard loader, against the
   same step on random tokens already in memory (median over interleaved rounds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data import Prefetcher, ShardLoader, TokenStream, prepare_data  # noqa: E402
from data.prepare import default_workers  # noqa: E402
from run.config import load_run_config  # noqa: E402


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def sharding(cfg, prepared, copies: int) -> str:
    """data.prepare of `copies` copies of the corpus's files into a fresh cache, with 1, 2 and all cores."""
    rows, base = [], None
    with tempfile.TemporaryDirectory() as corpus:
        for i in range(copies):
            for f in (f for s in prepared.sources for f in s.files):
                shutil.copy(f, Path(corpus) / f"{i}_{Path(f).name}")
        for workers in sorted({1, 2, default_workers()}):
            with tempfile.TemporaryDirectory() as tmp:
                fresh = replace(cfg, files=[f"{corpus}/*"], cache_dir=tmp, tokenizer=str(prepared.tokenizer_path))
                start = time.perf_counter()
                done = prepare_data(fresh, workers=workers)
                wall = time.perf_counter() - start
            tokens = done.stats["train_tokens"] + done.stats["val_tokens"]
            base = base or tokens / wall
            rows.append([str(workers), str(len(done.shards)), f"{tokens:,}", f"{wall:.1f}", f"{tokens / wall:,.0f}"])
            rows[-1].append(f"{tokens / wall / base:.2f}x")
    return table(["workers", "shards", "tokens", "wall s", "tokens/s", "vs 1 worker"], rows)


def loader_rate(prepared, batch: int, seconds: float = 3.0) -> str:
    loader = ShardLoader(prepared, seed=0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += loader.next_batch(batch).shape[0]
    wall = time.perf_counter() - start
    tokens = n * (prepared.seq_len + 1)
    row = ["shards", str(batch), f"{n / wall:,.0f}", f"{tokens / wall:,.0f}"]
    return table(["loader", "batch", "windows/s", "tokens/s"], [row])


def stream_rate(prepared, batch: int, n_tokens: int = 2_000_000) -> str:
    stream, done, start = TokenStream(prepared, seed=0), 0, time.perf_counter()
    while done < n_tokens:
        done += stream.next_batch(batch).numel()
    wall = time.perf_counter() - start
    row = ["stream", str(batch), f"{done:,}", f"{done / wall:,.0f}"]
    return table(["loader", "batch", "tokens", "tokens/s"], [row])


def step_times(cfg, prepared, steps: int, rounds: int = 5) -> str:
    """Median step seconds with the prefetching loader vs random tokens in memory."""
    from launcher.precision import resolve_precision
    from model import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = resolve_precision(cfg.train.precision, torch.device("cpu")).name == "bf16"
    B, L = cfg.train.micro_batch_size, cfg.data.seq_len + 1
    fixed = torch.randint(0, prepared.vocab_size, (B, L))
    feeds = {"loader": Prefetcher(ShardLoader(prepared, seed=0), B), "in memory": None}

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {k: [] for k in feeds}
    for _ in range(rounds):
        for name, feed in feeds.items():
            for i in range(steps + 2):
                start = time.perf_counter()
                step(fixed if feed is None else feed.next_batch(B))
                if i >= 2:  # the first steps of a round warm caches
                    times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [[k, f"{med[k] * 1e3:.1f}", f"{med[k] / med['in memory']:.3f}"] for k in feeds]
    return table(["step fed by", "median step ms", "vs in memory"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=30, help="steps per round of the training-step comparison")
    parser.add_argument("--shard-bytes", type=int, default=1 << 20, help="data.shard_bytes for the sharding table")
    parser.add_argument("--copies", type=int, default=4, help="copies of the corpus files the sharding table reads")
    args = parser.parse_args()
    cfg = load_run_config(args.config, [])
    prepared = prepare_data(cfg.data, progress=True)
    torch.set_num_threads(1)
    shards = sharding(replace(cfg.data, shard_bytes=args.shard_bytes), prepared, args.copies)
    print("## sharding (data.prepare, tokenizer given)\n" + shards, flush=True)
    print("\n## shard loader, one core\n" + loader_rate(prepared, cfg.train.micro_batch_size))
    print("\n## streamed path, one core\n" + stream_rate(prepared, cfg.train.micro_batch_size))
    torch.set_num_threads(cfg.train.threads or default_workers())
    print(f"\n## training step ({torch.get_num_threads()} threads)\n" + step_times(cfg, prepared, args.steps))


if __name__ == "__main__":
    main()
