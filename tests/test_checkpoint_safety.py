"""A checkpoint is data, not code (run/pickles.py): a pickle that names a global outside the
allowlist is refused before anything unpickles it, by the resume and by the export; the
checkpoints this project writes pass (tests/test_export.py checks them at every ZeRO stage, in
fp32 and bf16)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from run.pickles import ALLOWED, allowed, check_folder, pickle_globals
from tests.train_helpers import ROOT, env

MARKER_NAME = "pwned"


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_globals_are_found_without_unpickling(tmp_path, protocol):
    """GLOBAL (protocol 2) and STACK_GLOBAL (4, 5, names through the memo) are both read."""
    marker = tmp_path / MARKER_NAME
    data = pickle.dumps({"w": torch.ones(2), "x": RunsCode(marker)}, protocol=protocol)
    found = pickle_globals(data)
    assert (os.system.__module__, "system") in found
    assert not marker.exists()


def test_python2_names_are_read_as_the_unpickler_maps_them(monkeypatch):
    assert allowed("collections", "OrderedDict") and not allowed("__builtin__", "eval")
    # __builtin__.set is builtins.set to the unpickler: allowed exactly when builtins.set is
    monkeypatch.setitem(ALLOWED, "builtins", {"set"})
    assert allowed("__builtin__", "set") and not allowed("__builtin__", "eval")
    assert not allowed("os", "system") and not allowed("torch", "load")
    assert all(isinstance(names, set) and names for names in ALLOWED.values())


def hostile_run(tmp_path):
    """A run directory whose latest checkpoint is complete (manifest and all) but whose model
    states file, when unpickled, runs `touch MARKER`; returns it, the marker and the overrides
    of its config."""
    from launcher.checkpoint import write_manifest
    from run.config import load_run_config, save_run_config
    from run.rundir import RunDir

    run = RunDir(tmp_path / "run")
    overrides = [f"train.output_dir={run.root}", "train.max_steps=4", "log.progress=false"]
    overrides += [f"data.cache_dir={tmp_path / 'cache'}"]
    folder = run.checkpoint("global_step2")
    folder.mkdir(parents=True)
    save_run_config(load_run_config(ROOT / "configs/tiny.yaml", overrides), run.config)
    from data.tokenizer import EOS_TOKEN, save_tokenizer, train_bpe

    tokenizer = save_tokenizer(train_bpe(["to be or not to be"] * 20, 300), EOS_TOKEN, tmp_path / "tok", 64)
    run.keep_tokenizer(tokenizer.parent)
    marker = tmp_path / MARKER_NAME
    torch.save({"module": {"x": torch.zeros(1)}, "hook": RunsCode(marker)}, folder / "mp_rank_00_model_states.pt")
    write_manifest(folder, 2, 1, 0, 4)
    run.set_latest("global_step2")
    return run, marker, overrides


def test_folder_check_names_the_file_and_the_global(tmp_path):
    from core.errors import ConfigError

    run, marker, _ = hostile_run(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_folder(run.checkpoint("global_step2"))
    assert "mp_rank_00_model_states.pt" in str(e.value) and f"{os.system.__module__}.system" in str(e.value)
    assert not marker.exists()


def run_command(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )  # fmt: skip


@pytest.mark.slow
def test_resume_and_export_refuse_a_checkpoint_that_runs_code(tmp_path):
    """Resuming the run and exporting it each stop with one line, exit 2, and the pickle's
    command never runs."""
    run, marker, overrides = hostile_run(tmp_path)
    train = ["-m", "launcher.train", "--config", "configs/tiny.yaml", *overrides]
    for args in (train, ["-m", "launcher.export_hf", "--run", str(run.root)]):
        proc = run_command(args)
        err = proc.stderr.strip()
        assert proc.returncode == 2, err[-2000:]
        assert err.count("\n") == 0 and "refusing to load it" in err and "mp_rank_00_model_states.pt" in err, err
        assert not marker.exists()
    assert json.loads((run.checkpoint("global_step2") / "checkpoint.json").read_text())["step"] == 2
