"""Corpus sources: which files (or which hub dataset) make up each source, a checking pass
that turns bad input into one-line errors, and the `datasets` streams of document texts.

A source is one glob of `data.files` (or the hub dataset, or the default corpus); a mixture
draws from several sources by weight (see data/stream.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError, first_line
from data.config import DataConfig

EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


@dataclass(frozen=True)
class SourceSpec:
    """One source of documents: local files of one format, or a hub dataset (format 'hub')."""

    name: str
    format: str
    files: tuple[str, ...] = ()
    text_field: str = "text"
    text_split: str = "file"
    hf_subset: str = ""
    hf_split: str = "train"


@dataclass
class ScanReport:
    """What the checking pass found: skipped empty files and replaced non-UTF-8 sequences."""

    empty_files: list[str] = field(default_factory=list)
    replaced: int = 0
    replaced_files: list[str] = field(default_factory=list)


def doc_hash(text: str) -> int:
    """A stable 64-bit hash of a document; the validation split is decided by it."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def held_out(text: str, val_threshold: int) -> bool:
    """The validation split's rule: a document is held out when its doc_hash is below the
    threshold (0: none is; the split is then by file)."""
    return doc_hash(text) < val_threshold


def file_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"data.files: cannot tell the format of {path}; set data.format to text, jsonl or parquet")
    return fmt


def file_sources(cfg: DataConfig) -> list[SourceSpec]:
    """One SourceSpec per glob of data.files; a glob that matches nothing, or files of two formats, is an error."""
    specs = []
    for pattern, hits in zip(cfg.files, cfg.matched_files(), strict=True):
        formats = sorted({file_format(f, cfg.format) for f in hits})
        if len(formats) > 1:
            raise ConfigError(
                f"data.files: {pattern!r} matches files of several formats ({', '.join(formats)}); "
                "use one glob per format"
            )
        specs.append(SourceSpec(pattern, formats[0], tuple(hits), cfg.text_field, cfg.text_split))
    return specs


def hub_source(cfg: DataConfig) -> SourceSpec:
    return SourceSpec(cfg.hf_dataset, "hub", (), cfg.text_field, cfg.text_split, cfg.hf_subset, cfg.hf_split)


def _decode(path: str, raw: bytes, report: ScanReport) -> str:
    """Decode UTF-8; invalid sequences become U+FFFD and are counted, not fatal."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        report.replaced += text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        report.replaced_files.append(path)
        return text


def _check_record(path: str, where: str, record, text_field: str) -> None:
    if not isinstance(record, dict):
        raise ConfigError(
            f"{path}:{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        keys = ", ".join(map(str, record)) or "none"
        raise ConfigError(f"{path}:{where}: no field {text_field!r}; keys found: {keys}; set data.text_field")
    if not isinstance(record[text_field], str):
        kind = type(record[text_field]).__name__
        raise ConfigError(f"{path}:{where}: field {text_field!r} holds a {kind}, expected a string")


def _check_json(path: str, text: str, text_field: str) -> bool:
    """Check every record of a JSON-lines file (or a .json array); True if it has one."""
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        for i, record in enumerate(records):
            _check_record(path, f"record {i}", record, text_field)
        return bool(records)
    found = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}:{lineno}: malformed JSON line ({e.msg}); expected one JSON object per line"
            ) from None
        _check_record(path, str(lineno), record, text_field)
        found = True
    return found


def _check_parquet(path: str, text_field: str) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    schema = meta.schema_arrow
    if text_field not in schema.names:
        raise ConfigError(
            f"{path}: no column {text_field!r}; columns found: {', '.join(schema.names)}; set data.text_field"
        )
    if not (
        pa.types.is_string(schema.field(text_field).type) or pa.types.is_large_string(schema.field(text_field).type)
    ):
        raise ConfigError(f"{path}: column {text_field!r} has type {schema.field(text_field).type}, expected string")
    return meta.metadata.num_rows > 0


def _read_head(path: str, head_bytes: int | None) -> bytes:
    """The file's bytes, or its first `head_bytes` cut after the last whole line."""
    if head_bytes is None:
        return Path(path).read_bytes()
    with open(path, "rb") as f:
        raw = f.read(head_bytes + 1)
    return raw if len(raw) <= head_bytes else raw[: raw.rfind(b"\n", 0, head_bytes) + 1]


