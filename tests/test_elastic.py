"""Resuming on another number of ranks: real DeepSpeed ranks over gloo, through DeepSpeed's
universal checkpoint (converted once, beside the original), with the data position shared by
every rank; a streamed run, whose data state belongs to its rank, is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launcher.distributed import free_port
from tests.train_helpers import check, run_deepspeed, run_single, snapshot, tiny_overrides, train_losses

pytestmark = pytest.mark.slow

# The data pipelines under test: only these two dicts name them.
ELASTIC = {"data.loader": "shards"}  # one state, (epoch, position), for every rank and world size
STREAMED = {"data.loader": "stream"}  # each rank streams its own share of the documents


def overrides(corpus, run_dir: Path, stage: int, loader: dict = ELASTIC, **extra) -> list[str]:
    """8 steps, checkpoints at 4 and 8, 2 windows per micro-batch."""
    glob, cache = corpus
    return tiny_overrides(glob, cache, run_dir, **{**loader, "deepspeed.zero_stage": stage, **extra})


def rewind(src: Path, dst: Path, tag: str = "global_step4") -> Path:
    """A copy of run `src` as a run stopped after checkpoint `tag`: later checkpoints gone."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    step = int(tag.removeprefix("global_step"))
    for p in ckpts.glob("global_step*"):
        if int(p.name.removeprefix("global_step").split("_")[0]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(tag)
    return dst


def assert_same_losses(a: dict, b: dict) -> None:
    assert list(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])  # summation order only (test_train)


@pytest.fixture(scope="module")
def zero2_two_ranks(corpus, tmp_path_factory):
    """An uninterrupted ZeRO-2 run on 2 ranks: 4 windows per step."""
    run_dir = tmp_path_factory.mktemp("z2") / "run"
    check(run_deepspeed(overrides(corpus, run_dir, 2), 2, free_port()))
    return run_dir


@pytest.fixture(scope="module")
def zero2_on_one_rank(corpus, zero2_two_ranks, tmp_path_factory):
    """The 2-rank run resumed from step 4 on 1 rank, with grad_accum 2: the same 4 windows per step."""
    run_dir = rewind(zero2_two_ranks, tmp_path_factory.mktemp("z2on1") / "run")
    proc = run_single(overrides(corpus, run_dir, 2, **{"train.grad_accum": 2}))
    check(proc)
    return run_dir, proc


def test_zero2_from_two_ranks_resumes_on_one_rank_exactly(zero2_two_ranks, zero2_on_one_rank):
    run_dir, proc = zero2_on_one_rank
    ckpts = run_dir / "checkpoints"
    converted = ckpts / "global_step4_universal"
    line = f"resuming global_step4 written by 2 ranks on 1 rank: converted to a universal checkpoint at {converted}"
    assert line in proc.stdout.splitlines()
    assert (converted / "zero").is_dir()
    assert not list(ckpts.glob("*.tmp")) and not (ckpts / "latest_universal").exists()  # nothing half-made
    assert "global batch changed" not in proc.stderr
    assert_same_losses(train_losses(zero2_two_ranks), train_losses(run_dir))
    record = json.loads((ckpts / "global_step8/checkpoint.json").read_text())
    assert (record["world_size"], record["global_batch"]) == (1, 4)


def test_the_universal_copy_is_reused_and_a_changed_global_batch_is_warned(corpus, zero2_on_one_rank, tmp_path):
    """Resumed from step 4 again, now with 2 windows per step: one warning line, and the
    universal copy made by the first resume is used as it is."""
    run_dir = rewind(zero2_on_one_rank[0], tmp_path / "run")
    converted = run_dir / "checkpoints/global_step4_universal"
    before = snapshot(converted)
    proc = run_single(overrides(corpus, run_dir, 2))
    check(proc)
    line = f"resuming global_step4 written by 2 ranks on 1 rank: using a universal checkpoint at {converted}"
    assert line in proc.stdout.splitlines()
    warnings = [line for line in proc.stderr.splitlines() if "global batch changed" in line]
    assert warnings == [
        "warning: resuming global_step4: the global batch changed from 4 to 2 windows per step "
        "(micro_batch_size x grad_accum x ranks); training continues"
    ]
    assert snapshot(converted) == before
    assert list(train_losses(run_dir)) == list(range(1, 9))


def test_a_streamed_run_on_another_world_size_is_refused_before_anything_changes(corpus, zero2_two_ranks, tmp_path):
    """A run whose data state belongs to the rank that streamed it: one line, exit 2, the run
    dir untouched. (The 2-rank run, relabelled as streamed in its config.yaml: the refusal comes
    before anything is loaded, so only the recorded world size and this run's loader count.)"""
    from run.config import load_run_config, save_run_config

    run_dir = tmp_path / "run"
    shutil.copytree(zero2_two_ranks, run_dir)
    streamed = load_run_config(run_dir / "config.yaml", [f"{k}={v}" for k, v in STREAMED.items()])
    save_run_config(streamed, run_dir / "config.yaml")
    before = snapshot(run_dir)
    proc = run_single(overrides(corpus, run_dir, 2, STREAMED))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == (
        f"error: {run_dir / 'checkpoints/global_step8'}: written by 2 ranks, resuming with 1; a streamed run "
        "(data.loader=stream) resumes only on 2 ranks; use data.loader=shards to change the number of ranks\n"
    )
    assert snapshot(run_dir) == before  # nothing converted, loaded or written


def test_zero3_from_one_rank_resumes_on_two_ranks_exactly(corpus, tmp_path):
    """Written by 1 rank with grad_accum 2, resumed from step 4 on 2 ranks: 4 windows per step
    throughout, so the losses match the uninterrupted 1-rank run."""
    one = tmp_path / "one"
    check(run_single(overrides(corpus, one, 3, **{"train.grad_accum": 2})))
    run_dir = rewind(one, tmp_path / "two")
    proc = run_deepspeed(overrides(corpus, run_dir, 3), 2, free_port())
    check(proc)
    converted = run_dir / "checkpoints/global_step4_universal"
    line = f"resuming global_step4 written by 1 rank on 2 ranks: converted to a universal checkpoint at {converted}"
    assert line in proc.stdout.splitlines()
    assert_same_losses(train_losses(one), train_losses(run_dir))


def test_pruning_removes_a_checkpoints_universal_copy_with_it(tmp_path):
    from launcher import checkpoint
    from run.rundir import RunDir

    run = RunDir(tmp_path)
    for name in ("global_step2", "global_step2_universal", "global_step2_universal.tmp", "global_step4"):
        run.checkpoint(name).mkdir(parents=True)
    run.checkpoint("global_step6_universal").mkdir()
    run.checkpoint("global_step6").mkdir()
    run.set_latest("global_step6")
    checkpoint.prune(run, keep_last=2)
    kept = sorted(p.name for p in run.checkpoints.iterdir())
    assert kept == ["global_step4", "global_step6", "global_step6_universal", "latest"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    from launcher import checkpoint

    (tmp_path / "global_step4").mkdir()  # holds no checkpoint files
    error = checkpoint.convert_to_universal(tmp_path / "global_step4", tmp_path / "global_step4_universal")
    assert error and "\n" not in error and "optim_states" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4"]
