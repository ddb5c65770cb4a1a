"""Run on 2 ranks by tests/test_zero3_init.py: the trainer's ZeRO-3 model is sharded as soon as
it is built, and holds the same initial weights as the trainer's ZeRO-0 build (same seed).

    deepspeed --num_gpus 2 tests/zero3_init_check.py OUT_PREFIX PRECISION:TIE[,...] [section.key=value ...]

For each case (train.precision, model.tie_embeddings), e.g. `fp32:false,bf16:true`, each rank
writes OUT_PREFIX.PRECISION-TIE.rankN.json: per parameter, the elements it holds locally after
construction, and whether the gathered ZeRO-3 weight equals the ZeRO-0 build's bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=None)  # set by the deepspeed launcher
    p.add_argument("out_prefix")
    p.add_argument("cases")
    p.add_argument("overrides", nargs="*")
    return p.parse_args()


def build(cfg, stage: int):
    """The trainer's model for ZeRO `stage` (what the trainer hands to DeepSpeed)."""
    from launcher import distributed as dist
    from launcher.ds_config import build_ds_config
    from launcher.engine import build_model
    from launcher.precision import resolve_precision
    from model import param_groups

    cfg = copy.deepcopy(cfg)
    cfg.deepspeed.zero_stage = stage
    precision = resolve_precision(cfg.train.precision, torch.device("cpu")).name
    model = build_model(cfg, build_ds_config(cfg, dist.world_size(), precision))
    groups = [[name for name, _ in group] for group in param_groups(model)]
    return model, groups, precision


def check_case(cfg) -> dict:
    """The ZeRO-3 build against the ZeRO-0 build of `cfg`."""
    import deepspeed

    from launcher import distributed as dist

    sharded, sharded_groups, precision = build(cfg, 3)
    local = {name: p.numel() for name, p in sharded.named_parameters()}  # before anything is gathered
    partition = {name: getattr(p, "ds_tensor", p).numel() for name, p in sharded.named_parameters()}
    whole, whole_groups, _ = build(cfg, 0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # what DeepSpeed casts the module to
    equal = {}
    for (name, p), (_, q) in zip(sharded.named_parameters(), whole.named_parameters(), strict=True):
        with deepspeed.zero.GatheredParameters(p):
            equal[name] = p.dtype == dtype and torch.equal(p.detach().cpu(), q.detach().to(dtype))
    result = dict(local=local, partition=partition, numel={n: p.numel() for n, p in whole.named_parameters()})
    result.update(equal=equal, groups_equal=sharded_groups == whole_groups, world_size=dist.world_size())
    return result


def main() -> int:
    from launcher import distributed as dist
    from run.config import load_run_config

    args = parse_args()
    dist.prepare_environment(threads=1)
    dist.init(60)
    for case in args.cases.split(","):
        precision, tie = case.split(":")
        cfg = load_run_config(None, [*args.overrides, f"train.precision={precision}", f"model.tie_embeddings={tie}"])
        result = check_case(cfg)
        Path(f"{args.out_prefix}.{precision}-{tie}.rank{dist.rank()}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