def check_files(spec: SourceSpec, report: ScanReport, head_bytes: int | None = None) -> list[str]:
    """Read every file of a local source once (or its first `head_bytes`); returns its non-empty
    files (empty ones are counted in `report`). Malformed JSON and missing text fields raise
    ConfigError."""
    keep = []
    for path in spec.files:
        if spec.format == "parquet":
            ok = _check_parquet(path, spec.text_field)
        else:
            raw = _read_head(path, head_bytes)
            ok = bool(raw.strip())
            if ok:
                text = _decode(path, raw, report)
                ok = bool(text.strip()) if spec.format == "text" else _check_json(path, text, spec.text_field)
        (keep if ok else report.empty_files).append(path)
    return keep


def open_texts(spec: SourceSpec, files: Sequence[str] | None = None):
    """A streaming `datasets.IterableDataset` of the source's records, in `files` order
    (default: the spec's); returns (dataset, name of the text column)."""
    from datasets import load_dataset

    files = list(spec.files if files is None else files)
    if spec.format == "text":
        sample_by = "document" if spec.text_split == "file" else "paragraph"
        ds = load_dataset("text", data_files=files, split="train", streaming=True, sample_by=sample_by,
                          keep_linebreaks=True, encoding_errors="replace")  # fmt: skip
        return ds, "text"
    if spec.format == "jsonl":
        # The json builder applies encoding_errors only when the codec is not spelt "utf-8".
        ds = load_dataset("json", data_files=files, split="train", streaming=True, encoding="utf_8",
                          encoding_errors="replace")  # fmt: skip
        return ds.select_columns([spec.text_field]), spec.text_field
    if spec.format == "parquet":
        ds = load_dataset("parquet", data_files=files, split="train", streaming=True, columns=[spec.text_field])
        return ds, spec.text_field
    ds = _open_hub(spec)
    if ds.column_names is not None and spec.text_field not in ds.column_names:
        found = ", ".join(ds.column_names)
        raise ConfigError(f"data.hf_dataset: {spec.name!r} has no field {spec.text_field!r}; keys found: {found}")
    return ds.select_columns([spec.text_field]), spec.text_field


def _open_hub(spec: SourceSpec):
    from datasets import load_dataset

    try:
        return load_dataset(spec.name, spec.hf_subset or None, split=spec.hf_split, streaming=True)
    except Exception as e:  # no network, unknown name, bad subset or split: one line
        where = f"data.hf_dataset: cannot stream {spec.name!r} (split {spec.hf_split!r})"
        raise ConfigError(f"{where}: {first_line(e)}") from None


def iter_checked_texts(spec: SourceSpec) -> Iterator[str]:
    """iter_texts for a source whose files were checked only in part: a record that cannot be
    read makes a full check find it, so the error names the file and line."""
    # datasets logs the parse error itself before raising it; ours names the file and line instead
    logging.getLogger("datasets.packaged_modules.json.json").disabled = True
    try:
        yield from iter_texts(spec)
    except ConfigError:
        raise
    except Exception:
        if spec.format != "hub":
            check_files(spec, ScanReport())
        raise


def iter_texts(spec: SourceSpec, files: Sequence[str] | None = None) -> Iterator[str]:
    """The source's non-empty document texts, in stream order (hub records are checked here)."""
    ds, column = open_texts(spec, files)
    for record in ds:
        if spec.format == "hub":
            _check_record(spec.name, "record", record, column)
        text = record[column]
        if text:
            yield text
