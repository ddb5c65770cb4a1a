"""Weights & Biases as a second sink (log.wandb), offline: no network here. The offline run's
transaction log (RUN_DIR/wandb/offline-run-*/run-ID.wandb) is read back with wandb's own
record schema, and must hold every row of metrics.jsonl; a resumed run continues the same
W&B run id."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from tests.train_helpers import check, metric_rows, run_single, tiny_overrides

BLOCK, HEADER = 32768, 7  # the LevelDB log format W&B writes: 32 KiB blocks, 7-byte record headers
FULL, LAST = 1, 4


def wandb_records(path: Path) -> list:
    """Every record of a .wandb file, as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if left < HEADER or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        parts += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def history(run_dir: Path) -> tuple[dict[int, dict], set[str]]:
    """{step: logged values} over every offline run folder of the run, and the run ids seen."""
    rows, ids = {}, set()
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.setdefault(items["_step"], {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows, ids


@pytest.mark.slow
def test_an_offline_wandb_run_holds_every_metrics_row_and_a_resume_continues_it(corpus, tmp_path):
    pytest.importorskip("wandb")
    glob, cache = corpus
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(glob, cache, run_dir, **{"log.wandb": "true", "log.wandb_tags": "test,cpu"})
    check(run_single([*overrides, "train.max_steps=4"], WANDB_MODE="offline"))
    check(run_single([*overrides, "train.max_steps=8"], WANDB_MODE="offline"))
    rows, ids = history(run_dir)
    assert ids == {(run_dir / "wandb_id").read_text().strip()}  # both attempts: one W&B run
    expected = {}
    for row in metric_rows(run_dir):
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step" and v is not None})
    assert sorted(rows) == sorted(expected) == list(range(0, 9))
    for step, values in expected.items():
        assert rows[step].keys() == values.keys(), step
        for key, value in values.items():
            assert math.isclose(rows[step][key], value, rel_tol=1e-12), (step, key)


def test_wandb_without_the_package_is_one_line(monkeypatch, tmp_path, capsys):
    """log.wandb=true where wandb is not installed: one line, exit 2, before anything is written."""
    import importlib.util

    from core.cli import run_main
    from launcher import train
    from tests.train_helpers import ROOT

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), f"train.output_dir={tmp_path / 'run'}", "log.wandb=true"]
    assert run_main(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log.wandb=true: the wandb package is not installed" in err
    assert not (tmp_path / "run").exists()
