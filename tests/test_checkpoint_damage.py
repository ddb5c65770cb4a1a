"""Damaged checkpoints and refused resumes: one line that names the file and what to do,
exit 2, and nothing in the run directory loaded, rewritten or deleted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.errors import ConfigError
from launcher import checkpoint
from run.rundir import RunDir
from tests.train_helpers import check, run_single, snapshot, tiny_overrides

pytestmark = pytest.mark.slow

MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A finished single-process run with complete checkpoints at steps 4 and 8."""
    glob, cache = corpus
    run_dir = tmp_path_factory.mktemp("damage") / "run"
    overrides = tiny_overrides(glob, cache, run_dir)
    check(run_single(overrides))
    return run_dir, overrides


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated(ckpts: Path) -> None:
    truncate(ckpts / "global_step8" / MODEL_FILE)


def _missing(ckpts: Path) -> None:
    (ckpts / "global_step8" / MODEL_FILE).unlink()


def _names_a_missing_folder(ckpts: Path) -> None:
    (ckpts / "latest").write_text("global_step12")


def _garbage(ckpts: Path) -> None:
    (ckpts / "latest").write_bytes(b"\x00\xff\x13garbage")


def _garbage_manifest(ckpts: Path) -> None:
    (ckpts / "global_step8" / checkpoint.MANIFEST).write_text("[]")


def _truncated_without_manifest(ckpts: Path) -> None:
    (ckpts / "global_step8" / checkpoint.MANIFEST).unlink()
    truncate(ckpts / "global_step8" / MODEL_FILE)


CASES = [
    (_truncated, f"global_step8/{MODEL_FILE}: truncated", "global_step4"),
    (_missing, f"global_step8/{MODEL_FILE}: missing", "global_step4"),
    (_names_a_missing_folder, "names global_step12, which does not exist", "global_step8"),
    (_garbage, "is not a checkpoint tag", "global_step8"),
    (_garbage_manifest, "global_step8/checkpoint.json: not a checkpoint manifest", "global_step4"),
    (_truncated_without_manifest, f"global_step8/{MODEL_FILE}: truncated or not a torch checkpoint", "global_step4"),
]


@pytest.mark.parametrize(("damage", "problem", "fallback"), CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_a_damaged_checkpoint_names_the_file_and_the_tag_to_use(trained, tmp_path, damage, problem, fallback):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    ckpts = run_dir / "checkpoints"
    damage(ckpts)
    with pytest.raises(ConfigError) as err:
        checkpoint.check_resume(RunDir(run_dir), zero_stage=0)
    message = str(err.value)
    assert problem in message and "\n" not in message
    assert f"write {fallback} (the newest complete checkpoint) into {ckpts / 'latest'}" in message


def test_a_run_with_only_damaged_checkpoints_says_to_start_afresh(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    for tag in ("global_step4", "global_step8"):
        (run_dir / "checkpoints" / tag / MODEL_FILE).unlink()
    with pytest.raises(ConfigError, match=r"missing; remove .*latest to start afresh"):
        checkpoint.check_resume(RunDir(run_dir), zero_stage=0)


@pytest.mark.parametrize(
    ("damage", "extra", "expected"),
    [
        (_truncated, {}, f"{MODEL_FILE}: truncated"),
        (None, {"deepspeed.zero_stage": 1}, "written under ZeRO stage 0; resume with deepspeed.zero_stage=0"),
        (
            None,
            {"train.precision": "bf16"},
            "written in precision mode 'fp32', this run would train in 'bf16 autocast' (another CPU or GPU picks "
            "another train.precision=auto); resume with train.precision=fp32",
        ),
    ],
    ids=["truncated-shard", "another-zero-stage", "another-precision"],
)
def test_launcher_train_refuses_before_touching_the_run(trained, tmp_path, damage, extra, expected):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    if damage:
        damage(run_dir / "checkpoints")
    before = snapshot(run_dir)
    overrides = [o for o in trained[1] if not o.startswith("train.output_dir=")]
    overrides += [f"train.output_dir={run_dir}", "train.max_steps=12"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    proc = run_single(overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert expected in proc.stderr
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_a_checkpoint_from_before_manifests_named_the_precision_is_judged_by_its_weights(trained, tmp_path, weights):
    """An older manifest has no precision_mode: the saved weights' dtype says it. bf16 weights at
    ZeRO-0 (an older version's bf16 mode) cannot resume under autocast: one message says why."""
    import json

    import torch

    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    folder = run_dir / "checkpoints" / "global_step8"
    if weights == "bf16":
        states = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=False)
        states["module"] = {k: v.to(torch.bfloat16) for k, v in states["module"].items()}
        torch.save(states, folder / MODEL_FILE)
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    del manifest["precision_mode"]
    manifest["files"][MODEL_FILE] = (folder / MODEL_FILE).stat().st_size
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    run = RunDir(run_dir)
    if weights == "fp32":
        assert checkpoint.check_resume(run, zero_stage=0, precision_mode="fp32") == "global_step8"
        with pytest.raises(ConfigError, match="written in precision mode 'fp32'.*resume with train.precision=fp32"):
            checkpoint.check_resume(run, zero_stage=0, precision_mode="bf16 autocast")
    else:
        with pytest.raises(ConfigError, match=r"ZeRO-0 in DeepSpeed's bf16 mode .* remove .*latest to start afresh"):
            checkpoint.check_resume(run, zero_stage=0, precision_mode="bf16 autocast")
