"""Real training runs: one process, DeepSpeed ranks over gloo, resume, faults, TensorBoard."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.distributed import free_port
from tests.train_helpers import (
    ROOT,
    check,
    deepspeed_cmd,
    env,
    metric_rows,
    run_deepspeed,
    run_single,
    tiny_overrides,
    train_losses,
)

pytestmark = pytest.mark.slow


# `corpus` (glob, cache_dir) comes from conftest.py.


@pytest.fixture(scope="module")
def single_run(corpus, tmp_path_factory):
    glob, cache = corpus
    run_dir = tmp_path_factory.mktemp("single") / "run"
    proc = run_single(tiny_overrides(glob, cache, run_dir), PRECOND_FAULT="slow-eval@4,slow-save@4")
    check(proc)
    return run_dir, proc


def test_single_process_run_writes_the_run_directory(single_run):
    run_dir, proc = single_run
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints/latest", "tensorboard"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints/latest").read_text() == "global_step8"
    rows = metric_rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec"} <= r.keys()
        assert r["grad_norm"] > 0 and r["tokens_per_sec"] > 0
    assert train_rows[-1]["tokens"] == 8 * 2 * 16
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4, 8]  # step 0: the untrained loss
    assert abs(rows[0]["val_loss"] - math.log(512)) < 0.3  # near uniform over model.vocab_size
    assert "run directory" in proc.stdout and "ZeRO stage 0" in proc.stdout
    assert "model states    0.5 MiB per rank (estimate: 4 + 4 + 8 bytes/param for fp32" in proc.stdout  # 34,976 x 16 B


def test_tensorboard_draws_train_and_val_loss_on_one_chart_first(single_run):
    """TensorBoard's own reader: the runs `train` and `val` each hold the tag `loss` (one chart,
    two curves, the val curve from step 0), and every other tag sorts after it."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    run_dir, _ = single_run
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run_dir / "tensorboard"))
    mux.Reload()
    tags = {run: set(t["scalars"]) for run, t in mux.Runs().items()}
    assert set(tags) == {"train", "val"}, tags
    assert {"loss", "optim/lr", "optim/grad_norm", "speed/tokens_per_sec", "speed/mfu", "speed/mem_gb"} <= tags["train"]
    assert {"time/eval_seconds", "time/save_seconds"} <= tags["train"] and tags["val"] == {"loss", "perplexity"}
    assert min(tags["train"] | tags["val"]) == "loss"  # the section TensorBoard lists first
    losses = {e.step: e.value for e in mux.Scalars("train", "loss")}
    for step, loss in train_losses(run_dir).items():
        assert losses[step] == pytest.approx(loss, rel=1e-6)
    val = {e.step: e.value for e in mux.Scalars("val", "loss")}
    rows = {r["step"]: r["val_loss"] for r in metric_rows(run_dir) if "val_loss" in r}
    assert val == pytest.approx(rows) and min(val) == 0


def test_compiled_model_trains_like_eager_and_saves_the_same_names(single_run, corpus, tmp_path):
    """train.compile=true: same fp32 losses up to the reordering of float sums inside fused
    kernels (1e-4 over 8 steps of a loss near 6), and a checkpoint the exporter reads."""
    from export.consolidate import consolidate, resolve_tag
    from run.config import load_run_config

    glob, cache = corpus
    run_dir = tmp_path / "compiled"
    # a cold inductor compile of the training and evaluation graphs: minutes on 2 loaded cores
    proc = run_single(tiny_overrides(glob, cache, run_dir, **{"train.compile": "true"}), timeout=600)
    check(proc)
    assert "torch.compile" in proc.stdout
    eager, compiled = train_losses(single_run[0]), train_losses(run_dir)
    assert eager.keys() == compiled.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-4), step
    model_cfg = load_run_config(run_dir / "config.yaml").model
    weights = consolidate(resolve_tag(run_dir, None), model_cfg).state_dict  # checks every name and shape
    assert not any("_orig_mod" in name for name in weights)


