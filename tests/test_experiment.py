"""The experiment runner end to end on a tiny budget, and its statistics on known numbers."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import yaml

from model.config import ModelConfig
from model.probe import PROBED
from research import experiment
from research import report as rep
from tests.train_helpers import ROOT, tiny_overrides

PNG = b"\x89PNG\r\n\x1a\n"
EVALS = [(100, 5.0), (200, 4.0), (300, 3.0)]  # (tokens, val loss)


@pytest.mark.parametrize(
    "compute, expected",
    [
        pytest.param(lambda: rep.val_at(EVALS, 150), pytest.approx(4.5), id="val_at-between-evals"),
        pytest.param(lambda: rep.val_at(EVALS, 100), 5.0, id="val_at-an-eval"),
        pytest.param(lambda: rep.val_at(EVALS, 400), None, id="val_at-past-the-last-eval"),
        pytest.param(lambda: rep.tokens_to_reach(EVALS, 3.5), pytest.approx(250.0), id="tokens_to_reach-between"),
        pytest.param(lambda: rep.tokens_to_reach(EVALS, 5.5), 100.0, id="tokens_to_reach-at-the-first-eval"),
        pytest.param(lambda: rep.tokens_to_reach(EVALS, 2.0), None, id="tokens_to_reach-never"),
        pytest.param(
            lambda: {k: rep.summary([1.0, 2.0, 3.0, None])[k] for k in ("mean", "sd", "min", "max", "n")},
            {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0, "n": 3},
            id="summary-leaves-out-None",
        ),
        pytest.param(lambda: rep.summary([4.0])["sd"], None, id="summary-of-one-has-no-sd"),
        pytest.param(lambda: "n=1" in rep.fmt_summary(rep.summary([4.0])), True, id="fmt_summary-says-n"),
        pytest.param(lambda: rep.median([1.0, math.inf, math.inf]), math.inf, id="median-with-infinities"),
        pytest.param(lambda: rep.jsonable({"a": [math.inf, (1, 2.5)]}), {"a": ["inf", [1, 2.5]]}, id="jsonable"),
    ],
)
def test_statistics_on_known_curves(compute, expected):
    assert compute() == expected


DEFAULT = ModelConfig().precondition  # the verdict weighs the shipped default against the best


@pytest.mark.parametrize(
    "other, base, spread, expected",
    [
        ("qkv", 2.5, 0.01, ["`qkv` vs `none`: 0.5000 lower", "larger than 2 SE"]),
        ("qkv", 2.95, 0.3, ["not distinguishable from seed noise", "seeds per variant"]),
        (DEFAULT, 3.5, 0.01, [f"- Default (`{DEFAULT}`) versus the best here: `none` vs `{DEFAULT}`: 0.5000 lower"]),
    ],
    ids=["clear-signal", "seed-noise", "default-worse-than-none"],
)
def test_verdict_separates_signal_from_noise(other, base, spread, expected):
    """`none` ends at 3.0 + spread * seed over seeds 1-3; `other` at base + spread * seed."""
    args = SimpleNamespace(seeds=[1, 2, 3], variants=["none", other])
    layer = {n: 10.0 for n in PROBED}

    def run(final):
        return {"evals": [(10, 6.0), (20, final)], "cond_after": [layer], "cond_before": [layer]}

    results = {("none", s): run(3.0 + spread * s) for s in (1, 2, 3)}
    results |= {(other, s): run(base + spread * s) for s in (1, 2, 3)}
    text = "\n".join(rep.verdict(args, results))
    for line in expected:
        assert line in text


def test_loss_table_gives_the_spread_of_tokens_to_target():
    args = SimpleNamespace(seeds=[1, 2, 3], variants=["none", "qk"])

    def run(evals):
        return {"evals": evals, "tokens_per_sec": 1000.0}

    # target 4.0: none reaches it at 200, 300 and 400 tokens; qk at 150 and 250, one seed never
    results = {("none", s): run([(100, 6.0), (100 + 100 * s, 4.0)]) for s in (1, 2, 3)}
    results |= {("qk", 1): run([(100, 5.0), (200, 3.0)]), ("qk", 2): run([(200, 5.0), (300, 3.0)])}
    results |= {("qk", 3): run([(100, 6.0), (200, 4.5)])}
    rows = {line.split("|")[1].strip(): line for line in rep.loss_table(args, results, 4.0)[2:]}
    assert "| 300 ± 100 (200-400, n=3) |" in rows["`none`"]
    assert "| 200 ± 71 (150-250, n=2) (1/3 never) |" in rows["`qk`"]


@pytest.mark.slow
def test_experiment_runs_and_reports(corpus, tmp_path, capsys, subtests):
    """Three passes over one experiment, each a subtest: the runs and their report, a second
    pass that skips the finished runs, and --report-only while a run is unfinished."""
    glob, cache = corpus
    over = tiny_overrides(glob, cache, tmp_path / "unused", **{"train.save_interval": 8})
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--name", "smoke", "--seeds", "3", "--variants", "none,qkv"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "docs"), "--probe-batch", "2", *over]
    argv += ["--variant-set", "qkv:train.lr=0.002"]
    out = tmp_path / "docs" / "smoke"
    with subtests.test("first pass: runs and report"):
        assert experiment.main(argv) == 0
        readme = (out / "README.md").read_text()
        assert "- `qkv` alone: `train.lr=0.002`" in readme and "lr per variant" in readme
        lrs = {
            v: yaml.safe_load((tmp_path / "runs" / "smoke" / f"{v}-seed3" / "config.yaml").read_text())
            for v in ("none", "qkv")
        }
        assert lrs["qkv"]["train"]["lr"] == 0.002 and lrs["none"]["train"]["lr"] != 0.002
        assert "| `none` |" in readme and "| `qkv` |" in readme and "final val loss" in readme
        assert "O before" in readme and "## What this shows" in readme
        for png in ("val_loss.png", "conditioning.png"):
            assert (out / png).read_bytes()[:8] == PNG, png
        results = json.loads((out / "results.json").read_text())
        assert set(results) == {"none-seed3", "qkv-seed3"}
        run = results["qkv-seed3"]
        assert [t for t, _ in run["evals"]] == [0, 128, 256] and len(run["cond_after"]) == 2  # 0: the untrained loss
        assert len(run["cond_before"]) == 2 and set(run["cond_after"][0]) == set(PROBED)
        # same seed, same init: the plain-attention numbers before training agree across variants
        assert results["none-seed3"]["cond_before"][0]["O"] == pytest.approx(run["cond_before"][0]["O_plain"])
    with subtests.test("second pass: finished runs are skipped"):
        capsys.readouterr()
        assert experiment.main(argv) == 0
        assert capsys.readouterr().out.count("already finished") == 2
    with subtests.test("--report-only while a run is still training: left out, counted, not probed"):
        qkv_run = tmp_path / "runs" / "smoke" / "qkv-seed3"
        (qkv_run / "checkpoints" / "latest").write_text("global_step4")  # cut short before step 8
        (qkv_run / "cond_after.json").unlink()
        assert experiment.main([*argv, "--report-only"]) == 0
        readme = (out / "README.md").read_text()
        assert "--report-only" not in readme and "--variant-set qkv:train.lr=0.002" in readme
        assert "**Partial: 1 of 2 runs finished**" in readme and "| `none` |" in readme and "| `qkv` |" not in readme
        assert set(json.loads((out / "results.json").read_text())) == {"none-seed3"}
        assert not (qkv_run / "cond_after.json").exists()


def test_bad_variant_is_a_one_line_error(capsys):
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--variants", "none,bogus"]
    assert experiment.run_main(experiment.main, argv) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and len(err.strip().splitlines()) == 1


def sweep_run(*losses, failed=False) -> dict:
    """A run's result: its val losses, evaluated every 10 tokens."""
    return {"evals": [(10 * i, x) for i, x in enumerate(losses, 1)], "failed": failed}


