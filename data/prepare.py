"""Prepare a corpus for training: resolve and check the sources, hold out the validation
split, train (or load) the tokenizer, write token shards (data.loader=shards), pack the
fixed validation windows, count statistics.

    python -m data.prepare --config FILE [--workers N] [key=value ...]

The tokenizer learns from a sample of at most data.tokenizer_sample_bytes; with
data.loader=shards the corpus is then read once more, by N worker processes that tokenise
it into shards (data/shards.py), and the statistics come from that pass. With
data.loader=stream a counting pass replaces the shards; ranks tokenise while training.

The result is cached under data.cache_dir by a hash of the corpus (paths, sizes, mtimes)
and the settings, so a second call only reads a small manifest; every file is written under
a temporary name and renamed, and the manifest last, so a reader never sees half a result.
An interrupted preparation keeps its finished shards and goes on from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from core.cli import run_main
from core.config import build_section, help_parser, load_yaml
from core.errors import ConfigError
from core.files import write_atomic
from data.config import DataConfig
from data.corpus import CorpusPass, format_stats, resolve_sources, source_fingerprint
from data.shards import ShardJob, ShardWriter, save_npy, token_dtype, usable_cores
from data.sources import SourceSpec
from data.tokenizer import EOS_TOKEN, load_tokenizer, open_tokenizer, save_tokenizer, train_bpe

MANIFEST_VERSION = 2
"""Bump when the prepared output changes meaning, so old caches are not reused."""


@dataclass(frozen=True)
class PreparedData:
    """Everything a TokenStream needs, plus corpus statistics; picklable."""

    tokenizer_path: Path
    eos_id: int
    eos_token: str
    vocab_size: int
    seq_len: int
    sources: tuple[SourceSpec, ...]
    weights: tuple[float, ...]
    weighted: bool
    """The weights are data.weights (else each source's training bytes)."""
    val_threshold: int
    """Documents whose doc_hash is below this are held out (0: none, the split is by file)."""
    val_path: Path
    stats: dict
    loader: str
    shard_dir: Path | None
    """The token shards (data.loader=shards), else None."""
    shards: tuple[dict, ...]
    """Each shard's record (name, source, counts, checksum), in order."""

    @property
    def tokenizer_dir(self) -> Path:
        """The folder with tokenizer.json and the transformers config files (copy it on export)."""
        return self.tokenizer_path.parent

    def to_record(self, cache: Path, folder: Path) -> dict:
        """The manifest's JSON: paths relative to the cache (the tokenizer) or to the manifest's
        folder (the validation windows, the shards), so a cache can move."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record.update(
            tokenizer_path=str(self.tokenizer_path.resolve().relative_to(cache)),
            sources=[asdict(s) for s in self.sources],
            val_path=str(self.val_path.relative_to(folder)),
            shard_dir=self.shard_dir and str(self.shard_dir.relative_to(folder)),
        )
        return record

    @classmethod
    def from_record(cls, record: dict, cache: Path, folder: Path) -> PreparedData:
        values = {f.name: record[f.name] for f in fields(cls)}
        values.update(
            tokenizer_path=cache / record["tokenizer_path"],
            sources=tuple(SourceSpec(**{**s, "files": tuple(s["files"])}) for s in record["sources"]),
            weights=tuple(record["weights"]),
            val_path=folder / record["val_path"],
            shard_dir=record["shard_dir"] and folder / record["shard_dir"],
            shards=tuple(record["shards"]),
        )
        return cls(**values)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_limits(cfg: DataConfig, model_vocab_size: int | None, model_max_seq_len: int | None) -> None:
    if model_max_seq_len is not None and cfg.seq_len > model_max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.seq_len} is larger than model.max_seq_len={model_max_seq_len}")
    if model_vocab_size is None:
        return
    if not cfg.tokenizer and cfg.vocab_size > model_vocab_size:
        raise ConfigError(f"data.vocab_size: {cfg.vocab_size} is larger than model.vocab_size={model_vocab_size}")
    if cfg.tokenizer:  # loading is cheap: fail before reading the corpus
        size = load_tokenizer(cfg.tokenizer)[0].get_vocab_size(with_added_tokens=True)
        if size > model_vocab_size:
            raise ConfigError(
                f"data.tokenizer: {cfg.tokenizer} has {size} tokens, more than model.vocab_size={model_vocab_size}; "
                "raise model.vocab_size or use a smaller tokenizer"
            )


def _check_vocab(prepared: PreparedData, cfg: DataConfig, model_vocab_size: int | None) -> None:
    if model_vocab_size is not None and prepared.vocab_size > model_vocab_size:
        raise ConfigError(
            f"data.tokenizer: {cfg.tokenizer or prepared.tokenizer_path} has {prepared.vocab_size} tokens, more than "
            f"model.vocab_size={model_vocab_size}; raise model.vocab_size or use a smaller tokenizer"
        )


def _tokenizer_fingerprint(cfg: DataConfig) -> list:
    if not cfg.tokenizer:
        return ["bpe", cfg.vocab_size]
    p = Path(cfg.tokenizer)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return [str(p)] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


CACHE_KEY_EXEMPT = {"cache_dir": "where the result is kept, not what it holds"}
"""DataConfig fields that do not change what data.prepare writes; every other field is in the key."""


def cache_key(cfg: DataConfig, specs: list[SourceSpec]) -> str:
    """The name of a preparation in the cache: the whole data config (a new field changes the key
    unless it is listed in CACHE_KEY_EXEMPT), the corpus files' paths, sizes and mtimes, and the
    given tokenizer's files."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in CACHE_KEY_EXEMPT}
    return _digest([MANIFEST_VERSION, settings, source_fingerprint(specs), _tokenizer_fingerprint(cfg)])


PIECES_PER_WORKER = 8
"""The default spreads the sharding over worker processes only when each gets this many pieces:
with a few, the last round leaves cores idle and one process whose tokenizer runs on every core
is faster (a 20 MB corpus in 2 MiB pieces on 2 cores: docs/benchmarks.md)."""


def default_workers(pieces: int | None = None) -> int:
    """Worker processes for `pieces` pieces of sharding (None: as many as there are cores):
    every core when each gets PIECES_PER_WORKER pieces, else one (the tokenizer on every core)."""
    cores = usable_cores()
    return cores if pieces is None or pieces >= PIECES_PER_WORKER * cores else 1


def prepare_data(
    cfg: DataConfig,
    model_vocab_size: int | None = None,
    model_max_seq_len: int | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> PreparedData:
    """Prepare (or load from the cache) the corpus of `cfg`; see the module docstring.
    `workers`: processes that tokenise shards (default: default_workers for the corpus's size).

    Bad input raises ConfigError with a one-line message. Safe to call from several ranks once
    one process has finished a first call (they then only read the cache).
    """
    _check_limits(cfg, model_vocab_size, model_max_seq_len)
    cache = Path(cfg.cache_dir)
    specs, val_specs = resolve_sources(cfg)
    manifest = cache / "prepared" / f"{cache_key(cfg, specs + val_specs)}.json"
    if manifest.is_file():
        prepared = _load_manifest(manifest)
    else:
        with _held(manifest.with_suffix(".lock")):  # another node may be preparing the same cache
            if manifest.is_file():
                prepared = _load_manifest(manifest)
            else:
                prepared = _build(cfg, specs, val_specs, manifest, progress, workers)
    _check_vocab(prepared, cfg, model_vocab_size)
    return prepared


@contextlib.contextmanager
def _held(lock: Path):
    """An exclusive lock on `lock` (flock: released when its holder exits, whatever way), so
    that launchers on several nodes over one shared cache prepare it once, not over each other."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing this corpus ({lock})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _tokenizer(cfg: DataConfig, sample: list[str], key: str, progress: bool):
    """(tokenizer, eos token, path of the cached tokenizer.json): trained on the sample's
    training texts or loaded."""
    if cfg.tokenizer:
        tok, eos = load_tokenizer(cfg.tokenizer)
    else:
        tok, eos = None, EOS_TOKEN
    folder = Path(cfg.cache_dir) / "tokenizers" / (key if tok is None else _digest(tok.to_str()))
    if (folder / "tokenizer.json").is_file():
        return open_tokenizer(folder / "tokenizer.json"), eos, folder / "tokenizer.json"
    if tok is None:
        tok = train_bpe(sample, cfg.vocab_size, show_progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return tok, eos, save_tokenizer(tok, eos, folder, max_len=cfg.seq_len)


def _build(
    cfg: DataConfig,
    specs: list[SourceSpec],
    val_specs: list[SourceSpec],
    manifest: Path,
    progress: bool,
    workers: int | None,
) -> PreparedData:
    corpus = CorpusPass(specs, val_specs, cfg, progress)
    sample = corpus.sample_and_split(cfg.tokenizer_sample_bytes)
    if corpus.report.replaced:
        warnings.warn(corpus.replaced_message(), stacklevel=2)
    settings = [cfg.text_field, cfg.text_split, corpus.val_threshold, cfg.vocab_size, cfg.tokenizer_sample_bytes]
    tok_key = _digest([MANIFEST_VERSION, source_fingerprint(specs + val_specs), *settings])
    tok, eos, tok_path = _tokenizer(cfg, sample, tok_key, progress)
    del sample
    eos_id, vocab_size = tok.token_to_id(eos), tok.get_vocab_size(with_added_tokens=True)
    shard_dir, shards = None, []
    if cfg.loader == "shards":
        shard_dir = manifest.with_suffix(".shards")
        job = ShardJob(shard_dir, tok_path, eos_id, corpus.val_threshold, token_dtype(vocab_size).name)
        pieces = corpus.useful_workers(cfg.shard_bytes)
        workers = min(workers, pieces) if workers else default_workers(pieces)
        shards = ShardWriter(job, workers, cfg.shard_bytes, cfg.max_tokens, progress).run(
            corpus.specs, corpus.val_specs
        )
        val = corpus.count_shards(shards, shard_dir)
    else:
        val = corpus.count_and_pack(tok, eos_id)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    val_path = manifest.with_suffix(".val.npy")
    save_npy(val_path, val.astype(np.int32))
    prepared = PreparedData(
        tokenizer_path=tok_path,
        eos_id=eos_id,
        eos_token=eos,
        vocab_size=vocab_size,
        seq_len=cfg.seq_len,
        sources=tuple(corpus.specs),
        weights=tuple(corpus.weights()),
        weighted=bool(cfg.weights),
        val_threshold=corpus.val_threshold,
        val_path=val_path,
        stats=corpus.stats(vocab_size, len(val)),
        loader=cfg.loader,
        shard_dir=shard_dir,
        shards=tuple(shards),
    )
    record = prepared.to_record(Path(cfg.cache_dir).resolve(), manifest.parent)
    write_atomic(manifest, json.dumps(record, indent=1).encode())
    return _load_manifest(manifest)


def _load_manifest(manifest: Path) -> PreparedData:
    folder = manifest.parent.resolve()
    return PreparedData.from_record(json.loads(manifest.read_text()), folder.parent, folder)


def validation_windows(prepared: PreparedData) -> torch.Tensor:
    """The fixed validation windows: LongTensor (N, seq_len + 1), N = data.val_windows or fewer
    when the held-out split is small; the same on every rank, world size and evaluation."""
    return torch.from_numpy(np.load(prepared.val_path).astype(np.int64))


def _model_limit(raw: dict, key: str) -> int | None:
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: {model!r} is not a section; expected key: value lines under model:")
    value = model.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"model.{key}: {value!r} is not a valid int")
    return value


def main(argv=None) -> int:
    parser = help_parser(
        "python -m data.prepare",
        "Fetch or check the corpus, train or load the tokenizer, write token shards, print corpus statistics.",
        {"data": DataConfig},
    )
    parser.add_argument("--config", required=True, help="a run YAML (its data and model sections are read)")
    default = f"all cores when each gets {PIECES_PER_WORKER} pieces of data.shard_bytes, else 1 on every core"
    parser.add_argument("--workers", type=int, help=f"processes that tokenise shards (default: {default})")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.vocab_size=2048")
    args = parser.parse_args(argv)
    raw = load_yaml(args.config, args.overrides)
    cfg = build_section(DataConfig, raw.get("data"), "data")
    limits = {
        "model_vocab_size": _model_limit(raw, "vocab_size"),
        "model_max_seq_len": _model_limit(raw, "max_seq_len"),
    }
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: {args.workers} is not a positive number of processes")
    prepared = prepare_data(cfg, **limits, progress=True, workers=args.workers)
    print(format_stats(prepared.stats, prepared.tokenizer_path, prepared.eos_token))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
