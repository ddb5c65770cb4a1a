"""Bad input at every entry point: the real command, run as a subprocess, prints exactly one line
`error: ...` on stderr that names the input, exits 2, shows no traceback and writes nothing."""

from __future__ import annotations

import gzip
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import run_main
from core.errors import ConfigError
from run.config import load_run_config
from tests.train_helpers import ROOT, check, env, run_single, snapshot, tiny_overrides, write_corpus

ENV = env(HF_HUB_OFFLINE=1)
TINY = "configs/tiny.yaml"


def make_run_dir(run: Path, work: Path) -> None:
    """A real 2-step single-process training run (ZeRO-0, fp32) with its checkpoint."""
    glob = write_corpus(work / "corpus", n_docs=20)
    settings = {"train.max_steps": 2, "train.save_interval": 2, "train.eval_interval": 2}
    check(run_single(tiny_overrides(glob, work / "cache", run, **settings)))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """base/run (a run directory), base/run/hf (its export) and base/cases (one folder per case)."""
    base = tmp_path_factory.mktemp("bad_input")
    make_run_dir(base / "run", tmp_path_factory.mktemp("bad_input_corpus"))
    cmd = [sys.executable, "-m", "launcher.export_hf", "--run", str(base / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base


# ---- what a case finds in its folder -----------------------------------------------------------
def notes(case: Path, base: Path) -> None:
    (case / "notes.txt").write_text("mine\n")


def bad_yaml(case: Path, base: Path) -> None:
    (case / "bad.yaml").write_text("model: [unclosed\n")


def list_yaml(case: Path, base: Path) -> None:
    (case / "list.yaml").write_text("- model\n- data\n")


def gzipped_text(case: Path, base: Path) -> None:
    (case / "text.gz").write_bytes(gzip.compress(b"To be, or not to be, that is the question.\n" * 50))


def export_without_weights(case: Path, base: Path) -> None:
    shutil.copytree(base / "run" / "hf", case / "hf")
    (case / "hf" / "model.safetensors").unlink()


def run_of_another_model(case: Path, base: Path) -> None:
    """A copy of the run whose config.yaml describes a wider model than its checkpoint."""
    shutil.copytree(base / "run", case / "run", ignore=shutil.ignore_patterns("hf"))
    config = case / "run" / "config.yaml"
    config.write_text(config.read_text().replace("d_model: 32", "d_model: 64"))


def run_with_a_truncated_checkpoint(case: Path, base: Path) -> None:
    shutil.copytree(base / "run", case / "run", ignore=shutil.ignore_patterns("hf"))
    states = case / "run" / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])


def model_list_yaml(case: Path, base: Path) -> None:
    (case / "model-list.yaml").write_text("model: [1, 2]\ndata: {}\n")


def garbage_tokenizer_folder(case: Path, base: Path) -> None:
    (case / "tok").mkdir()
    (case / "tok" / "tokenizer.json").write_text("{}")


def model_folder(config: str):
    """A folder with `config` as config.json, an empty weights file and no tokenizer."""

    def setup(case: Path, base: Path) -> None:
        (case / "m").mkdir()
        (case / "m" / "config.json").write_text(config)
        (case / "m" / "model.safetensors").write_bytes(b"")

    return setup


def garbage_results(case: Path, base: Path) -> None:
    for report in ("rep/a", "out/x"):
        (case / report).mkdir(parents=True)
        (case / report / "results.json").write_text("{not json")