@pytest.mark.parametrize(
    "result, diverged",
    [
        (sweep_run(6.0, math.nan), True),
        (sweep_run(6.0, 6.5), True),
        (sweep_run(), True),
        (sweep_run(6.0, 5.0, failed=True), True),
        (sweep_run(6.0, 5.0), False),
    ],
    ids=["nan-loss", "loss-rose", "no-evals", "failed-run", "loss-fell"],
)
def test_sweep_marks_divergence(result, diverged):
    assert rep.diverged(result) == diverged


def test_sweep_finds_the_best_point():
    points = [{"name": f"lr={lr}", "values": {"train.lr": lr}} for lr in (1e-4, 1e-3, 3e-3, 1e-2)]
    args = SimpleNamespace(seeds=[1, 2], variants=["qkv"], points=points)
    finals = {"lr=0.0001": (5.5, 5.7), "lr=0.001": (5.0, 5.1), "lr=0.003": (5.1, 5.12), "lr=0.01": (5.0, 7.0)}
    results = {(p, "qkv", s): sweep_run(6.0, x) for p, xs in finals.items() for s, x in zip((1, 2), xs, strict=True)}
    table = rep.point_finals(args, results)["qkv"]
    assert table["lr=0.01"]["diverged"] == 1 and table["lr=0.01"]["n"] == 1
    assert rep.best_point(table) == "lr=0.001" and table["lr=0.001"]["mean"] == pytest.approx(5.05)
    assert rep.near_best(table) == ["lr=0.001", "lr=0.003"]
    assert rep.width_text(args, rep.near_best(table)) == "2 of 4 points (0.001..0.003)"
    assert rep.finals_cell(table["lr=0.01"]).endswith("(1/2 diverged)")
    assert rep.finals_cell(rep.summary([]) | {"diverged": 2, "runs": 2}) == "diverged"
    lines = "\n".join(rep.best_table(args, {"qkv": table}))
    assert "| `qkv` | `lr=0.001` | 5.0500 ± 0.0707" in lines


