"""Training-step throughput: ours (DeepSpeed engine, our model) vs transformers' LlamaForCausalLM
with torch AdamW, at identical dimensions, batch, sequence length and precision.

    python bench/train_throughput.py [--config configs/tiny.yaml] [--rounds 5] [--steps 5]

Runs every variant in turn, round after round (so drift of the machine hits all), and prints
tokens/s of each, its ratio to the eager reference and its MFU against the bf16 (or fp32)
matmul peak measured here first. Variants: ours with the default preconditioner (`qk`) and
without, ours compiled (train.compile=true), and the reference eager and compiled, so a
compiled number is never compared with an eager one only. Then what train.compile costs: the
compile time (the compiled variant's warm-up less the eager one's) and the steps it takes to
repay it. Single process, ZeRO stage 0 (bf16: autocast over fp32 weights, as the trainer runs it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from launcher.precision import resolve_precision  # noqa: E402


def precision(cfg) -> str:
    return resolve_precision(cfg.train.precision, torch.device("cpu")).name


class RandomWindows:
    """Stands in for the data stream: uniform random token windows (throughput only)."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len
        self.g = torch.Generator().manual_seed(0)

    def next_batch(self, B: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (B, self.seq_len + 1), generator=self.g)


def build_ours(cfg):
    from launcher import distributed as dist
    from launcher.ds_config import build_ds_config
    from launcher.engine import Stepper, build_engine, build_model

    device, name = torch.device("cpu"), precision(cfg)
    ds_config = build_ds_config(cfg, dist.world_size(), name)
    engine, scheduler = build_engine(cfg, build_model(cfg, ds_config), ds_config, device)
    stepper = Stepper(cfg, engine, scheduler, RandomWindows(cfg.model.vocab_size, cfg.data.seq_len), device)
    return lambda: stepper(1)


def build_reference(cfg, compiled: bool = False):
    """LlamaForCausalLM with our dimensions (the exporter's config mapping for `none`) and optimizer."""
    import dataclasses

    from transformers import LlamaForCausalLM

    from export.convert import hf_config
    from launcher.optim import build_optimizer

    m = cfg.model
    hf_cfg = hf_config(dataclasses.replace(m, precondition="none"), {}, torch.float32)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.train.seed)
    model = LlamaForCausalLM(hf_cfg)
    if compiled:
        model.compile()
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))  # ours: the same AdamW and param groups
    stream = RandomWindows(m.vocab_size, cfg.data.seq_len)
    bf16 = precision(cfg) == "bf16"

    def step() -> float:
        batch = stream.next_batch(cfg.train.micro_batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of the fastest of `reps` (n x n) @ (n x n) products on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(timed(lambda: a @ b, 1) for _ in range(reps))
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from launcher import distributed
    from model.transformer import flops_per_token
    from run.config import load_run_config

    cfg = load_run_config(args.config, ["train.output_dir=runs/bench", "log.progress=false", *args.overrides])
    distributed.prepare_environment(cfg.train.threads)
    distributed.init(cfg.train.dist_timeout)
    peak = matmul_peak(torch.bfloat16 if precision(cfg) == "bf16" else torch.float32)
    default = cfg.model.precondition
    variants = {}
    for precondition, compiled in (("none", False), (default, False), (default, True)):
        over = ["train.output_dir=runs/bench", f"model.precondition={precondition}", f"train.compile={compiled}"]
        c = load_run_config(args.config, [*over, *args.overrides])
        variants[f"ours ({precondition}{', compiled' if compiled else ''})"] = build_ours(c)
    variants["transformers Llama"] = build_reference(cfg)
    variants["transformers Llama (compiled)"] = build_reference(cfg, compiled=True)
    warmup = {}
    for name, step in variants.items():  # warm-up (and the compile, timed)
        warmup[name] = timed(step, 2)
        print(f"warm-up {name}: {warmup[name]:.1f} s", flush=True)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len * args.steps
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            results[name].append(tokens / timed(step, args.steps))
    ref = statistics.median(results["transformers Llama"])
    m, t = cfg.model, cfg.train
    flops = flops_per_token(m, cfg.data.seq_len)
    print(
        f"model d_model={m.d_model} layers={m.n_layers} heads={m.n_heads}/{m.n_kv_heads} vocab={m.vocab_size}; "
        f"batch {t.micro_batch_size} x {cfg.data.seq_len}; {precision(cfg)}; threads {torch.get_num_threads()}; "
        f"median of {args.rounds} rounds x {args.steps} steps; {precision(cfg)} matmul peak {peak / 1e9:.0f} GFLOP/s"
    )
    print(f"{'variant':<30} {'tokens/s':>10} {'min':>10} {'max':>10} {'vs reference':>13} {'MFU':>7}")
    for name, vals in results.items():
        med = statistics.median(vals)
        mfu = med * flops / peak
        print(f"{name:<30} {med:>10.0f} {min(vals):>10.0f} {max(vals):>10.0f} {med / ref:>12.2f}x {mfu:>6.1%}")
    eager, compiled = f"ours ({default})", f"ours ({default}, compiled)"
    step_eager = tokens / args.steps / statistics.median(results[eager])
    step_compiled = tokens / args.steps / statistics.median(results[compiled])
    compile_s = warmup[compiled] - warmup[eager]
    saved = step_eager - step_compiled
    repaid = f"after {compile_s / saved:.0f} steps" if saved > 0 else "never (the compiled step is not faster)"
    print(
        f"train.compile: compile {compile_s:.1f} s, step {step_eager * 1e3:.0f} -> {step_compiled * 1e3:.0f} ms: "
        f"repaid {repaid}"
    )


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
