"""Corpus sources, the tokenizer, token shards and their loader, streaming + packing.

prepared = prepare_data(cfg.data, model_vocab_size=..., model_max_seq_len=..., workers=N)
batches = training_batches(prepared, rank=r, world_size=w, seed=seed, batch_size=B)
batch = batches.next_batch(B)           # LongTensor (B, seq_len + 1), prepared ahead
val = validation_windows(prepared)      # LongTensor (N, seq_len + 1)

ShardLoader (data.loader=shards) and TokenStream (data.loader=stream) are the two loaders.
"""

__all__ = [
    "PreparedData",
    "Prefetcher",
    "ShardLoader",
    "TokenStream",
    "prepare_data",
    "training_batches",
    "validation_windows",
]


def __getattr__(name: str):
    # Imported on first use: `model` imports data.config and should not pay for torch data
    # tooling, and `python -m data.prepare` must not find data.prepare already imported.
    if name == "TokenStream":
        from data.stream import TokenStream

        return TokenStream
    if name in ("Prefetcher", "ShardLoader", "training_batches"):
        import data.loader as loader

        return getattr(loader, name)
    if name in ("PreparedData", "prepare_data", "validation_windows"):
        import data.prepare as prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