def test_sensitivity_caps_a_finished_point_above_ln_vocab():
    """A point that finished without diverging can still end above ln V (the loss of a uniform
    guess): it counts as ln V, as Wortsman et al. cap it, not at its raw loss."""
    points = [{"name": f"lr={lr}", "values": {"train.lr": lr}} for lr in (1e-3, 3e-2)]
    args = SimpleNamespace(seeds=[1, 2], variants=["none"], points=points)

    def run(*losses):
        return {"evals": [(100 * i, x) for i, x in enumerate(losses, 1)], "failed": False}

    results = {
        ("lr=0.001", "none", 1): run(9.0, 5.0),
        ("lr=0.001", "none", 2): run(9.0, 5.2),
        ("lr=0.03", "none", 1): run(10.0, 9.0),  # falling, so not diverged, but above ln 4096 = 8.318
        ("lr=0.03", "none", 2): run(10.0, 9.2),
    }
    finals = rep.point_finals(args, results)["none"]
    cap = math.log(4096)
    assert finals["lr=0.03"]["diverged"] == 0 and finals["lr=0.03"]["mean"] == pytest.approx(9.1)
    assert finals["lr=0.03"]["mean"] > cap
    assert rep.sensitivity(finals, cap) == pytest.approx((5.1 + cap) / 2 - 5.1)  # not (5.1 + 9.1) / 2 - 5.1


