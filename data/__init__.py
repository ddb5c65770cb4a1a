"""Corpus sources, the tokenizer, streaming + packing of training windows.

prepared = prepare_data(cfg.data, model_vocab_size=..., model_max_seq_len=...)
stream = TokenStream(prepared, rank=r, world_size=w, seed=seed)
batch = stream.next_batch(B)            # LongTensor (B, seq_len + 1)
val = validation_windows(prepared)      # LongTensor (N, seq_len + 1)
"""

__all__ = ["PreparedData", "TokenStream", "prepare_data", "validation_windows"]


def __getattr__(name: str):
    # Imported on first use: `model` imports data.config and should not pay for torch data
    # tooling, and `python -m data.prepare` must not find data.prepare already imported.
    if name == "TokenStream":
        from data.stream import TokenStream

        return TokenStream
    if name in ("PreparedData", "prepare_data", "validation_windows"):
        import data.prepare as prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
