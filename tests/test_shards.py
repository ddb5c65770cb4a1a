"""Token shards and their loader: what data.prepare writes, resuming it, and the global order.

References are independent of the shard code: documents are read back from the corpus files
with plain Python, split by doc_hash and encoded one by one with the saved tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from fixtures.data_corpora import data_cfg, make_docs, one_document_files, write_jsonl, write_text
from tokenizers import Tokenizer

import data.shards
from data import Prefetcher, ShardLoader, TokenStream, prepare_data, validation_windows
from data.loader import contributions
from data.shards import token_dtype
from data.sources import doc_hash

SHARD_BYTES = 1500  # a few documents per shard, so the tiny corpora make several shards


def shard_cfg(tmp, files, **kw):
    return data_cfg(tmp, files, **{"shard_bytes": SHARD_BYTES, **kw})


@pytest.fixture(scope="module")
def shard_corpus(tmp_path_factory):
    """Forty one-document text files: (documents in file order, prepared data, config)."""
    docs, cfg = one_document_files(tmp_path_factory.mktemp("shards"), 40, seed=21, shard_bytes=SHARD_BYTES)
    return docs, prepare_data(cfg, workers=1), cfg


def reference_ids(prepared, docs: list[str], held_out: bool) -> list[int]:
    """Token ids (+ EOS per document) of the training or held-out documents, in corpus order."""
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    keep = [d for d in docs if (doc_hash(d) < prepared.val_threshold) == held_out]
    return [t for d in keep for t in tok.encode(d).ids + [prepared.eos_id]]


def shard_arrays(prepared, suffix: str) -> list[np.ndarray]:
    return [np.load(prepared.shard_dir / f"{s['name']}.{suffix}.npy") for s in prepared.shards]


def test_shards_hold_every_training_document_once_in_order(shard_corpus):
    docs, prepared, _ = shard_corpus
    tokens = shard_arrays(prepared, "tokens")
    assert len(tokens) >= 4 and all(t.dtype == np.uint16 for t in tokens)
    assert np.concatenate(tokens).tolist() == reference_ids(prepared, docs, held_out=False)
    assert np.concatenate(shard_arrays(prepared, "val")).tolist() == reference_ids(prepared, docs, held_out=True)
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    for t, ends, record in zip(tokens, shard_arrays(prepared, "docs"), prepared.shards, strict=True):
        assert ends[-1] == len(t) and all(t[e - 1] == prepared.eos_id for e in ends)  # the document index
        first = tok.decode(t[: ends[0] - 1].tolist())
        assert first in docs
        path = prepared.shard_dir / f"{record['name']}.tokens.npy"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    s = prepared.stats
    assert s["train_documents"] + s["val_documents"] == 40 and s["shards"] == len(tokens)
    assert s["train_tokens"] + s["train_documents"] == sum(map(len, tokens))


def test_stream_and_shards_prepare_the_same_split_and_statistics(shard_corpus, tmp_path):
    _, prepared, cfg = shard_corpus
    streamed = prepare_data(cfg.__class__(**{**vars(cfg), "loader": "stream", "cache_dir": str(tmp_path / "fresh")}))
    assert streamed.shards == () and streamed.val_threshold == prepared.val_threshold
    assert {k: v for k, v in prepared.stats.items() if k != "shards"} == streamed.stats
    assert torch.equal(validation_windows(prepared), validation_windows(streamed))


def test_workers_do_not_change_the_shards(shard_corpus, tmp_path):
    docs, prepared, cfg = shard_corpus
    given = dict(tokenizer=str(prepared.tokenizer_path), cache_dir=str(tmp_path / "c2"))
    two = prepare_data(cfg.__class__(**{**vars(cfg), **given}), workers=2)
    assert [s["sha256"] for s in two.shards] == [s["sha256"] for s in prepared.shards]
    assert torch.equal(validation_windows(two), validation_windows(prepared))


def test_workers_share_the_cores_with_the_tokenizer_threads(shard_corpus):
    """Each worker's tokenizer runs cores // workers threads (its pool is as wide as the machine
    otherwise, and N such workers fight over the cores); the setting bounds the pool for real."""
    from data.shards import _Pool, tokenizer_threads, usable_cores

    _, prepared, _ = shard_corpus
    pool = _Pool(2, prepared.tokenizer_path)
    try:
        assert pool.pool.apply(os.getenv, ("RAYON_NUM_THREADS",)) == str(max(1, usable_cores() // 2))
    finally:
        pool.close()
    assert tokenizer_threads(1) == usable_cores() and tokenizer_threads(usable_cores() + 1) == 1
    count = (
        "import os, sys; from data.tokenizer import open_tokenizer; "
        "open_tokenizer(sys.argv[1]).encode_batch(['to be or not to be'] * 2000); "
        "print(len(os.listdir('/proc/self/task')))"
    )
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    out = subprocess.run([sys.executable, "-c", count, str(prepared.tokenizer_path)], env=env, capture_output=True)
    assert out.stdout.decode().strip() == "2", out  # the main thread and one tokenizer thread


def test_the_default_spreads_only_enough_pieces_over_workers(shard_corpus, tmp_path, monkeypatch):
    """All cores when each gets PIECES_PER_WORKER pieces, else one process whose tokenizer runs
    on every core while it shards (TOKENIZERS_PARALLELISM=false, as training ranks have it, is
    lifted for that pass only and put back)."""
    from data.prepare import PIECES_PER_WORKER, default_workers
    from data.shards import usable_cores

    cores = usable_cores()
    assert default_workers() == cores == default_workers(PIECES_PER_WORKER * cores)
    assert default_workers(PIECES_PER_WORKER * cores - 1) == (1 if cores > 1 else cores)
    docs, prepared, cfg = shard_corpus
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    seen, real = [], data.shards.tokenize_piece  # a spy in this process: it sees only the inline path
    monkeypatch.setattr(
        data.shards, "tokenize_piece", lambda job, piece: seen.append(os.environ[PARALLEL]) or real(job, piece)
    )
    given = dict(tokenizer=str(prepared.tokenizer_path), cache_dir=str(tmp_path / "c3"))
    again = prepare_data(cfg.__class__(**{**vars(cfg), **given}))  # 40 small files: fewer than 8 pieces per core
    assert [s["sha256"] for s in again.shards] == [s["sha256"] for s in prepared.shards]
    assert set(seen) == {"true"} and len(seen) == len(prepared.shards) and os.environ[PARALLEL] == "false"


PARALLEL = "TOKENIZERS_PARALLELISM"


def test_an_interrupted_preparation_keeps_its_finished_shards(shard_corpus, tmp_path):
    _, prepared, cfg = shard_corpus
    cfg = cfg.__class__(**{**vars(cfg), "tokenizer": str(prepared.tokenizer_path), "cache_dir": str(tmp_path)})
    first = prepare_data(cfg, workers=1)
    folder, names = first.shard_dir, [s["name"] for s in first.shards]
    manifest = next(folder.parent.glob("*.json"))
    # As if killed: no manifest, the last shard unfinished (no record), one token file truncated.
    manifest.unlink()
    (folder / f"{names[-1]}.json").unlink()
    truncated = folder / f"{names[1]}.tokens.npy"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    before = {n: (folder / f"{n}.tokens.npy").stat().st_mtime_ns for n in names}
    again = prepare_data(cfg, workers=1)
    after = {n: (folder / f"{n}.tokens.npy").stat().st_mtime_ns for n in names}
    redone = {n for n in names if before[n] != after[n]}
    assert redone == {names[1], names[-1]}
    assert again.shards == first.shards and again.stats == first.stats


def test_max_tokens_caps_each_source_at_whole_shards(tmp_path):
    write_text(tmp_path / "a", make_docs(30, "a", seed=22))
    write_jsonl(tmp_path / "b" / "b.jsonl", make_docs(30, "b", seed=23))
    files = [str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.jsonl")]
    whole = prepare_data(shard_cfg(tmp_path, files), workers=1)
    cap = 600
    capped = prepare_data(shard_cfg(tmp_path, files, max_tokens=cap), workers=1)
    for k in (0, 1):
        mine = [s["train_tokens"] for s in capped.shards if s["source"] == k]
        assert sum(mine) >= cap > sum(mine[:-1])  # stops after the shard that reaches the cap
        assert len(mine) < sum(1 for s in whole.shards if s["source"] == k)


def test_hub_dataset_is_sharded(tmp_path):
    docs = make_docs(12, "hub", seed=24)
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs)
    prepared = prepare_data(shard_cfg(tmp_path, [], hf_dataset=str(tmp_path / "ds")), workers=2)
    assert prepared.sources[0].format == "hub" and len(prepared.shards) >= 2
    tokens = np.concatenate(shard_arrays(prepared, "tokens")).tolist()
    assert tokens == reference_ids(prepared, docs, held_out=False)


def test_token_dtype_widens_past_uint16():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ---- the loader ---------------------------------------------------------------------------


def all_windows(prepared) -> list[tuple[int, ...]]:
    """Every training window: the shards' tokens in order, cut every seq_len + 1 tokens."""
    L = prepared.seq_len + 1
    flat = np.concatenate(shard_arrays(prepared, "tokens")).astype(np.int64)
    return [tuple(w) for w in flat[: len(flat) // L * L].reshape(-1, L).tolist()]


def take(loader, n: int, B: int) -> torch.Tensor:
    return torch.cat([loader.next_batch(B) for _ in range(n)])


def test_an_epoch_visits_every_window_once_in_a_new_order(shard_corpus):
    _, prepared, _ = shard_corpus
    windows = all_windows(prepared)
    loader = ShardLoader(prepared, seed=5)
    epochs = [[tuple(w) for w in take(loader, len(windows), 1).tolist()] for _ in range(2)]
    assert Counter(epochs[0]) == Counter(epochs[1]) == Counter(windows)
    assert epochs[0] != windows and epochs[1] != windows and epochs[0] != epochs[1]
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_their_slices_of_the_same_global_batches(shard_corpus, world):
    _, prepared, _ = shard_corpus
    B, steps = 2, 9
    single = take(ShardLoader(prepared, seed=7), steps, B * world)
    ranks = [ShardLoader(prepared, rank=r, world_size=world, seed=7) for r in range(world)]
    per_step = [torch.cat([r.next_batch(B) for r in ranks]) for _ in range(steps)]
    assert torch.equal(torch.cat(per_step), single)


def test_resume_on_another_world_size_continues_the_global_order(shard_corpus):
    _, prepared, _ = shard_corpus
    B = 2
    uninterrupted = take(ShardLoader(prepared, seed=9), 40, B)  # 40 windows in one global order
    two = [ShardLoader(prepared, rank=r, world_size=2, seed=9) for r in range(2)]
    for _ in range(7):  # 7 global batches of 2 x 2 = 28 windows
        [r.next_batch(B) for r in two]
    state = pickle.loads(pickle.dumps(two[0].state_dict()))
    assert state == two[1].state_dict()  # the same on every rank
    three = [ShardLoader(prepared, rank=r, world_size=3, seed=9) for r in range(3)]
    for r in three:
        r.load_state_dict(state)
    resumed = torch.cat([torch.cat([r.next_batch(B) for r in three]) for _ in range(2)])
    assert torch.equal(resumed, uninterrupted[28:40])


def test_resume_refuses_another_seed(shard_corpus):
    _, prepared, _ = shard_corpus
    with pytest.raises(ValueError, match="train.seed"):
        ShardLoader(prepared, seed=2).load_state_dict(ShardLoader(prepared, seed=1).state_dict())


def test_contributions_follow_the_weights():
    assert contributions([5, 9], None) == [5, 9]
    assert contributions([10, 10], [3, 1]) == [15, 5]
    assert contributions([7, 3], [1, 1]) == [5, 5]
    assert sum(contributions([4, 5, 6], [1, 1, 1])) == 15


def test_weighted_sources_share_each_epoch(tmp_path):
    write_text(tmp_path / "a", make_docs(30, "alpha", seed=25))
    write_jsonl(tmp_path / "b" / "b.jsonl", make_docs(30, "beta", seed=26))
    files = [str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.jsonl")]
    prepared = prepare_data(shard_cfg(tmp_path, files, weights=[3, 1]), workers=1)
    loader = ShardLoader(prepared, seed=0)
    own = [loader.sources[k].count for k in (0, 1)]
    assert loader.per_epoch == contributions(own, [3, 1]) and loader.epoch_size == sum(own)
    alpha = {tuple(w) for w in all_windows_of(prepared, 0)}
    epoch = [tuple(w) for w in take(loader, loader.epoch_size, 1).tolist()]
    assert sum(w in alpha for w in epoch) == loader.per_epoch[0]


def all_windows_of(prepared, source: int) -> list[list[int]]:
    L = prepared.seq_len + 1
    arrays = [np.load(prepared.shard_dir / f"{s['name']}.tokens.npy") for s in prepared.shards if s["source"] == source]
    flat = np.concatenate(arrays).astype(np.int64)
    return flat[: len(flat) // L * L].reshape(-1, L).tolist()


# ---- prepared ahead -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shards", "stream"])
def test_prefetcher_hands_out_the_same_batches_and_the_consumed_state(shard_corpus, kind):
    _, prepared, _ = shard_corpus
    make = (lambda: ShardLoader(prepared, seed=3)) if kind == "shards" else (lambda: TokenStream(prepared, seed=3))
    bare = make()
    expected = take(bare, 12, 2)
    ahead = Prefetcher(make(), batch_size=2, depth=3)
    assert torch.equal(take(ahead, 5, 2), expected[:10])
    reference = make()
    take(reference, 5, 2)
    assert ahead.state_dict() == reference.state_dict()  # not the state of the batches made ahead
    resumed = Prefetcher(make(), batch_size=2)
    resumed.load_state_dict(ahead.state_dict())
    assert torch.equal(take(resumed, 7, 2), expected[10:])
    ahead.close()
    resumed.close()


def test_prefetcher_raises_the_loaders_error_in_the_consumer():
    class Broken:
        elastic = False

        def next_batch(self, B):
            raise ValueError("shard s01_00003 is unreadable")

        def state_dict(self):
            return {}

    with pytest.raises(ValueError, match="unreadable"):
        Prefetcher(Broken(), batch_size=1).next_batch(1)


def test_cli_workers_and_bad_workers(shard_corpus, tmp_path):
    _, _, cfg = shard_corpus
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": {**vars(cfg), "cache_dir": str(tmp_path / "c")}}))
    run = [sys.executable, "-m", "data.prepare", "--config", str(config)]
    bad = subprocess.run(run + ["--workers", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --workers: 0 is not a positive number of processes"
    ]
    good = subprocess.run(run + ["--workers", "2"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "shards" in good.stdout and not list((tmp_path / "c").rglob("*.tmp*"))


# ---- corpora larger than the tokenizer sample ------------------------------------------------


def test_a_corpus_larger_than_the_sample_splits_by_hash_range(tmp_path):
    docs = make_docs(60, "big", seed=27)
    write_jsonl(tmp_path / "c" / "a.jsonl", docs)
    cfg = shard_cfg(tmp_path, str(tmp_path / "c" / "*.jsonl"), tokenizer_sample_bytes=2000)
    prepared = prepare_data(cfg, workers=1)
    assert prepared.val_threshold == int(0.2 * 2**64)  # no pass over the corpus before the shards
    tokens = np.concatenate(shard_arrays(prepared, "tokens")).tolist()
    assert tokens == reference_ids(prepared, docs, held_out=False)
    assert 0 < prepared.stats["val_documents"] < 60


def test_a_bad_record_past_the_checked_head_is_named(tmp_path, monkeypatch):
    import data.corpus

    monkeypatch.setattr(data.corpus, "CHECK_HEAD_BYTES", 400)
    path = write_jsonl(tmp_path / "c" / "a.jsonl", make_docs(30, "rec", seed=28))
    with open(path, "a") as f:
        f.write('{"text": "cut off\n')
    lines = len(path.read_text().splitlines())
    cfg = shard_cfg(tmp_path, str(path), tokenizer_sample_bytes=1000)
    with pytest.raises(ValueError, match=f"{path}:{lines}: malformed JSON line"):
        prepare_data(cfg, workers=1)


# A changed value for each DataConfig field in the cache key. A new field fails the first test
# below until someone decides: it changes the output (a value here) or it does not
# (data.prepare.CACHE_KEY_EXEMPT).
CHANGED = {
    "files": "other/*.txt",
    "format": "text",
    "text_field": "body",
    "text_split": "blank_lines",
    "weights": [2.0],
    "hf_dataset": "someone/corpus",
    "hf_subset": "en",
    "hf_split": "validation",
    "tokenizer": "tok.json",
    "vocab_size": 301,
    "seq_len": 15,
    "val_fraction": 0.25,
    "val_windows": 5,
    "loader": "stream",
    "shard_bytes": SHARD_BYTES * 2,
    "max_tokens": 1000,
    "tokenizer_sample_bytes": 10_000,
}


def test_every_data_field_is_in_the_cache_key_or_exempt(tmp_path):
    from dataclasses import fields, replace

    from data.config import DataConfig
    from data.prepare import CACHE_KEY_EXEMPT, cache_key

    names = {f.name for f in fields(DataConfig)}
    undecided = names - CHANGED.keys() - CACHE_KEY_EXEMPT.keys()
    assert not undecided, f"decide whether {undecided} change what data.prepare writes"
    cfg = data_cfg(tmp_path, "corpus/*.txt")
    base = cache_key(cfg, [])
    for name, value in CHANGED.items():
        assert cache_key(replace(cfg, **{name: value}), []) != base, name
    for name in CACHE_KEY_EXEMPT:
        assert cache_key(replace(cfg, **{name: "elsewhere"}), []) == base, name


@pytest.mark.parametrize(
    "field", ["shard_bytes", "max_tokens", "seq_len", "val_windows", "val_fraction", "vocab_size", "loader"]
)
def test_a_changed_setting_prepares_again_instead_of_reusing_the_cache(shard_corpus, field):
    """The same corpus into the same cache with one setting changed: a second preparation,
    not the first one's files."""
    from dataclasses import replace

    _, first, cfg = shard_corpus
    second = prepare_data(replace(cfg, **{field: CHANGED[field]}), workers=1)
    assert second.val_path != first.val_path and second.val_path.is_file() and first.val_path.is_file()
    if field == "shard_bytes":
        assert len(second.shards) < len(first.shards)
    if field in ("seq_len", "val_windows"):
        assert validation_windows(second).shape != validation_windows(first).shape