# ---- the table: id, module, argv, setup, what the one line must contain ------------------------
CASES = [
    ("config-is-a-folder", "run.config", ["--config", "{case}"], None, ["--config {case}", "is a folder"]),
    ("config-top-level-list", "run.config", ["--config", "{case}/list.yaml"], list_yaml,
     ["--config {case}/list.yaml", "mapping"]),
    ("config-empty-int-override", "run.config", ["train.max_steps="], None,
     ["train.max_steps", "empty value", "int"]),
    ("train-no-config-option", "launcher.train", [], None, ["--config", "required"]),
    ("train-missing-config", "launcher.train", ["--config", "{case}/nope.yaml"], None,
     ["--config {case}/nope.yaml", "no such file"]),
    ("train-output-dir-is-a-file", "launcher.train", ["--config", TINY, "train.output_dir={case}/notes.txt"], notes,
     ["train.output_dir {case}/notes.txt", "is a file"]),
    ("train-output-dir-below-a-file", "launcher.train", ["--config", TINY, "train.output_dir={case}/notes.txt/run"],
     notes, ["train.output_dir {case}/notes.txt/run", "cannot be created"]),
    ("train-run-dir-of-another-model", "launcher.train", ["--config", TINY, "train.output_dir={run}"], None,
     ["train.output_dir {run}", "different model section"]),
    ("prepare-yaml-syntax", "data.prepare", ["--config", "{case}/bad.yaml"], bad_yaml,
     ["--config {case}/bad.yaml", "not valid YAML"]),
    ("prepare-missing-config", "data.prepare", ["--config", "{case}/nope.yaml"], None,
     ["--config {case}/nope.yaml", "no such file"]),
    ("export-unknown-dtype", "launcher.export_hf", ["--run", "{run}", "--out", "{case}/hf", "--dtype", "fp16"], None,
     ["--dtype", "'fp16'", "'fp32', 'bf16'"]),
    ("export-out-below-a-file", "launcher.export_hf", ["--run", "{run}", "--out", "{case}/notes.txt/hf"], notes,
     ["--out {case}/notes.txt/hf", "cannot be created"]),
    ("export-missing-tag", "launcher.export_hf", ["--run", "{run}", "--tag", "global_step9", "--out", "{case}/hf"],
     None, ["--tag global_step9", "available: global_step2"]),
    ("export-not-a-run-dir", "launcher.export_hf", ["--run", "{case}", "--out", "{case}/hf"], notes,
     ["--run {case}", "no config.yaml"]),
    ("export-run-of-another-model", "launcher.export_hf", ["--run", "{case}/run", "--out", "{case}/hf"],
     run_of_another_model, ["{case}/run/checkpoints/global_step2", "does not match"]),
    ("generate-no-weights", "launcher.generate", ["--model", "{case}/hf", "--prompt", "hi"], export_without_weights,
     ["--model {case}/hf", "no model.safetensors"]),
    ("generate-empty-prompt", "launcher.generate", ["--model", "{hf}", "--prompt", ""], None, ["--prompt", "empty"]),
    ("train-missing-deepspeed-json", "launcher.train", ["--config", TINY, "train.output_dir={case}/run",
     "deepspeed.config={case}/nope.json"], None, ["deepspeed.config {case}/nope.json: no such file"]),
    ("generate-negative-max-new-tokens", "launcher.generate",
     ["--model", "{hf}", "--prompt", "hi", "--max-new-tokens", "-5"], None, ["--max-new-tokens -5", "positive"]),
    ("generate-max-new-tokens-not-an-int", "launcher.generate",
     ["--model", "{hf}", "--prompt", "hi", "--max-new-tokens", "many"], None, ["--max-new-tokens", "'many'"]),
    ("generate-missing-model", "launcher.generate", ["--model", "{case}/nope", "--prompt", "hi"], None,
     ["--model {case}/nope", "no such folder"]),
    ("generate-run-dir-as-model", "launcher.generate", ["--model", "{run}", "--prompt", "hi"], None,
     ["--model {run}", "no config.json"]),
    ("conditioning-binary-text", "launcher.conditioning", ["--model", "{hf}", "--text", "{case}/text.gz"],
     gzipped_text, ["--text {case}/text.gz", "not UTF-8"]),
    ("conditioning-no-weights", "launcher.conditioning", ["--model", "{case}/hf"], export_without_weights,
     ["--model {case}/hf", "no model.safetensors"]),
    ("conditioning-negative-seq-len", "launcher.conditioning",
     ["--model", "{hf}", "--text", "{case}/notes.txt", "--seq-len", "-1"], notes, ["--seq-len -1", "positive"]),
    ("conditioning-json-below-a-file", "launcher.conditioning",
     ["--model", "{hf}", "--text", "{case}/notes.txt", "--json", "{case}/notes.txt/k.json"], notes,
     ["--json {case}/notes.txt/k.json", "cannot be created"]),
    ("conditioning-missing-data-config", "launcher.conditioning",
     ["--model", "{hf}", "--data-config", "{case}/nope.yaml"], None, ["--data-config {case}/nope.yaml", "no such"]),
    ("experiment-runs-dir-is-a-file", "launcher.experiment",
     ["--config", TINY, "--runs-dir", "{case}/notes.txt", "--out-dir", "{case}/report"], notes,
     ["--runs-dir {case}/notes.txt", "is a file"]),
    ("experiment-no-variants", "launcher.experiment",
     ["--config", TINY, "--variants", ",", "--runs-dir", "{case}/runs", "--out-dir", "{case}/report"], None,
     ["--variants", "empty"]),
]  # fmt: skip

