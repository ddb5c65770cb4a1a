"""The training loop: data stream, evaluation, checkpoints, logs, stops and faults around the
engine and step of launcher/engine.py.

Legend: B micro batch, T sequence length, W world size.
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
import torch.nn.functional as F

from data import prepare_data, training_batches, validation_windows
from kernels import resolve_backend
from launcher import checkpoint, faults, memory
from launcher import distributed as dist
from launcher.checkpoint import TrainState
from launcher.ds_config import build_ds_config, precision_mode
from launcher.engine import Stepper, build_engine, build_model, parameter_count
from launcher.metrics import MetricsLogger, WandbSink
from launcher.precision import resolve_precision
from launcher.stopping import StopRequest
from model import flops_per_token
from run.config import RunConfig, save_run_config
from run.rundir import RunDir

PRECISION_NOTES = {
    "fp32": "",
    "bf16 autocast": ", torch autocast over fp32 weights (ZeRO-0), gradients all-reduced in bf16",
    "bf16 weights": ", DeepSpeed bf16 mode: fp32 master weights",
}
"""What the run summary adds to the precision line, by launcher.ds_config.precision_mode."""

# Dense bf16 peak FLOP/s per device for MFU; CPU: measured on the 2-core development machines.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "cpu-bf16": 1.0e12, "cpu-fp32": 0.23e12}


class DivergedError(RuntimeError):
    pass


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one device, None for a GPU not in PEAK_FLOPS (MFU then unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return PEAK_FLOPS[f"cpu-{precision}"]


class StepClock:
    """tokens/s over training time only: evaluation, the probe and saves are set aside (pause)."""

    def __init__(self, tokens: int):
        self.restart(tokens)

    def restart(self, tokens: int) -> None:
        self.start, self.tokens, self.paused = time.perf_counter(), tokens, 0.0

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def rate(self, tokens: int) -> float:
        """Tokens per second of training since the last restart, at `tokens` tokens seen."""
        seconds = time.perf_counter() - self.start - self.paused
        return (tokens - self.tokens) / max(seconds, 1e-9)


class Trainer:
    """A run, ready to train when built: data, engine, resumed state, logs. `run()` trains."""

    def __init__(self, cfg: RunConfig, stop: StopRequest):
        self.cfg, t = cfg, cfg.train
        self.rundir = RunDir(t.output_dir)
        self.is_main = dist.rank() == 0
        self.stop = stop
        self.stop_requested = False
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.precision_choice = resolve_precision(t.precision, self.device)
        self.precision = self.precision_choice.name
        zero = cfg.deepspeed.zero_stage
        self.precision_mode = precision_mode(zero, self.precision)  # recorded in every checkpoint
        resume_tag = checkpoint.check_resume(self.rundir, zero, self.precision_mode)
        self.prepared = self._prepare_data()
        self.stream = training_batches(
            self.prepared,
            rank=dist.rank(),
            world_size=dist.world_size(),
            seed=t.order_seed,
            batch_size=t.micro_batch_size,
            pin_memory=self.device.type == "cuda",
        )
        self.resume = self._plan_resume(resume_tag) if resume_tag else None
        self._prepare_run_dir()
        self.val = validation_windows(self.prepared)
        self.n_params = parameter_count(cfg)
        universal = bool(self.resume and self.resume.universal)
        ds_config = build_ds_config(cfg, dist.world_size(), self.precision, load_universal=universal)
        self.engine, scheduler = build_engine(cfg, build_model(cfg, ds_config), ds_config, self.device)
        self.train_step = Stepper(cfg, self.engine, scheduler, self.stream, self.device)
        self.state = TrainState()
        if self.resume:
            self.state, data_state = checkpoint.load(self.engine, self.rundir, self.resume)
            self.stream.load_state_dict(data_state)
        self.tokens_per_step = t.global_batch(dist.world_size()) * cfg.data.seq_len
        self.clock = StepClock(self.state.tokens)
        wandb = WandbSink(self.rundir, cfg.log, cfg.to_dict()) if cfg.log.wandb and self.is_main else None
        self.log = MetricsLogger(
            self.rundir,
            enabled=self.is_main,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total=t.max_steps,
            start=self.state.step,
            wandb=wandb,
        )

    def _prepare_data(self):
        """Rank 0 prepares (or finds) the data cache while the others wait, then they read it
        (quietly: run_pretrain.sh's prepare stage shows the progress)."""
        cfg = self.cfg
        if not self.is_main:
            dist.barrier()
        prepared = prepare_data(
            cfg.data, model_vocab_size=cfg.model.vocab_size, model_max_seq_len=cfg.model.max_seq_len
        )
        if self.is_main:
            dist.barrier()
        return prepared

    def _plan_resume(self, tag: str) -> checkpoint.Resume:
        """Check, before anything is written, that checkpoint `tag` resumes on this world size
        with this data pipeline; rank 0 warns when the global batch changed."""
        elastic = self.stream.elastic  # its state is the same on every rank and world size
        resume = checkpoint.plan_resume(self.rundir, tag, dist.world_size(), self.cfg.deepspeed.zero_stage, elastic)
        warning = resume.global_batch_warning(self.cfg.train.global_batch(dist.world_size()))
        if warning and self.is_main:
            print(warning, file=sys.stderr, flush=True)
        return resume

    def _prepare_run_dir(self) -> None:
        """Create the run dir, save the resolved config and keep the tokenizer (launcher.train
        has checked that a run it holds has the same model and data sections)."""
        if self.is_main:
            self.rundir.checkpoints.mkdir(parents=True, exist_ok=True)
            save_run_config(self.cfg, self.rundir.config)
            self.rundir.keep_tokenizer(self.prepared.tokenizer_dir)
        dist.barrier()

    # ---- the loop -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the fixed validation windows, split over ranks. Every rank runs
        the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
        B, W, r = self.cfg.train.micro_batch_size, dist.world_size(), dist.rank()
        mine = self.val[r::W]
        per_rank = math.ceil(len(self.val) / W)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.engine.eval()
        for start in range(0, per_rank, B):
            batch = mine[start : start + B]
            real = len(batch)
            batch = batch if real else self.val[:1]  # a padding pass, not counted
            batch_BT = batch.to(self.device)
            logits = self.engine(batch_BT[:, :-1]).logits
            if real:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch_BT[:, 1:].flatten(), reduction="sum")
                sums[0] += loss.double()
                sums[1] += batch_BT[:, 1:].numel()
        self.engine.train()
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def run(self) -> int:
        """Train to max_steps (or until a stop is requested), evaluating, logging and checkpointing."""
        cfg, t, state = self.cfg, self.cfg.train, self.state
        self._print_summary()
        last_saved = state.step
        try:
            if state.step == 0:  # the untrained loss (about ln V): where the curves start
                self._off_the_clock("eval", self._evaluate_row)
            self.clock.restart(state.tokens)
            while state.step < t.max_steps and not self._stop_agreed():
                loss = self.train_step(state.step + 1)
                state.step += 1
                state.tokens += self.tokens_per_step
                if not math.isfinite(loss):
                    raise DivergedError(f"loss is {loss} at step {state.step}")
                if state.step % t.log_interval == 0 or state.step == t.max_steps:
                    self._log_train(loss)
                if self._at_interval(t.eval_interval):
                    self._off_the_clock("eval", self._evaluate_row)
                if cfg.log.conditioning_interval and self._at_interval(cfg.log.conditioning_interval):
                    self._off_the_clock("cond", self._conditioning_row)
                if self._at_interval(t.save_interval):
                    self._off_the_clock("save", self._save)
                    last_saved = state.step
                faults.maybe_kill("sigkill", state.step, dist.rank())
                faults.maybe_slow("pause", state.step, dist.rank())
            if self.stop_requested:
                self._announce_stop(last_saved)
            if last_saved != state.step:
                self._save()
        finally:
            self.log.close()
            self.stream.close()
        self._print_end()
        return 0

    def _at_interval(self, interval: int) -> bool:
        """True every `interval` steps and at the last step (interval 0: only at the last)."""
        step = self.state.step
        return step == self.cfg.train.max_steps or (interval > 0 and step % interval == 0)

    # ---- what is logged -----------------------------------------------------------------
    def _off_the_clock(self, name: str, work) -> None:
        """Run `work` (it returns a metrics row) outside the training clock and log its seconds
        as NAME_seconds."""
        start = time.perf_counter()
        row = work()
        seconds = time.perf_counter() - start
        self.clock.pause(seconds)
        self.log.log(self.state.step, {**row, f"{name}_seconds": seconds})

    def _log_train(self, loss: float) -> None:
        tps = self.clock.rate(self.state.tokens)
        peak = self._peak_flops()
        mfu = tps * flops_per_token(self.cfg.model, self.cfg.data.seq_len) / peak if peak else None
        lr, grad_norm = self.train_step.lr, self.train_step.grad_norm
        row = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens=self.state.tokens, tokens_per_sec=tps)
        row.update(mfu=mfu, mem_gb=self._memory_gb())
        self.log.log(self.state.step, row)
        self.log.progress(self.state.step, loss=loss, tok_s=tps)
        self.clock.restart(self.state.tokens)

    def _peak_flops(self) -> float | None:
        """The whole job's peak: per device (train.peak_flops, else by name) times devices (on a CPU,
        the nodes: the ranks of a node share its cores)."""
        per_device = self.cfg.train.peak_flops or peak_flops(self.device, self.precision)
        if per_device is None:
            return None
        W = dist.world_size()
        return per_device * (W if self.device.type == "cuda" else W / dist.local_world_size())

    def _evaluate_row(self) -> dict:
        state = self.state
        state.val_loss = self.evaluate()
        faults.maybe_slow("slow-eval", state.step, dist.rank())
        ppl = math.exp(min(state.val_loss, 50.0))
        self.log.write(f"step {state.step}: val_loss {state.val_loss:.4f} (ppl {ppl:.2f})")
        return {"val_loss": state.val_loss, "val_ppl": ppl, "tokens": state.tokens}

    def _conditioning_row(self) -> dict:
        """The probe on two fixed validation windows: one no-grad forward on every rank (ZeRO-3
        gathers parameters collectively), the SVDs on rank 0. Touches no training state."""
        from model.probe import probe_during_training

        return probe_during_training(self.engine, self.val[:2, :-1], self.cfg)

    def _save(self) -> dict:
        config, keep = self.cfg.to_dict(), self.cfg.train.keep_last
        data_state = self.stream.state_dict()
        tag = checkpoint.save(self.engine, self.rundir, self.state, config, data_state, keep, self.precision_mode)
        self.log.write(f"step {self.state.step}: saved checkpoint {self.rundir.checkpoint(tag)}")
        return {}

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB

    # ---- stops --------------------------------------------------------------------------
    def _stop_agreed(self) -> bool:
        """All ranks stop at the same step if any of them was asked to (signal or stop file)."""
        flag = torch.tensor([1.0 if self.stop.requested() else 0.0], device=self.device)
        self.stop_requested = dist.all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item() > 0
        return self.stop_requested

    def _announce_stop(self, last_saved: int) -> None:
        self.stop.clear_file()
        if last_saved == self.state.step:
            self.log.write(f"stop requested at step {self.state.step}: nothing new to save")
        else:
            self.log.write(f"stop requested: saving at step {self.state.step}")

    # ---- what a user reads --------------------------------------------------------------
    def _print_summary(self) -> None:
        if not self.is_main:
            return
        c = self.cfg
        backend = resolve_backend(c.model.attn_backend, device=self.device)
        states = memory.describe(self.n_params, c.deepspeed.zero_stage, dist.world_size(), self.precision)
        lines = [
            f"run directory   {self.rundir.root}" + (f" (resuming at step {self.state.step})" if self.resume else ""),
            f"model           {self.n_params / 1e6:.2f}M parameters, {c.model.n_layers} layers, d_model "
            f"{c.model.d_model}, {c.model.n_heads}/{c.model.n_kv_heads} q/kv heads",
            f"attention       backend {backend} (asked: {c.model.attn_backend}), preconditioner {c.model.precondition}",
            f"data            {c.data.loader} loader, vocab {self.prepared.vocab_size}, seq_len {c.data.seq_len}, "
            f"{len(self.val)} validation windows",
            f"batch           {self.tokens_per_step} tokens/step = {c.train.micro_batch_size} x {c.train.grad_accum} "
            f"x {dist.world_size()} ranks x {c.data.seq_len}",
            f"parallelism     world size {dist.world_size()}, ZeRO stage {c.deepspeed.zero_stage} on "
            f"{self.device.type}" + (", torch.compile" if c.train.compile else ""),
            f"precision       {self.precision} ({self.precision_choice.reason})" + PRECISION_NOTES[self.precision_mode],
            f"model states    {states}" + (", activation checkpointing" if c.train.activation_checkpointing else ""),
            f"steps           {self.state.step} -> {c.train.max_steps}",
        ]
        print("\n".join(lines), flush=True)
        if self.precision_choice.warning:
            print(self.precision_choice.warning, file=sys.stderr, flush=True)

    def _print_end(self) -> None:
        sent = dist.comms_bytes_by_op()
        if sent:  # every rank: on several nodes, what each one moved
            print(
                f"rank {dist.rank()} on {dist.this_host()}: collectives moved {sum(sent.values())} bytes "
                "(DeepSpeed comms logger)",
                flush=True,
            )
        if self.is_main:
            val = "n/a" if self.state.val_loss is None else f"{self.state.val_loss:.4f}"
            print(f"done at step {self.state.step}: last val_loss {val}")
            print(f"metrics:     {self.rundir.metrics}")
            print(f"TensorBoard: tensorboard --logdir {self.rundir.tensorboard}")
            print(f"run directory: {self.rundir.root}", flush=True)