def test_logged_lr_is_the_one_each_step_used(single_run):
    """Warmup then cosine, written out here: step s (1-based) trains with
    lr * s / warmup during warmup, then min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2 with
    p = (s - 1 - warmup) / (max_steps - warmup)."""
    import math

    from run.config import load_run_config

    run_dir, _ = single_run
    t = load_run_config(run_dir / "config.yaml").train
    logged = {r["step"]: r["lr"] for r in metric_rows(run_dir) if "lr" in r}
    assert list(logged) == list(range(1, t.max_steps + 1))
    for s, lr in logged.items():
        if s <= t.warmup_steps:
            expected = t.lr * s / t.warmup_steps
        else:
            p = (s - 1 - t.warmup_steps) / (t.max_steps - t.warmup_steps)
            expected = t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
        assert lr == pytest.approx(expected, rel=1e-9), s
    assert logged[t.warmup_steps] == pytest.approx(t.lr)


def tiny_model(tie: bool = False):
    from model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                      max_seq_len=16, tie_embeddings=tie, init_std=0.5)  # fmt: skip
    return Transformer(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_applies_to_matrices_not_to_norm_gains(tie):
    import torch

    from launcher.optim import build_optimizer
    from run.config import TrainConfig

    model = tiny_model(tie)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay = [(id(p), g["weight_decay"]) for g in opt.param_groups for p in g["params"]]
    assert len(decay) == len(dict(decay)) == len(list(model.parameters()))  # each parameter once
    expected = {id(p): 0.0 if "norm" in name else 0.1 for name, p in model.named_parameters()}
    assert dict(decay) == expected and 0.0 in expected.values()


def test_evaluate_averages_over_tokens_when_the_last_batch_is_short():
    """7 windows in micro-batches of 3 (3, 3, 1): the mean over all tokens, not over batches."""
    import torch
    import torch.nn.functional as F

    from launcher.trainer import Trainer
    from run.config import RunConfig

    model = tiny_model().eval()
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = RunConfig()
    trainer.cfg.train.micro_batch_size = 3
    trainer.device, trainer.precision, trainer.engine = torch.device("cpu"), "fp32", model
    trainer.val = torch.randint(0, 64, (7, 9), generator=torch.Generator().manual_seed(3))
    trainer.val[6, 1:] = trainer.val[6, 0]  # a repetitive last window: its loss is far from the others'
    with torch.no_grad():
        logits = model.double()(trainer.val[:, :-1]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), trainer.val[:, 1:].flatten()).item()
    assert trainer.evaluate() == pytest.approx(expected, rel=1e-6)


def test_slow_evaluation_and_save_are_logged_as_their_seconds(single_run):
    """Evaluation and the save after step 4 each sleep SLOW_SECONDS more (fault injection):
    metrics.jsonl logs the time they took as eval_seconds and save_seconds of step 4."""
    from launcher.faults import SLOW_SECONDS

    run_dir, _ = single_run
    at4 = {k: v for r in metric_rows(run_dir) if r["step"] == 4 for k, v in r.items()}
    assert at4["eval_seconds"] >= SLOW_SECONDS and at4["save_seconds"] >= SLOW_SECONDS


def test_tokens_per_sec_leaves_out_evaluation_and_saves(monkeypatch):
    """On a fake clock: a step of 0.5 s, an evaluation and a save of 2 s each, another step of
    0.5 s. Both steps measure the same rate, tokens / 0.5 s: the pauses are set aside."""
    import launcher.trainer as trainer_module
    from launcher.trainer import StepClock

    now = [1000.0]
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    clock, rates = StepClock(0), []
    now[0] += 0.5  # step 1
    rates.append(clock.rate(64))
    clock.restart(64)
    for pause in (2.0, 2.0):  # evaluation, save
        now[0] += pause
        clock.pause(pause)
    now[0] += 0.5  # step 2
    rates.append(clock.rate(128))
    assert rates == [128.0, 128.0]


def test_metrics_keys_map_to_one_tensorboard_tag_each():
    """One metrics dict feeds both sinks: each logged key has its TensorBoard tag (or none)."""
    from launcher.metrics import scalar_tag

    keys = ("loss", "val_loss", "eval_seconds", "cond/layer0/kappa_s", "logit/layer0/max", "tokens")
    tags = {k: scalar_tag(k) for k in keys}
    assert tags == {"loss": ("train", "loss"), "val_loss": ("val", "loss"),
                    "eval_seconds": ("train", "time/eval_seconds"),
                    "cond/layer0/kappa_s": ("train", "probe/layer0/kappa_s"),
                    "logit/layer0/max": ("train", "probe/logit/layer0/max"), "tokens": None}  # fmt: skip


