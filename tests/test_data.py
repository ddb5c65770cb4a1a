"""The data pipeline: packing, rank split, exact resume, epochs, mixtures, sources, tokenizer.

Corpora are tiny and written per module; references are computed independently: documents
are read back from the files with plain Python and encoded one by one with the saved tokenizer.
"""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from fixtures.data_corpora import (
    data_cfg,
    epoch_docs,
    make_docs,
    one_document_files,
    split_eos,
    write_jsonl,
    write_text,
)
from tokenizers import Tokenizer

from data import TokenStream, prepare_data, validation_windows


def encode_docs(prepared, docs: list[str]) -> set[tuple[int, ...]]:
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    return {tuple(tok.encode(d).ids + [prepared.eos_id]) for d in docs}


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """Twenty text files, one document each: (documents, prepared data, config)."""
    docs, cfg = one_document_files(tmp_path_factory.mktemp("text"), 20, seed=1)
    return docs, prepare_data(cfg, model_vocab_size=512, model_max_seq_len=64), cfg


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    """Three jsonl files: with 2 ranks, datasets interleaves records (3 shards do not split evenly)."""
    tmp = tmp_path_factory.mktemp("jsonl")
    docs = make_docs(21, "rec", seed=2)
    for i in range(3):
        write_jsonl(tmp / "corpus" / f"part{i}.jsonl", docs[i * 7 : (i + 1) * 7])
    cfg = data_cfg(tmp, str(tmp / "corpus" / "*.jsonl"))
    return docs, prepare_data(cfg, model_vocab_size=512), cfg


def take(stream, n_batches: int, batch_size: int = 3) -> torch.Tensor:
    return torch.cat([stream.next_batch(batch_size) for _ in range(n_batches)])


def test_batches_pack_every_training_document_once_in_order(text_corpus):
    docs, prepared, _ = text_corpus
    stream = TokenStream(prepared, rank=0, world_size=1, seed=3)
    batch = stream.next_batch(5)
    assert batch.dtype == torch.long and batch.shape == (5, prepared.seq_len + 1)
    n_tokens = prepared.stats["train_tokens"] + prepared.stats["train_documents"]  # + one EOS each
    n_batches = n_tokens // (5 * (prepared.seq_len + 1))
    flat = torch.cat([batch] + [stream.next_batch(5) for _ in range(n_batches)]).flatten().tolist()
    segments = split_eos(flat, prepared.eos_id)[: prepared.stats["train_documents"]]
    # Each segment is one whole document, tokens in order, EOS-separated; none repeats in the epoch.
    assert len(set(segments)) == len(segments) == prepared.stats["train_documents"]
    assert set(segments) <= encode_docs(prepared, docs)
    assert flat[: len(segments[0])] == list(segments[0])


def test_validation_holds_out_whole_documents(text_corpus):
    docs, prepared, _ = text_corpus
    stats = prepared.stats
    assert stats["val_documents"] == round(0.2 * len(docs)) and stats["train_documents"] == len(docs) - 4
    train = set(epoch_docs(TokenStream(prepared, 0, 1, seed=0)))
    held_out = encode_docs(prepared, docs) - train
    assert len(held_out) == stats["val_documents"]
    val = validation_windows(prepared)
    assert val.shape == (prepared.stats["val_windows"], 17) and val.dtype == torch.long
    flat = val.flatten().tolist()  # the windows start with a held-out document
    assert any(list(d[: len(flat)]) == flat[: len(d)] for d in held_out)
    assert torch.equal(val, validation_windows(prepare_data(text_corpus[2])))


@pytest.mark.parametrize("corpus", ["text_corpus", "jsonl_corpus"])
def test_rank_split_is_disjoint_and_complete(corpus, request):
    _, prepared, _ = request.getfixturevalue(corpus)
    whole = epoch_docs(TokenStream(prepared, 0, 1, seed=5))
    parts = [epoch_docs(TokenStream(prepared, r, 2, seed=5)) for r in range(2)]
    assert all(parts) and not set(parts[0]) & set(parts[1])
    assert Counter(parts[0] + parts[1]) == Counter(whole)


@pytest.mark.parametrize("corpus", ["text_corpus", "jsonl_corpus"])
@pytest.mark.parametrize("rank,world,k", [(0, 1, 7), (1, 2, 5), (0, 1, 45)])
def test_exact_resume(corpus, rank, world, k, request):
    _, prepared, _ = request.getfixturevalue(corpus)
    m = 40  # k = 45: the state is taken in the second epoch; k small: the next m batches cross into it
    uninterrupted = take(TokenStream(prepared, rank, world, seed=11), k + m)
    stream = TokenStream(prepared, rank, world, seed=11)
    take(stream, k)
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    resumed = TokenStream(prepared, rank, world, seed=11)
    resumed.load_state_dict(state)
    assert torch.equal(take(resumed, m), uninterrupted[3 * k :])
    assert torch.equal(take(stream, m), uninterrupted[3 * k :])
    assert resumed.sources[0].epoch >= 1 and len(state["leftover"]) > 0  # crossed an epoch, resumed mid-document


def test_resume_rejects_another_world_size(text_corpus):
    _, prepared, _ = text_corpus
    state = TokenStream(prepared, 0, 1, seed=1).state_dict()
    with pytest.raises(ValueError, match="world size"):
        TokenStream(prepared, 0, 2, seed=1).load_state_dict(state)