def test_sweep_sensitivity_and_tokens_to_target():
    points = [{"name": f"lr={lr}", "values": {"train.lr": lr}} for lr in (1e-3, 2e-3, 4e-3)]
    args = SimpleNamespace(seeds=[1, 2], variants=["none", "qk"], points=points)

    def run(*losses, **extra):
        return {"evals": [(100 * i, x) for i, x in enumerate(losses, 1)], "failed": False, **extra}

    results = {
        ("lr=0.001", "none", 1): run(7.0, 6.0, 5.0),
        ("lr=0.001", "none", 2): run(7.0, 6.0, 5.2),  # none's best: mean 5.1
        ("lr=0.002", "none", 1): run(7.0, 6.5, 5.6),
        ("lr=0.002", "none", 2): run(7.0, 6.5, 5.4),
        ("lr=0.004", "none", 1): run(7.0, 8.0, math.nan),
        ("lr=0.004", "none", 2): run(7.0, 9.0, 9.5),  # both diverged
        ("lr=0.001", "qk", 1): run(7.0, 5.5, 5.0),
        ("lr=0.001", "qk", 2): run(7.0, 5.5, 5.0),
        ("lr=0.002", "qk", 1): run(7.0, 5.1, 4.9),  # qk's best: reaches 5.1 at 200 tokens
        ("lr=0.002", "qk", 2): run(7.0, 6.1, 4.9),  # reaches 5.1 at 200 + 100 * 1.0/1.2
        ("lr=0.004", "qk", 1): run(7.0, 6.0, 5.5),
        ("lr=0.004", "qk", 2): run(7.0, 6.0),  # cut short: left out, not counted as diverged
    }
    results[("lr=0.004", "qk", 2)]["unfinished"] = True
    finals = rep.point_finals(args, results)
    assert finals["none"]["lr=0.004"]["diverged"] == 2 and finals["qk"]["lr=0.004"]["unfinished"] == 1
    assert rep.finals_cell(finals["qk"]["lr=0.004"]).endswith("(1/2 unfinished)")
    assert rep.done(finals["none"]) == 3  # a diverged point is finished
    partial = {p: finals["qk"][p] | {"n": 0} if p == "lr=0.004" else finals["qk"][p] for p in finals["qk"]}
    assert rep.done(partial) == 2
    assert rep.width_text(args, rep.near_best(partial), 2) == "2 of the 2 points with a finished run (0.001..0.002)"
    cap = math.log(4096)
    # mean over points of min(final, cap) - best; a diverged point counts as the cap
    assert rep.sensitivity(finals["none"], cap) == pytest.approx((5.1 + 5.5 + cap) / 3 - 5.1)
    assert rep.sensitivity(finals["qk"], cap) == pytest.approx((5.0 + 4.9 + 5.5) / 3 - 4.9)
    table, target = rep.reach_table(args, results, finals)
    assert target == pytest.approx(5.1)
    # none seed 1 crosses 5.1 at 200 + 100 * 0.9 / 1.0 = 290, seed 2 never; qk at 200 and 200 + 100 / 1.2
    qk_mean = (200 + 200 + 100 / 1.2) / 2
    text = "\n".join(table)
    assert "| `none` | `lr=0.001` | 290 (1/2 never) | - |" in text
    assert f"| `qk` | `lr=0.002` | 242 ± 59 (200-283, n=2) | {qk_mean / 290:.2f}x |" in text
    verdict = "\n".join(rep.sweep_verdict(args, SimpleNamespace(model=SimpleNamespace(vocab_size=4096)), finals))
    assert "`qk` vs `none`: 0.2000 lower" in verdict and "LR sensitivity" in verdict


