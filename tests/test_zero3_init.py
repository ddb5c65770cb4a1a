"""ZeRO-3 builds the model sharded (deepspeed.zero.Init) with the initial weights of an
unsharded build: checked on 2 ranks over gloo, in fp32 and in bf16 mode."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest

from launcher.distributed import free_port
from tests.train_helpers import ROOT, check, env

pytestmark = pytest.mark.slow

# A tiny model; fp32 with an untied head, bf16 with a tied one
MODEL = ["model.vocab_size=301", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=48", "model.max_seq_len=32", "model.init_std=0.1", "train.seed=11",
         "data.seq_len=16", "data.vocab_size=300"]  # fmt: skip


def test_zero3_build_is_sharded_and_equals_the_unsharded_init(tmp_path):
    prefix = tmp_path / "check"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(ROOT / "tests" / "zero3_init_check.py"), str(prefix), "fp32:false,bf16:true", *MODEL]
    check(subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300))
    for case, rank in itertools.product(("fp32-false", "bf16-true"), (0, 1)):
        r = json.loads((tmp_path / f"check.{case}.rank{rank}.json").read_text())
        assert r["world_size"] == 2 and r["groups_equal"], case
        assert all(n == 0 for n in r["local"].values()), (case, r["local"])  # nothing whole is held after the build
        assert r["partition"] == {k: math.ceil(n / 2) for k, n in r["numel"].items()}, case
        assert r["equal"] and all(r["equal"].values()), (case, [k for k, ok in r["equal"].items() if not ok])