def test_zero0_one_rank_matches_zero2_two_ranks(corpus, tmp_path):
    """Same global batches (the shard loader's global order), fp32: the optimizer math must agree."""
    glob, cache = corpus
    one = tmp_path / "one"
    two = tmp_path / "two"
    check(run_single(tiny_overrides(glob, cache, one, **{"train.micro_batch_size": 4})))
    check(
        run_deepspeed(
            tiny_overrides(glob, cache, two, **{"deepspeed.zero_stage": 2}),
            2,
            free_port(),
        )
    )
    a, b = train_losses(one), train_losses(two)
    assert a.keys() == b.keys()
    # fp32 and the same batches: only the all-reduce's summation order differs (a few ulps of a
    # loss of order 5, ~1e-6); a wrong batch or an update missed is off by 1e-3 or more.
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    val_one, val_two = ([r["val_loss"] for r in metric_rows(run) if "val_loss" in r] for run in (one, two))
    assert val_two == pytest.approx(val_one, abs=1e-5)


def resume_settings(stage: int, precision: str = "fp32") -> dict:
    """ZeRO-3 runs read the corpus with the streamed loader, so its exact resume is tested too."""
    return {
        "deepspeed.zero_stage": stage,
        "train.max_steps": 10,
        "train.save_interval": 4,
        "train.precision": precision,
        "data.loader": "stream" if stage == 3 else "shards",
    }


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """(stage, precision) -> the run dir of an uninterrupted 2-rank run (made once each)."""
    glob, cache = corpus
    runs = {}

    def get(stage: int, precision: str = "fp32") -> Path:
        if (stage, precision) not in runs:
            run_dir = tmp_path_factory.mktemp(f"whole{stage}{precision}") / "run"
            overrides = tiny_overrides(glob, cache, run_dir, **resume_settings(stage, precision))
            check(run_deepspeed(overrides, 2, free_port()))
            runs[stage, precision] = run_dir
        return runs[stage, precision]

    return get


