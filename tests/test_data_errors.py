"""Bad input to the data pipeline: one-line errors naming the input, exit code 2, no traceback;
non-UTF-8 bytes and empty files are counted, not fatal."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import yaml
from fixtures.data_corpora import data_cfg, make_docs, split_eos, write_jsonl, write_text
from tokenizers import Tokenizer

from core.cli import run_main
from data import TokenStream, prepare_data, validation_windows
from data.prepare import main
from data.sources import held_out


def run_cli(tmp_path, capsys, data: dict, model: dict | None = None) -> tuple[int, str, str]:
    """Run `python -m data.prepare` in-process on a config; returns (exit code, stdout, stderr)."""
    data = {"cache_dir": str(tmp_path / "cache"), "vocab_size": 300, "seq_len": 16, "val_windows": 2, **data}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": model or {"vocab_size": 512, "max_seq_len": 64}, "data": data}))
    code = run_main(main, ["--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def test_glob_that_matches_nothing(tmp_path, capsys):
    code, _, err = run_cli(tmp_path, capsys, {"files": str(tmp_path / "nope" / "*.txt")})
    assert_one_line_error(code, err, "data.files", "nope/*.txt", "matches no file")


def test_every_file_empty(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("")
    (tmp_path / "c" / "b.txt").write_text("  \n\n")
    code, _, err = run_cli(tmp_path, capsys, {"files": str(tmp_path / "c" / "*.txt")})
    assert_one_line_error(code, err, "all 2 matched files are empty")


def test_malformed_json_line_names_file_and_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c" / "a.jsonl", make_docs(4, "x", seed=0))
    path.write_text(path.read_text() + '{"text": "unterminated\n')
    code, _, err = run_cli(tmp_path, capsys, {"files": str(path)})
    assert_one_line_error(code, err, f"{path}:5:", "malformed JSON")


def test_missing_text_field_names_field_and_keys(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c" / "a.jsonl", make_docs(4, "x", seed=0), field="body")
    code, _, err = run_cli(tmp_path, capsys, {"files": str(path)})
    assert_one_line_error(code, err, f"{path}:1:", "no field 'text'", "keys found: id, body", "data.text_field")


def test_tokenizer_larger_than_model_vocab(tmp_path, capsys):
    write_text(tmp_path / "c", make_docs(8, "x", seed=0))
    files = str(tmp_path / "c" / "*.txt")
    prepared = prepare_data(data_cfg(tmp_path, files))
    assert prepared.vocab_size == 300
    model = {"vocab_size": 280, "max_seq_len": 64}
    code, _, err = run_cli(tmp_path, capsys, {"files": files, "tokenizer": str(prepared.tokenizer_path)}, model)
    assert_one_line_error(code, err, "data.tokenizer", "300 tokens", "model.vocab_size=280")


def test_seq_len_larger_than_model_max_seq_len(tmp_path, capsys):
    write_text(tmp_path / "c", make_docs(4, "x", seed=0))
    model = {"vocab_size": 512, "max_seq_len": 8}
    code, _, err = run_cli(tmp_path, capsys, {"files": str(tmp_path / "c" / "*.txt")}, model)
    assert_one_line_error(code, err, "data.seq_len", "16", "model.max_seq_len=8")


def test_non_utf8_replaced_and_counted_and_empty_files_skipped(tmp_path, capsys):
    docs = make_docs(8, "x", seed=0)
    write_text(tmp_path / "c", docs)
    (tmp_path / "c" / "bad.txt").write_bytes(b"caf\xe9 au lait \xff\xfe ok " * 4)  # 3 invalid sequences, 4 times
    (tmp_path / "c" / "empty.txt").write_bytes(b"")
    (tmp_path / "c" / "blank.txt").write_bytes(b"\n \n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_data(data_cfg(tmp_path, str(tmp_path / "c" / "*.txt"), val_fraction=0.1))
    assert [str(w.message) for w in caught if "UTF-8" in str(w.message)] == [
        f"data: 12 invalid UTF-8 sequences in 1 files were replaced by U+FFFD (first: {tmp_path / 'c' / 'bad.txt'})"
    ]
    s = prepared.stats
    assert (s["non_utf8_replaced"], s["non_utf8_files"], s["empty_files"], s["files"]) == (12, 1, 2, 9)
    assert s["train_documents"] + s["val_documents"] == 9
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    replaced = "caf\ufffd au lait \ufffd\ufffd ok " * 4
    expected = tuple(tok.encode(replaced).ids + [prepared.eos_id])
    # The document lands on the side its hash picks: the held-out windows (consecutive, so
    # flattened they are the held-out token stream) or the training stream (60 windows are
    # more than one pass over the 8 other documents).
    if held_out(replaced, prepared.val_threshold):
        tokens = validation_windows(prepared).flatten().tolist()
    else:
        tokens = TokenStream(prepared, 0, 1, seed=0).next_batch(60).flatten().tolist()
    assert expected in split_eos(tokens, prepared.eos_id)
    with pytest.warns(UserWarning, match="12 invalid UTF-8 sequences"):  # another config: prepared again
        code, out, _ = run_cli(tmp_path, capsys, {"files": str(tmp_path / "c" / "*.txt"), "val_fraction": 0.1})
    assert code == 0 and "12 sequences replaced in 1 files" in out and "(2 empty, skipped)" in out


def test_cli_statistics_and_exit_code(tmp_path, project_root):
    """The real `python -m data.prepare`: statistics on success, exit code 2 and one line on bad input."""
    write_jsonl(tmp_path / "c" / "a.jsonl", make_docs(10, "x", seed=0))
    config = tmp_path / "run.yaml"
    data = {"files": str(tmp_path / "c" / "*.jsonl"), "cache_dir": str(tmp_path / "cache"), "vocab_size": 300}
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 512, "max_seq_len": 64}, "data": data}))
    cmd = [sys.executable, "-m", "data.prepare", "--config", str(config), "data.seq_len=16", "data.val_windows=2"]
    ok = subprocess.run(cmd, cwd=project_root, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    for line in ("documents         10 (train 9, validation 1)", "tokens per byte", "eos '<|endoftext|>'"):
        assert line in ok.stdout
    bad = subprocess.run(cmd + ["data.text_field=body"], cwd=project_root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'c' / 'a.jsonl'}:1: no field 'body'; keys found: "
                                               "id, text; set data.text_field"]  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [
        {"files": "a.txt", "hf_dataset": "x"},
        {"weights": [1.0]},
        {"files": "a.txt", "weights": [-1.0]},
        {"loader": "mmap"},
        {"shard_bytes": 0},
    ],
)
def test_conflicting_sources_and_weights(tmp_path, capsys, bad):
    code, _, err = run_cli(tmp_path, capsys, bad)
    assert_one_line_error(code, err, "data.")
