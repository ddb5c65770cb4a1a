"""Train a model: `python -m launcher.train --config FILE [section.key=value ...]`.

Runs under the `deepspeed` launcher, under `torchrun`, or as one plain process.
"""

from __future__ import annotations

import argparse
import os
import sys

from core.cli import run_main
from core.config import help_parser
from core.errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from run.config import SECTIONS

    parser = help_parser("python -m launcher.train", __doc__.splitlines()[0], SECTIONS)
    parser.add_argument("--config", required=True, help="a run config YAML, e.g. configs/tiny.yaml")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from launcher import faults
    from launcher.stopping import StopRequest
    from run.config import check_run_dir, load_run_config
    from run.rundir import RunDir

    cfg = load_run_config(args.config, args.overrides)  # validate before starting anything heavy
    check_run_dir(cfg)
    cfg.deepspeed.check_files()
    if cfg.log.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("log.wandb=true: the wandb package is not installed; .venv/bin/pip install wandb==0.31.0")
    faults.load()
    run = RunDir(cfg.train.output_dir)
    stop = StopRequest(run)
    stop.install()  # a stop during the set-up below exits cleanly at the first step boundary

    import warnings

    # DeepSpeed's ZeRO calls a torch collective that torch marks deprecated: not the user's concern
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    from launcher import distributed

    distributed.prepare_environment(cfg.train.threads)
    first = os.environ.get("RANK", "0") == "0"
    made = False
    if first and not os.environ.get("PRECOND_RUN_LOCKED"):  # run_pretrain.sh holds it for its stages
        made = run.hold()
    distributed.init(cfg.train.dist_timeout)
    here = distributed.hosts()[distributed.rank()]
    # one write per line: the ranks of a node share the launcher's stdout
    sys.stdout.write(f"rank {distributed.rank()}/{distributed.world_size()} on {here}, pid {os.getpid()}\n")
    sys.stdout.flush()
    from launcher.trainer import DivergedError, Trainer

    if first:
        run.outcome.unlink(missing_ok=True)  # this attempt's own, if it fails
    try:
        return Trainer(cfg, stop).run()
    except DivergedError as e:
        if distributed.rank() == 0:
            last = run.latest_tag() or "none"
            message = f"training diverged: {e}; stopped without saving (latest checkpoint: {last})"
            run.record_outcome(restart=False, why=message)
            print(f"error: {message}", file=sys.stderr)
        return 1
    except ConfigError as e:
        if distributed.rank() == 0:
            if made:
                run.forget_if_empty()
            print(f"error: {e}", file=sys.stderr)
        return 2  # run_pretrain.sh does not restart after exit code 2
    except RuntimeError as e:
        if distributed.timed_out(e):
            message = distributed.timeout_message(cfg.train.dist_timeout)
        elif distributed.peer_lost(e):
            message = distributed.lost_message()
        else:
            raise
        if distributed.rank() == 0:
            run.record_outcome(restart=True, why=message)
        print(f"error: rank {distributed.rank()}: {message}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(run_main(main))