def test_epochs_repeat_every_document_in_a_new_order(text_corpus):
    _, prepared, _ = text_corpus
    stream = TokenStream(prepared, 0, 1, seed=2)
    source, epochs = stream.sources[0], {}
    while source.epoch < 3:
        ids = source.next_doc()
        epochs.setdefault(source.epoch, []).append(tuple(ids))
    assert set(epochs[0]) == set(epochs[1]) == set(epochs[2]) and len(epochs[0]) == len(set(epochs[0]))
    assert len({tuple(epochs[e]) for e in range(3)}) == 3  # the file order is reseeded per epoch


def test_weighted_mixture_of_text_and_jsonl(tmp_path):
    write_text(tmp_path / "a", make_docs(12, "alpha", seed=3))
    write_jsonl(tmp_path / "b" / "b.jsonl", make_docs(12, "beta", seed=4))
    cfg = data_cfg(tmp_path, [str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.jsonl")], weights=[3, 1])
    prepared = prepare_data(cfg)
    stream = TokenStream(prepared, 0, 1, seed=0)
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    segments = split_eos(take(stream, 120).flatten().tolist(), prepared.eos_id)
    by_source = Counter()
    for seg in segments:
        by_source[tok.decode(list(seg[:-1]))[:4]] += len(seg)
    share = by_source["alph"] / (by_source["alph"] + by_source["beta"])
    assert abs(share - 0.75) < 0.05, by_source
    state = stream.state_dict()
    expected = take(stream, 10)
    resumed = TokenStream(prepared, 0, 1, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(take(resumed, 10), expected)


def test_blank_line_documents_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = make_docs(10, "para", seed=5)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "book.txt").write_text("\n".join(paras), encoding="utf-8")  # each ends in \n: blank lines
    prepared = prepare_data(data_cfg(tmp_path, str(tmp_path / "t" / "*.txt"), text_split="blank_lines"))
    assert prepared.stats["train_documents"] + prepared.stats["val_documents"] == 10
    table = pa.table({"body": make_docs(10, "row", seed=6), "n": list(range(10))})
    pq.write_table(table, tmp_path / "rows.parquet")
    prepared = prepare_data(data_cfg(tmp_path, str(tmp_path / "rows.parquet"), text_field="body"))
    train = set(epoch_docs(TokenStream(prepared, 0, 1, seed=0)))
    assert len(train) == 8 and train <= encode_docs(prepared, table.column("body").to_pylist())


def test_hub_code_path_with_a_local_dataset_folder(tmp_path):
    docs = make_docs(10, "hub", seed=7)
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs)
    cfg = data_cfg(tmp_path, [], hf_dataset=str(tmp_path / "ds"), hf_split="train")
    prepared = prepare_data(cfg)
    assert prepared.sources[0].format == "hub" and prepared.stats["train_documents"] == 8
    assert set(epoch_docs(TokenStream(prepared, 0, 1, seed=0))) <= encode_docs(prepared, docs)


def test_tokenizer_round_trips_non_ascii_through_transformers(text_corpus):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, prepared, _ = text_corpus
    text = "Ünïcødé café — 日本語 🙂 straße\n\n  spaces  and\ttabs"
    for tok in (
        AutoTokenizer.from_pretrained(str(prepared.tokenizer_dir)),
        PreTrainedTokenizerFast(tokenizer_file=str(prepared.tokenizer_path), eos_token=prepared.eos_token),
    ):
        assert tok.decode(tok.encode(text)) == text
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == prepared.eos_id
        assert len(tok) == prepared.vocab_size <= 300


@pytest.mark.parametrize("which", ["folder", "file"])
def test_load_existing_tokenizer(text_corpus, tmp_path, which):
    docs, trained, _ = text_corpus
    write_text(tmp_path / "c", docs[:6])
    path = trained.tokenizer_dir if which == "folder" else trained.tokenizer_path
    prepared = prepare_data(data_cfg(tmp_path, str(tmp_path / "c" / "*.txt"), tokenizer=str(path)))
    assert (prepared.eos_id, prepared.vocab_size) == (trained.eos_id, trained.vocab_size)
    assert np.array_equal(Tokenizer.from_file(str(prepared.tokenizer_path)).encode(docs[0]).ids,
                          Tokenizer.from_file(str(trained.tokenizer_path)).encode(docs[0]).ids)  # fmt: skip


def test_prepare_is_idempotent_and_cached(text_corpus):
    _, prepared, _ = text_corpus
    before = {p: p.stat().st_mtime_ns for p in prepared.tokenizer_dir.iterdir()}
    again = prepare_data(text_corpus[2])
    assert again == prepared
    assert {p: p.stat().st_mtime_ns for p in prepared.tokenizer_dir.iterdir()} == before


def test_default_corpus_holds_out_whole_plays(project_root):
    from pathlib import Path

    from data.default_corpus import fetch_default_corpus, play_key, split_plays

    texts = fetch_default_corpus(Path(project_root) / ".cache")
    train, val = split_plays(texts, 0.05)
    # the pinned archive: 42 plays, 35 of them also in a Folio edition (*_gut_f.txt)
    assert len(train) + len(val) == 77 and 0.05 <= len(val) / 77 < 0.15
    assert not {play_key(f) for f in train} & {play_key(f) for f in val}
    assert len({play_key(f) for f in train + val}) == 42  # each play once, editions unified
