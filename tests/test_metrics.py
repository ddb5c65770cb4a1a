"""metrics.jsonl: the one reader, and what a resume does to a file a crash left behind."""

from __future__ import annotations

import json

import pytest

from core.errors import ConfigError
from run.rundir import RunDir, read_metrics


def write_rows(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.5}], tail='{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.5}]


def test_a_malformed_line_before_the_last_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON row"):
        read_metrics(path)
    path.write_text('{"step": 1}\n2\n{"step": 2}\n')  # JSON, but not a row
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON row"):
        read_metrics(path)


def test_resume_truncation_drops_the_torn_line_and_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 6.0 - s} for s in range(1, 7)] + [{"step": 4, "val_loss": 3.0}]
    write_rows(path, rows, tail='{"step": 7, "loss": 0.')
    RunDir(tmp_path).truncate_metrics(after_step=4)
    assert read_metrics(path) == [r for r in rows if r["step"] <= 4]
    assert path.read_text().endswith("\n") and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_steady_throughput_leaves_out_the_start_up_row():
    """One rule for every reader of tokens/s: the median of the training rows after the first
    (compilation, autotuning); evaluation rows do not count."""
    from run.rundir import steady

    rows = [{"step": 1, "tokens_per_sec": 1.0}, {"step": 2, "tokens_per_sec": 40.0}, {"step": 2, "val_loss": 3.0}]
    rows += [{"step": 3, "tokens_per_sec": 10.0}, {"step": 4, "tokens_per_sec": 20.0}]
    assert steady(rows) == 20.0
    assert steady(rows[:1]) == 1.0 and steady([]) is None
    assert steady(rows + [{"step": 5, "tokens_per_sec": 30.0}]) == 25.0


def test_write_atomic_leaves_no_temporary_file_when_the_rename_fails(tmp_path):
    from core.files import write_atomic

    (tmp_path / "taken").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "taken", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    write_atomic(tmp_path / "new", "text")
    assert (tmp_path / "new").read_text() == "text" and sorted(p.name for p in tmp_path.iterdir()) == ["new", "taken"]


def test_rundir_get_prints_nothing_when_one_answer_is_missing(tmp_path, capsys):
    from core.cli import run_main
    from run import rundir

    assert run_main(rundir.main, [str(tmp_path / "run"), "--get", "export", "latest"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no checkpoint yet" in err and err.count("\n") == 1
    assert run_main(rundir.main, [str(tmp_path / "run"), "--get", "export", "latest-step", "stop"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "run" / "hf"), "0", str(tmp_path / "run" / "stop")]