def tear_last_line(path: Path) -> None:
    """What a crash in the middle of a write leaves: the last row cut in half, no newline."""
    text = path.read_text().rstrip("\n")
    last = text.rsplit("\n", 1)[-1]
    path.write_text(text[: len(text) - len(last) // 2])


@pytest.mark.parametrize(
    ("stage", "fault", "precision"),
    [
        (2, "sigkill@6:1", "fp32"),
        (3, "sigkill@6:1", "fp32"),
        (2, "sigkill-save@8:0", "fp32"),
        (3, "sigkill@6:1", "bf16"),
        pytest.param(0, "sigkill@6:1", "bf16", marks=pytest.mark.extra),  # outside the 15-minute suite
    ],
    ids=["zero2-after-step", "zero3-after-step", "zero2-inside-save", "zero3-bf16-after-step", "zero0-bf16-after-step"],
)
def test_two_ranks_resume_exactly_after_sigkill(corpus, uninterrupted, tmp_path, stage, fault, precision):
    """SIGKILL after step 6, or inside the save of step 8 (rank 0 wrote its files, the others
    may not have): `latest` stays on step 4, and the resume, with a torn last metrics row,
    logs the same per-step losses as a run that was never interrupted. In DeepSpeed's bf16 mode
    (ZeRO-3) the bf16 weights come back from the saved fp32 master weights, so the losses are
    bit-identical too; so are they under ZeRO-0's autocast, gradients all-reduced in bf16."""
    glob, cache = corpus
    broken = tmp_path / "broken"
    overrides = tiny_overrides(glob, cache, broken, **resume_settings(stage, precision))
    killed = run_deepspeed(overrides, 2, free_port(), PRECOND_FAULT=fault)
    assert killed.returncode != 0
    assert (broken / "checkpoints/latest").read_text() == "global_step4"
    assert max(train_losses(broken)) >= 5  # it ran past the checkpoint before dying
    if "save" in fault:
        assert (broken / "checkpoints/global_step8").is_dir()
        assert not (broken / "checkpoints/global_step8/checkpoint.json").exists()
    tear_last_line(broken / "metrics.jsonl")
    resumed = run_deepspeed(overrides, 2, free_port())
    check(resumed)
    assert "resuming at step 4" in resumed.stdout
    a, b = train_losses(uninterrupted(stage, precision)), train_losses(broken)
    assert list(b) == list(range(1, 11))  # each step logged once, in order
    assert a == b  # bit-identical: same data, same optimizer and scheduler state, same reductions


def test_activation_checkpointing_under_zero3_logs_the_same_losses(corpus, uninterrupted, tmp_path):
    """train.activation_checkpointing=true on 2 ranks under ZeRO-3, which gathers each block's
    parameters again for the recomputation: the fp32 losses are those of the run without it."""
    glob, cache = corpus
    run_dir = tmp_path / "recompute"
    settings = {**resume_settings(3), "train.activation_checkpointing": "true"}
    proc = run_deepspeed(tiny_overrides(glob, cache, run_dir, **settings), 2, free_port())
    check(proc)
    assert "activation checkpointing" in proc.stdout
    assert train_losses(run_dir) == train_losses(uninterrupted(3))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_is_autocast_without_zero_and_deepspeeds_bf16_mode_with_it(stage):
    """bf16 at ZeRO-0: DeepSpeed's torch_autocast over fp32 weights, gradients all-reduced in
    bf16, the trainer clips (a plain optimizer); ZeRO 1-3: DeepSpeed's bf16 mode with fp32
    gradient accumulation, and DeepSpeed clips."""
    from launcher.ds_config import build_ds_config
    from run.config import load_run_config

    cfg = load_run_config(None, [f"deepspeed.zero_stage={stage}"])
    bf16, fp32 = (build_ds_config(cfg, world_size=2, precision=p) for p in ("bf16", "fp32"))
    assert bf16["bf16"] == {"enabled": stage > 0} and fp32["bf16"] == {"enabled": False}
    autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "communication_data_type": "bf16"}
    assert {k: bf16[k] for k in autocast if k in bf16} == (autocast if stage == 0 else {})
    assert bf16.get("data_types") == ({"grad_accum_dtype": "fp32"} if stage else None)
    assert "data_types" not in fp32 and "torch_autocast" not in fp32
    assert bf16["gradient_clipping"] == fp32["gradient_clipping"] == (cfg.train.grad_clip if stage else 0.0)


def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    glob, cache = corpus
    run_dir = tmp_path / "term"
    cmd = [sys.executable, "-m", "launcher.train", "--config", str(ROOT / "configs/tiny.yaml")]
    cmd += tiny_overrides(
        glob, cache, run_dir, **{"train.max_steps": 100000, "train.save_interval": 0, "train.eval_interval": 0}
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(metric_rows(run_dir)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    tag = (run_dir / "checkpoints/latest").read_text()
    last = max(train_losses(run_dir))
    assert tag == f"global_step{last}" and last < 100000
    assert "stop requested" in out + err


@pytest.mark.parametrize("signalled", [1, 0])
def test_sigterm_to_one_rank_stops_both_at_the_same_step(corpus, tmp_path, signalled):
    """A scheduler or the kernel may signal one process only: the ranks agree on the stop (an
    all-reduce MAX of the flag), save one complete checkpoint at the same step and exit 0."""
    glob, cache = corpus
    run_dir, steps = tmp_path / "one-rank", 3000
    extra = {"deepspeed.zero_stage": 2, "train.max_steps": steps, "train.save_interval": 0, "train.eval_interval": 0}
    cmd = deepspeed_cmd(tiny_overrides(glob, cache, run_dir, **extra), 2, free_port())
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids, seen = {}, []
    while len(pids) < 2:
        line = proc.stdout.readline()
        assert line, "".join(seen[-40:])
        seen.append(line)
        pids.update({int(r): int(pid) for r, pid in re.findall(r"rank (\d)/2 on .*?, pid (\d+)", line)})
    deadline = time.time() + 120
    while time.time() < deadline and len(train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 3:
        time.sleep(0.1)
    os.kill(pids[signalled], signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    last = max(train_losses(run_dir))
    assert last < steps and (run_dir / "checkpoints/latest").read_text() == f"global_step{last}"
    files = sorted(p.name for p in (run_dir / f"checkpoints/global_step{last}").glob("zero_pp_rank_*"))
    assert files == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert f"stop requested: saving at step {last}" in out


def test_a_dead_rank_does_not_hang_the_job(corpus, tmp_path):
    """Rank 1 is SIGKILLed after step 3: the job fails within train.dist_timeout, plus a
    generous allowance for starting two ranks and tearing them down."""
    glob, cache = corpus
    dist_timeout = 60
    limit = dist_timeout + 90
    settings = {"train.max_steps": 1000, "train.save_interval": 0, "train.dist_timeout": dist_timeout}
    start = time.monotonic()
    proc = run_deepspeed(
        tiny_overrides(glob, cache, tmp_path / "dead", **settings),
        2,
        free_port(),
        timeout=limit + 50,
        PRECOND_FAULT="sigkill@3:1",
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < limit, f"the job outlived train.dist_timeout={dist_timeout} s + 90 s"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, precision):
    glob, cache = corpus
    run_dir = tmp_path / "nan"
    proc = run_single(tiny_overrides(glob, cache, run_dir, **{"train.precision": precision}), PRECOND_FAULT="nan@6")
    assert proc.returncode == 1
    assert "diverged" in proc.stderr and "step 6" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints/latest").read_text() == "global_step4"
    assert not (run_dir / "checkpoints/global_step6").exists()


def test_torchrun_two_ranks_zero1(corpus, tmp_path):
    glob, cache = corpus
    run_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "launcher.train", "--config", str(ROOT / "configs/tiny.yaml")]
    cmd += tiny_overrides(glob, cache, run_dir, **{"deepspeed.zero_stage": 1, "train.max_steps": 4})
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    check(proc)
    assert "world size 2, ZeRO stage 1" in proc.stdout and "deprecated" not in proc.stderr
    assert list(train_losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "checkpoints/latest").read_text() == "global_step4"


def test_two_nodes_on_localhost_without_ssh(corpus, tmp_path):
    glob, cache = corpus
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    run_dir = tmp_path / "nodes"
    procs = []
    for node in (0, 1):
        args = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1"]
        cmd = deepspeed_cmd(tiny_overrides(glob, cache, run_dir, **{"train.max_steps": 4}), 1, port, args)
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "world size 2" in outs[0][0]
    assert (run_dir / "checkpoints/latest").read_text() == "global_step4"


def test_bad_config_is_one_line_exit_2(tmp_path):
    proc = run_single([f"train.output_dir={tmp_path}/x", "train.precision=fp8"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.precision" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_user_deepspeed_json_merges_and_conflicts_are_errors(tmp_path):
    from core.errors import ConfigError
    from launcher.ds_config import build_ds_config
    from run.config import load_run_config

    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "flops_profiler": {}}))
    cfg = load_run_config(None, ["deepspeed.zero_stage=2", f"deepspeed.config={ok}"])
    merged = build_ds_config(cfg, world_size=2, precision="fp32")
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["train_batch_size"] == cfg.train.micro_batch_size * 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_run_config(None, [f"deepspeed.config={bad}"])
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=3 conflicts with zero_optimization.stage=0"):
        build_ds_config(cfg, world_size=1, precision="fp32")


def test_zero3_defaults_yield_to_the_user_json(tmp_path):
    """sub_group_size bounds the memory of ZeRO-3's optimizer step: ours unless the JSON sets it."""
    from launcher.ds_config import ZERO3_DEFAULTS, build_ds_config
    from run.config import load_run_config

    cfg = load_run_config(None, ["deepspeed.zero_stage=3"])
    assert build_ds_config(cfg, world_size=2, precision="bf16")["zero_optimization"]["sub_group_size"] == 50_000_000
    user = tmp_path / "z3.json"
    user.write_text(json.dumps({"zero_optimization": {"sub_group_size": 1000}}))
    cfg = load_run_config(None, ["deepspeed.zero_stage=3", f"deepspeed.config={user}"])
    assert build_ds_config(cfg, world_size=2, precision="bf16")["zero_optimization"]["sub_group_size"] == 1000
    cfg = load_run_config(None, ["deepspeed.zero_stage=2"])
    assert not ZERO3_DEFAULTS.keys() & build_ds_config(cfg, world_size=2, precision="bf16")["zero_optimization"].keys()
