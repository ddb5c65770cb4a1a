"""The experiment runner end to end on a tiny budget, and its statistics on known numbers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from launcher import experiment
from launcher import experiment_report as rep
from launcher.probe import PROBED
from tests.train_helpers import ROOT, tiny_overrides, write_corpus

PNG = b"\x89PNG\r\n\x1a\n"


def test_statistics_on_known_curves():
    evals = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert rep.val_at(evals, 150) == pytest.approx(4.5) and rep.val_at(evals, 100) == 5.0
    assert rep.val_at(evals, 400) is None
    assert rep.tokens_to_reach(evals, 3.5) == pytest.approx(250.0)
    assert rep.tokens_to_reach(evals, 5.5) == 100.0 and rep.tokens_to_reach(evals, 2.0) is None
    s = rep.summary([1.0, 2.0, 3.0, None])
    assert (s["mean"], s["sd"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert rep.summary([4.0])["sd"] is None and "n=1" in rep.fmt_summary(rep.summary([4.0]))
    assert rep.median([1.0, math.inf, math.inf]) == math.inf
    assert rep.jsonable({"a": [math.inf, (1, 2.5)]}) == {"a": ["inf", [1, 2.5]]}


def test_verdict_separates_signal_from_noise():
    args = SimpleNamespace(seeds=[1, 2, 3], variants=["none", "qkv"])
    layer = {n: 10.0 for n in PROBED}

    def run(final):
        return {"evals": [(10, 6.0), (20, final)], "cond_after": [layer], "cond_before": [layer]}

    clear = {("none", s): run(3.0 + 0.01 * s) for s in (1, 2, 3)} | {("qkv", s): run(2.5 + 0.01 * s) for s in (1, 2, 3)}
    text = "\n".join(rep.verdict(args, clear))
    assert "`qkv` vs `none`: 0.5000 lower" in text and "larger than 2 SE" in text
    noisy = {("none", s): run(3.0 + 0.3 * s) for s in (1, 2, 3)} | {("qkv", s): run(2.95 + 0.3 * s) for s in (1, 2, 3)}
    text = "\n".join(rep.verdict(args, noisy))
    assert "not distinguishable from seed noise" in text and "seeds per variant" in text


@pytest.mark.slow
def test_experiment_runs_and_reports(tmp_path, capsys):
    glob = write_corpus(tmp_path / "corpus")
    over = tiny_overrides(glob, tmp_path / "cache", tmp_path / "unused", **{"train.save_interval": 8})
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--name", "smoke", "--seeds", "3", "--variants", "none,qkv"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "docs"), "--probe-batch", "2", *over]
    assert experiment.main(argv) == 0
    out = tmp_path / "docs" / "smoke"
    readme = (out / "README.md").read_text()
    assert "| `none` |" in readme and "| `qkv` |" in readme and "final val loss" in readme
    assert "O before" in readme and "## What this shows" in readme
    for png in ("val_loss.png", "conditioning.png"):
        assert (out / png).read_bytes()[:8] == PNG
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"none-seed3", "qkv-seed3"}
    run = results["qkv-seed3"]
    assert [t for t, _ in run["evals"]] == [128, 256] and len(run["cond_after"]) == 2
    assert len(run["cond_before"]) == 2 and set(run["cond_after"][0]) == set(PROBED)
    # same seed, same init: the plain-attention numbers before training agree across variants
    assert results["none-seed3"]["cond_before"][0]["O"] == pytest.approx(run["cond_before"][0]["O_plain"])
    capsys.readouterr()
    assert experiment.main(argv) == 0  # resumable: finished runs are skipped
    assert capsys.readouterr().out.count("already finished") == 2


def test_bad_variant_is_a_one_line_error(capsys):
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--variants", "none,bogus"]
    assert experiment.run_main(experiment.main, argv) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and len(err.strip().splitlines()) == 1