IN_PROCESS = [
    ("config-unresolved-interpolation", "run.config", ["--config", TINY, "train.output_dir=${{nope}}"], None,
     ["train.output_dir in --config", "'nope' not found"]),
    ("prepare-model-section-a-list", "data.prepare", ["--config", "{case}/model-list.yaml"], model_list_yaml,
     ["model: [1, 2]", "not a section"]),
    ("prepare-garbage-tokenizer-folder", "data.prepare", ["--config", TINY, "data.tokenizer={case}/tok"],
     garbage_tokenizer_folder, ["data.tokenizer: {case}/tok", "not a valid tokenizer.json"]),
    ("generate-nan-temperature", "launcher.generate", ["--model", "{hf}", "--prompt", "hi", "--temperature", "nan"],
     None, ["--temperature nan", "finite"]),
    ("gguf-out-is-a-folder", "launcher.gguf", ["--model", "{hf}", "--out", "{case}"], None,
     ["--out {case}: is a folder, expected a file"]),
    ("width-unicode-digit", "research.width", ["--config", TINY, "--name", "w", "--width", "\u00b2=a", "--width",
     "256=a"], None, ["--width '\u00b2=a'", "W >= 1"]),
    ("generate-no-tokenizer", "launcher.generate", ["--model", "{case}/m", "--prompt", "hi"], model_folder("{}"),
     ["--model {case}/m", "no loadable tokenizer"]),
    ("gguf-config-not-an-object", "launcher.gguf", ["--model", "{case}/m"], model_folder("[1]"),
     ["--model {case}/m", "not a JSON object"]),
    ("conditioning-truncated-checkpoint", "launcher.conditioning", ["--model", "{case}/run"],
     run_with_a_truncated_checkpoint,
     ["global_step2 is not whole", "truncated", "write one into {case}/run/checkpoints/latest"]),
    ("experiment-garbage-results", "launcher.experiment",
     ["--config", TINY, "--name", "x", "--runs-dir", "{case}/runs", "--out-dir", "{case}/out", "--report-only"],
     garbage_results, ["{case}/out/x/results.json", "not valid JSON"]),
    ("width-garbage-results", "research.width", ["--config", TINY, "--name", "w", "--width", "128=a",
     "--width", "256=a", "--reports", "{case}/rep", "--out-dir", "{case}/out"], garbage_results,
     ["{case}/rep/a/results.json", "not valid JSON"]),
    ("width-empty-name", "research.width", ["--config", TINY, "--name", "", "--width", "128=a", "--width", "256=a",
     "--out-dir", "{case}"], None, ["--name ''", "plain folder name"]),
    ("width-report-is-a-file", "research.width", ["--config", TINY, "--name", "notes.txt", "--width", "128=a",
     "--width", "256=a", "--out-dir", "{case}"], notes, ["{case}/notes.txt", "is a file"]),
]  # fmt: skip