@pytest.mark.slow
def test_sweep_runs_and_reports(corpus, tmp_path, capsys, subtests):
    """Four passes over one sweep, each a subtest: the runs (two at once) and their report, a
    second pass that skips the finished runs, a third with the runs gone but the report there,
    and --report-only after a run failed."""
    glob, cache = corpus
    extra = {"train.max_steps": 2, "train.eval_interval": 1, "train.save_interval": 2, "train.warmup_steps": 1}
    over = tiny_overrides(glob, cache, tmp_path / "unused", **extra)
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--name", "sw", "--seeds", "1", "--variants", "none,qkv"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "docs"), "--probe-batch", "2"]
    argv += ["--conditioning-interval", "0", "--sweep", "train.lr=1e-3,3e-3", "--jobs", "2", *over]
    out = tmp_path / "docs" / "sw"
    with subtests.test("first pass: runs and report"):
        assert experiment.main(argv) == 0
        for point in ("lr=0.001", "lr=0.003"):
            for v in ("none", "qkv"):
                assert (tmp_path / "runs" / "sw" / point / f"{v}-seed1" / "metrics.jsonl").is_file(), (point, v)
        results = json.loads((out / "results.json").read_text())
        assert set(results) == {f"{p}/{v}-seed1" for p in ("lr=0.001", "lr=0.003") for v in ("none", "qkv")}
        readme = (out / "README.md").read_text()
        assert "| `lr=0.001` |" in readme and "| `lr=0.003` |" in readme
        assert "| point | `none` | `qkv` |" in readme and "| `qkv` | `lr=0.00" in readme
        assert "## Tokens to `none`'s best loss" in readme and "LR sensitivity" in readme
        for png in ("sweep.png", "best_curves.png"):
            assert (out / png).read_bytes()[:8] == PNG, png
        # two runs at once, each on its share of the cores
        threads = yaml.safe_load((tmp_path / "runs" / "sw" / "lr=0.001" / "none-seed1" / "config.yaml").read_text())
        assert threads["train"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    with subtests.test("second pass: finished runs are skipped"):
        capsys.readouterr()
        assert experiment.main(argv) == 0
        assert capsys.readouterr().out.count("already finished") == 4
    with subtests.test("runs not on disk come from the report's results.json when their settings match"):
        before = json.loads((out / "results.json").read_text())
        at = argv.index("--runs-dir") + 1
        moved = [*argv[:at], str(tmp_path / "elsewhere"), *argv[at + 1 :]]  # as on another machine
        capsys.readouterr()
        assert experiment.main(moved) == 0
        assert capsys.readouterr().out.count("finished in") == 4 and not (tmp_path / "elsewhere").exists()
        assert json.loads((out / "results.json").read_text()) == before
        args = experiment.parse_args([*moved, "train.grad_clip=0.5"])
        assert not any(run.reported for run in experiment.plan(args, experiment.check_args(args)))
    with subtests.test("--report-only after a run failed: marked on disk, counted as diverged"):
        (tmp_path / "runs" / "sw" / "lr=0.003" / "qkv-seed1" / experiment.FAILED).write_text("training failed\n")
        assert experiment.main([*argv, "--report-only"]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["lr=0.003/qkv-seed1"]["failed"] and not results["lr=0.001/qkv-seed1"]["failed"]
    with subtests.test("a run refused in one line stops the sweep with its line and is no divergence"):
        broken = tmp_path / "runs" / "sw" / "lr=0.001" / "none-seed1"
        (broken / "checkpoints" / "latest").write_text("global_step99")
        capsys.readouterr()
        assert experiment.run_main(experiment.main, [*argv, "train.max_steps=3"]) == 2  # every run unfinished
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert f"{broken}: training refused to start:" in err and "global_step99, which does not exist" in err
        assert not (broken / experiment.FAILED).exists()
        assert not (tmp_path / "runs" / "sw" / "lr=0.003" / "none-seed1" / "checkpoints" / "global_step3").exists()


@pytest.mark.parametrize(
    "spec, words",
    [
        ("train.bogus=1,2", "unknown key"),
        ("lr=1e-3,3e-3", "section.key"),
        ("train.lr=", "empty value list"),
        ("train.lr=abc,1e-3", "train.lr"),
        ("model.precondition=none,qkv", "--variants"),
    ],
    ids=["unknown-key", "no-section", "no-values", "bad-value", "variants-by-sweep"],
)
def test_bad_sweep_is_a_one_line_error(capsys, spec, words):
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--sweep", spec]
    assert experiment.run_main(experiment.main, argv) == 2
    err = capsys.readouterr().err
    assert "--sweep" in err and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--variant-set", "qkv"], "VARIANT:section.key=value"),
        (["--variant-set", "row:train.lr=0.01"], "not one of --variants"),
        (["--variant-set", "qk:train.seed=3"], "set by the experiment"),
        (["--variant-set", "qk:train.lr=-1"], "train.lr"),
        (["--jobs", "0"], "--jobs"),
        (["--variant-set", "qk:train.lr=0.008", "--sweep", "train.lr=1e-3,3e-3"], "train.lr is swept"),
        (["--seeds", "1,1"], "--seeds '1,1': expected different"),
        (["--seeds", ""], "--seeds '': expected"),
        (["--seeds", "-5"], "--seeds '-5': expected different comma-separated ints >= 0"),
        (["--variants", "qk,qk"], "a variant is named twice"),
    ],
    ids=[
        "no-setting",
        "unknown-variant",
        "seed-is-the-experiments",
        "bad-value",
        "no-jobs",
        "swept-key",
        "seed-twice",
        "no-seeds",
        "negative-seed",
        "variant-twice",
    ],
)
def test_bad_variant_set_or_jobs_is_a_one_line_error(capsys, extra, words):
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--variants", "none,qk,qkv", *extra]
    assert experiment.run_main(experiment.main, argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def fake_run(final: float, logits: tuple[float, float] = (3.0, 5.0)) -> dict:
    """A finished sweep run as results.json holds it: three evaluations, one layer's largest
    logit logged at steps 50 and 100 (`logits`), kappa(O) 7 at the end."""
    logged = {"logit/layer0/max": [[50, logits[0]], [100, logits[1]]], "cond/layer0/O": [[50, 9.0], [100, 7.0]]}
    return {"evals": [[0, 8.3], [100, 6.0], [200, final]], "cond_logged": logged, "failed": False}


def test_width_report_across_sweeps(tmp_path, capsys):
    """Two widths from three sweeps (d256's lr 0.002 replaced by a later sweep): best lr, LR
    sensitivity (a diverged point counts as ln V), the trend and the logit reading, by hand."""
    from research import width

    nan = (math.nan, math.nan)
    finals = {  # width -> (lr, variant) -> final loss of seeds 1 and 2
        128: {(0.001, "none"): (4.0, 4.2), (0.002, "none"): (4.5, 4.5), (0.001, "qk"): (4.3, 4.3),
              (0.002, "qk"): (4.0, 4.0)},
        256: {(0.001, "none"): nan, (0.002, "none"): (9.9, 9.9), (0.001, "qk"): (4.1, 4.1), (0.002, "qk"): (4.2, 4.2)},
    }  # fmt: skip
    for w, sweep in finals.items():
        runs = {f"lr={lr:g}/{v}-seed{s}": fake_run(x[s - 1]) for (lr, v), x in sweep.items() for s in (1, 2)}
        runs |= {"lr=0.001/qkv-seed1": fake_run(4.0)} if w == 256 else {}  # a variant not at every width
        (tmp_path / f"d{w}").mkdir()
        (tmp_path / f"d{w}" / "results.json").write_text(json.dumps(runs))
    later = {f"lr=0.002/none-seed{s}": fake_run(4.0, logits=(6.0, 2.0)) for s in (1, 2)}
    later["lr=0.001/qk-seed2"] = {"evals": [], "unfinished": True}  # not yet retrained: d256's stays
    (tmp_path / "d256b").mkdir()
    (tmp_path / "d256b" / "results.json").write_text(json.dumps(later))
    argv = ["--config", str(ROOT / "configs/lr-sweep-cpu.yaml"), "--name", "w", "--reports", str(tmp_path)]
    argv += ["--out-dir", str(tmp_path / "out"), "--width", "128=d128", "--width", "256=d256,d256b"]
    assert width.main(argv) == 0
    data = json.loads((tmp_path / "out" / "w" / "summary.json").read_text())
    d128, d256 = data["widths"]["128"]["variants"], data["widths"]["256"]["variants"]
    assert list(d128) == list(d256) == ["none", "qk"]
    assert (d128["none"]["best_lr"], d128["qk"]["best_lr"], d256["none"]["best_lr"]) == (0.001, 0.002, 0.002)
    assert d128["none"]["sensitivity"] == pytest.approx(0.2) and d128["qk"]["sensitivity"] == pytest.approx(0.15)
    assert d256["none"]["sensitivity"] == pytest.approx((math.log(4096) + 4.0) / 2 - 4.0)  # lr 0.001 diverged
    assert d256["none"]["probe"]["logit_end"]["mean"] == 2.0 and d256["none"]["probe"]["logit_peak"]["mean"] == 6.0
    assert d256["qk"]["probe"]["logit_end"]["mean"] == 5.0 and d256["qk"]["probe"]["kappa_O_end"]["mean"] == 7.0
    assert d256["qk"]["finals"]["lr=0.001"]["n"] == 2
    readme = (tmp_path / "out" / "w" / "README.md").read_text()
    assert "`none`: LR sensitivity d128 0.200, d256 2.159 nats: grows with width." in readme
    assert "`qk`: LR sensitivity d128 0.150, d256 0.050 nats: shrinks with width." in readme
    assert "from `d256`, `d256b`" in readme and "From `d256b`: `lr=0.002/none`; the rest from `d256`." in readme
    assert "model.d_model=256 model.n_heads=4 model.n_kv_heads=2" in readme
    for png in ("loss_vs_lr.png", "sensitivity.png"):
        assert (tmp_path / "out" / "w" / png).read_bytes()[:8] == PNG, png
    assert data["settled"] == [] and "only |" not in readme  # every point settled: no provisional view
    capsys.readouterr()
    from core.cli import run_main

    assert run_main(width.main, [*argv[:-4], "--width", "100=d128", "--width", "256=d256"]) == 2
    assert "--width 100: expected a multiple of 128" in capsys.readouterr().err


def test_a_partial_width_study_compares_the_widths_on_the_points_all_have_finished(tmp_path):
    """d256's `none` at lr 0.002 unfinished: its full sensitivity is unknown, and every width's is
    also taken over lr 0.001, 0.004, 0.008 (finished everywhere), by hand: mean minus the best."""
    from research import width

    finals = {  # width -> variant -> final loss at lr 0.001, 0.002, 0.004, 0.008 (None: unfinished)
        128: {"none": (4.4, 4.2, 4.0, 4.6), "qk": (4.3, 4.1, 4.0, 4.1)},
        256: {"none": (4.3, None, 4.1, 5.0), "qk": (4.2, 4.0, 4.0, 4.1)},
    }
    unfinished = {"evals": [], "unfinished": True}
    for w, sweep in finals.items():
        runs = {
            f"lr={lr:g}/{v}-seed1": unfinished if x is None else fake_run(x)
            for v, losses in sweep.items()
            for lr, x in zip((0.001, 0.002, 0.004, 0.008), losses, strict=True)
        }
        (tmp_path / f"d{w}").mkdir()
        (tmp_path / f"d{w}" / "results.json").write_text(json.dumps(runs))
    argv = ["--config", str(ROOT / "configs/lr-sweep-cpu.yaml"), "--name", "w", "--reports", str(tmp_path)]
    assert width.main([*argv, "--out-dir", str(tmp_path / "out"), "--width", "128=d128", "--width", "256=d256"]) == 0
    data = json.loads((tmp_path / "out" / "w" / "summary.json").read_text())
    assert data["settled"] == [0.001, 0.004, 0.008]
    d128, d256 = data["widths"]["128"]["variants"], data["widths"]["256"]["variants"]
    assert d256["none"]["sensitivity"] is None and d128["none"]["sensitivity"] == pytest.approx(0.3)
    assert d128["none"]["sensitivity_settled"] == pytest.approx(1 / 3)
    assert d256["none"]["sensitivity_settled"] == pytest.approx((4.3 + 4.1 + 5.0) / 3 - 4.1)
    assert d128["qk"]["sensitivity_settled"] == pytest.approx((4.3 + 4.0 + 4.1) / 3 - 4.0)
    assert d256["qk"]["sensitivity_settled"] == pytest.approx(0.1)
    readme = (tmp_path / "out" / "w" / "README.md").read_text()
    assert "LR sensitivity over lr 0.001, 0.004, 0.008 only |" in readme
    assert "`none`: LR sensitivity d128 0.300, d256 n/a nats: not yet known (unfinished points)." in readme
    assert (
        "`none`: over the learning rates every width has finished (lr 0.001, 0.004, 0.008), LR sensitivity "
        "d128 0.333, d256 0.367 nats: grows with width on those points" in readme
    )
    assert (
        "`qk`: over the learning rates every width has finished (lr 0.001, 0.004, 0.008), LR sensitivity "
        "d128 0.133, d256 0.100 nats: shrinks with width on those points" in readme
    )
