"""Tokens per second of the training data path (stream + tokenise + pack) on one CPU core.

    python bench/data_throughput.py [--config configs/tiny.yaml] [--tokens 4000000]

Prepares the config's corpus (the default corpus for tiny.yaml; cached after the first run),
then times a fresh TokenStream from its start (dataset open, tokenisation, packing, epoch
changes included) and compares it with what training on the config consumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# One core: the Rust tokenizer and torch must not spread over more threads.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data import TokenStream, prepare_data  # noqa: E402
from data.config import DataConfig, build_section, load_yaml  # noqa: E402


def measure(prepared, n_tokens: int, batch_size: int) -> tuple[int, float, float]:
    """(tokens produced, wall seconds, CPU seconds) for a fresh stream to yield at least n_tokens;
    CPU time is what the figure would be on an idle core of a busy shared machine."""
    start, cpu = time.perf_counter(), time.process_time()
    stream = TokenStream(prepared, rank=0, world_size=1, seed=0)
    done = 0
    while done < n_tokens:
        done += stream.next_batch(batch_size).numel()
    return done, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="tokens to produce (the default > 1 epoch)")
    parser.add_argument("--train-steps-per-sec", type=float, default=6.0, help="training speed to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    raw = load_yaml(args.config)
    cfg = build_section(DataConfig, raw.get("data"), "data")
    train = raw.get("train") or {}
    prepared = prepare_data(cfg, progress=True)
    batch = int(train.get("micro_batch_size", 8))
    consumed = batch * int(train.get("grad_accum", 1)) * cfg.seq_len * args.train_steps_per_sec
    tokens, wall, cpu = measure(prepared, args.tokens, batch)
    print("| corpus | tokens | wall s | CPU s | tokens/s (wall) | tokens/s (CPU) | training needs | ratio (wall) |")
    print("|---|---|---|---|---|---|---|---|")
    cells = [prepared.sources[0].name, f"{tokens:,}", f"{wall:.1f}", f"{cpu:.1f}", f"{tokens / wall:,.0f}"]
    cells += [f"{tokens / cpu:,.0f}", f"{consumed:,.0f}", f"{tokens / wall / consumed:.1f}x"]
    print("| " + " | ".join(cells) + " |")
    verdict = "met" if tokens / wall >= 10 * consumed else "NOT met"
    print(f"target: >= 10x what training consumes ({10 * consumed:,.0f} tokens/s, wall): {verdict}")


if __name__ == "__main__":
    main()