def run_case(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *argv]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, argv, setup, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(base, request, module, argv, setup, expected):
    paths, before = prepared_case(base, request, setup)
    proc = run_case(module, [a.format(**paths) for a in argv])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and proc.stderr.endswith("\n"), proc.stderr
    for part in expected:
        assert part.format(**paths) in lines[0]
    assert snapshot(base) == before


def prepared_case(base: Path, request, setup) -> tuple[dict, list]:
    """The case's folder set up, its path names, and a snapshot of everything under base."""
    case = base / "cases" / request.node.callspec.id
    case.mkdir(parents=True)
    if setup is not None:
        setup(case, base)
    return dict(case=case, run=base / "run", hf=base / "run" / "hf"), snapshot(base)


@pytest.mark.parametrize("module, argv, setup, expected", [c[1:] for c in IN_PROCESS], ids=[c[0] for c in IN_PROCESS])
def test_bad_input_in_process_is_one_line_exit_2_and_writes_nothing(
    base, request, capsys, monkeypatch, module, argv, setup, expected
):
    """The same checks through each command's main() and run_main in this process: the mistakes
    that need no fresh interpreter to show (a start-up crash would; those are in CASES)."""
    paths, before = prepared_case(base, request, setup)
    monkeypatch.chdir(ROOT)
    main = importlib.import_module(module).main
    assert run_main(main, [a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.endswith("\n"), err
    for part in expected:
        assert part.format(**paths) in lines[0], lines[0]
    assert snapshot(base) == before


SCRIPT_CASES = [
    ("num-gpus-not-a-number", {"NUM_GPUS": "two"}, [], "NUM_GPUS=two: expected a whole number"),
    ("num-nodes-zero", {"NUM_NODES": "0"}, [], "NUM_NODES=0: expected 1 or more"),
    ("min-nodes-zero", {"MIN_NODES": "0"}, [], "MIN_NODES=0: expected 1 or more"),
    ("missing-config", {}, ["configs/nope.yaml"], "config configs/nope.yaml: no such file"),
    ("node-rank-without-hostfile", {"NODE_RANK": "1"}, [], "NODE_RANK=1 needs HOSTFILE and MASTER_ADDR"),
    ("missing-hostfile", {"HOSTFILE": "/nonexistent/hosts"}, [], "HOSTFILE=/nonexistent/hosts: no such file"),
]


@pytest.mark.parametrize("env, args, expected", [c[1:] for c in SCRIPT_CASES], ids=[c[0] for c in SCRIPT_CASES])
def test_run_pretrain_refuses_bad_settings_before_any_work(tmp_path, env, args, expected):
    run_dir = tmp_path / "run"
    settings = [f"train.output_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    script_env = {k: v for k, v in ENV.items() if k not in ("NUM_GPUS", "NUM_NODES", "NODE_RANK", "HOSTFILE")}
    cmd = ["bash", str(ROOT / "run_pretrain.sh"), *args, *settings]
    proc = subprocess.run(cmd, cwd=ROOT, env={**script_env, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_empty_override_clears_a_string_key():
    cfg = load_run_config(None, ["data.hf_dataset=", "data.tokenizer=", "data.files="])
    assert (cfg.data.hf_dataset, cfg.data.tokenizer, cfg.data.files) == ("", "", [])
    with pytest.raises(ConfigError, match="train.max_steps: an empty value is not a valid int"):
        load_run_config(None, ["train.max_steps="])


def test_run_main_names_a_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope" / "file.txt"
    assert run_main(lambda argv: missing.read_text()) == 2
    assert capsys.readouterr().err == f"error: {missing}: No such file or directory\n"
