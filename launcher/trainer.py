"""The training loop: DeepSpeed engine, data stream, evaluation, checkpoints, logs, faults.

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
from launcher.ds_config import build_ds_config, deepspeed_clips
from launcher.metrics import MetricsLogger
from launcher.optim import build_optimizer, build_scheduler
from launcher.precision import resolve_precision
from launcher.stopping import StopRequest
from model import Transformer, count_parameters, flops_per_token
from run.config import RunConfig, save_run_config
from run.rundir import RunDir

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


class Trainer:
    def __init__(self, cfg: RunConfig, stop: StopRequest):
        self.cfg = cfg
        self.rundir = RunDir(cfg.train.output_dir)
        self.is_main = dist.rank() == 0
        self.stop = stop
        self.stop_requested = False
        self.grad_norm = None
        self.step_lr = None
        self.resume: checkpoint.Resume | None = None  # set by setup() when a checkpoint is resumed
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.device = self.device or torch.device("cpu")
        self.precision_choice = resolve_precision(cfg.train.precision, self.device)
        self.precision = self.precision_choice.name

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        resume_tag = checkpoint.check_resume(self.rundir, cfg.deepspeed.zero_stage)
        if self.is_main:
            self.prepared = prepare_data(
                cfg.data, model_vocab_size=cfg.model.vocab_size, model_max_seq_len=cfg.model.max_seq_len
            )
        dist.barrier()
        if not self.is_main:
            self.prepared = prepare_data(
                cfg.data, model_vocab_size=cfg.model.vocab_size, model_max_seq_len=cfg.model.max_seq_len, progress=False
            )
        self.stream = training_batches(
            self.prepared,
            rank=dist.rank(),
            world_size=dist.world_size(),
            seed=cfg.train.order_seed,
            batch_size=cfg.train.micro_batch_size,
            pin_memory=self.device.type == "cuda",
        )
        self.resume = self._plan_resume(resume_tag) if resume_tag else None
        self._prepare_run_dir()
        if self.is_main:
            self.rundir.keep_tokenizer(self.prepared.tokenizer_dir)
        self.val = validation_windows(self.prepared)
        self._build_engine()
        state = checkpoint.load(self.engine, self.rundir, self.resume) if self.resume else None
        self.step, self.tokens, self.val_loss = 0, 0, None
        if state is not None:
            self.step, self.tokens, self.val_loss = state["step"], state["tokens"], state.get("val_loss")
            self.stream.load_state_dict(state["data_state"])
        self.resumed = state is not None

    def _plan_resume(self, tag: str) -> checkpoint.Resume:
        """Check, before anything is written, that checkpoint `tag` resumes on this world size
        with this data pipeline; rank 0 warns when the global batch changed."""
        t = self.cfg.train
        elastic = self.stream.elastic  # its state is the same on every rank and world size
        resume = checkpoint.plan_resume(self.rundir, tag, dist.world_size(), self.cfg.deepspeed.zero_stage, elastic)
        warning = resume.global_batch_warning(t.micro_batch_size * t.grad_accum * dist.world_size())
        if warning and self.is_main:
            print(warning, file=sys.stderr, flush=True)
        return resume

    def _prepare_run_dir(self) -> None:
        """Create the run dir and save the resolved config (launcher.train has checked that a
        run it holds has the same model and data sections)."""
        if self.is_main:
            self.rundir.checkpoints.mkdir(parents=True, exist_ok=True)
            save_run_config(self.cfg, self.rundir.config)
        dist.barrier()

    def _build_engine(self) -> None:
        import deepspeed

        universal = bool(self.resume and self.resume.universal)
        ds_config = build_ds_config(self.cfg, dist.world_size(), self.precision, load_universal=universal)
        model = self._build_model(ds_config)
        optimizer = build_optimizer(model, self.cfg.train, self.device)
        scheduler = build_scheduler(optimizer, self.cfg.train)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        if self.cfg.train.compile:
            self.engine.compile()  # in place: parameter names and checkpoints stay unchanged

    def _build_model(self, ds_config: dict) -> Transformer:
        """The model with train.seed's initial weights. Under ZeRO-3 it is built inside
        deepspeed.zero.Init, so a rank holds only its partition of each parameter (and one whole
        parameter at a time while it is initialised); the weights equal an unsharded build's."""
        import deepspeed

        cfg = self.cfg
        with torch.device("meta"):  # counted without allocating
            self.n_params = count_parameters(Transformer(cfg.model))
        torch.manual_seed(cfg.train.seed)
        if cfg.deepspeed.zero_stage < 3:
            model = Transformer(cfg.model)
            model.init_weights(cfg.train.seed)
        else:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = Transformer(cfg.model)  # the constructor's own init touches empty partitions
            model.init_weights(cfg.train.seed, around=lambda p: deepspeed.zero.GatheredParameters(p, modifier_rank=0))
        model.activation_checkpointing = cfg.train.activation_checkpointing
        return model

    # ---- the loop -----------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the loss averaged over ranks."""
        t = self.cfg.train
        total = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum):
            batch_BT = self.stream.next_batch(t.micro_batch_size).to(self.device, non_blocking=True)
            loss = self.engine(batch_BT[:, :-1], batch_BT[:, 1:]).loss  # bf16 mode: bf16 weights, fp32 loss
            if faults.due("nan", self.step + 1, dist.rank()):
                loss = loss * float("nan")
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                self.step_lr = self.scheduler.get_last_lr()[0]  # engine.step() moves the schedule on
                if not deepspeed_clips(self.cfg, self.precision):
                    # DeepSpeed reports no norm for a plain fp32 optimizer without ZeRO: clip (and measure) here
                    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
                    self.grad_norm = torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), clip).item()
            self.engine.step()
            total += loss.detach().float()
        dist.all_reduce(total)
        return total.item() / (t.grad_accum * dist.world_size())

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
        cfg, t = self.cfg, self.cfg.train
        self.tokens_per_step = t.micro_batch_size * t.grad_accum * dist.world_size() * cfg.data.seq_len
        self._print_summary()
        self.log = MetricsLogger(
            self.rundir,
            enabled=self.is_main,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total=t.max_steps,
            start=self.step,
        )
        self._start_clock()
        last_saved = self.step
        try:
            while self.step < t.max_steps and not self._stop_agreed():
                loss = self.train_step()
                self.step += 1
                self.tokens += self.tokens_per_step
                if not math.isfinite(loss):
                    raise DivergedError(f"loss is {loss} at step {self.step}")
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    self._log_train(loss)
                if self._at_interval(t.eval_interval):
                    self._off_the_clock("eval", self._evaluate_row)
                if cfg.log.conditioning_interval and self._at_interval(cfg.log.conditioning_interval):
                    self._off_the_clock("cond", self._conditioning_row)
                if self._at_interval(t.save_interval):
                    self._off_the_clock("save", self._save)
                    last_saved = self.step
                faults.maybe_kill("sigkill", self.step, dist.rank())
                faults.maybe_slow("pause", self.step, dist.rank())
            if self.stop_requested:
                self._announce_stop(last_saved)
            if last_saved != self.step:
                self._save()
        finally:
            self.log.close()
            self.stream.close()
        self._print_end()
        return 0

    def _at_interval(self, interval: int) -> bool:
        """True every `interval` steps and at the last step (interval 0: only at the last)."""
        return self.step == self.cfg.train.max_steps or (interval > 0 and self.step % interval == 0)

    # ---- what is logged -----------------------------------------------------------------
    def _start_clock(self) -> None:
        """tokens/s counts training time only: evaluation, the probe and saves are set aside."""
        self.clock_start, self.clock_tokens, self.paused = time.perf_counter(), self.tokens, 0.0

    def _off_the_clock(self, name: str, work) -> None:
        """Run `work` (it returns a metrics row and TensorBoard scalars) outside the training
        clock and log its seconds as NAME_seconds."""
        start = time.perf_counter()
        row, scalars = work()
        seconds = time.perf_counter() - start
        self.paused += seconds
        self.log.log(self.step, {**row, f"{name}_seconds": seconds}, {**scalars, f"time/{name}_seconds": seconds})

    def _log_train(self, loss: float) -> None:
        seconds = time.perf_counter() - self.clock_start - self.paused
        tps = (self.tokens - self.clock_tokens) / max(seconds, 1e-9)
        peak = self._peak_flops()
        mfu = tps * flops_per_token(self.cfg.model, self.cfg.data.seq_len) / peak if peak else None
        grad_norm = self.engine.get_global_grad_norm() if deepspeed_clips(self.cfg, self.precision) else self.grad_norm
        grad_norm = float(grad_norm) if grad_norm is not None else None
        lr, mem_gb = self.step_lr, self._memory_gb()
        row = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens=self.tokens, tokens_per_sec=tps)
        row.update(mfu=mfu, mem_gb=mem_gb)
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
        scalars.update({"train/tokens_per_sec": tps, "train/mfu": mfu, "train/mem_gb": mem_gb})
        self.log.log(self.step, row, scalars)
        self.log.progress(self.step, loss=loss, tok_s=tps)
        self._start_clock()

    def _peak_flops(self) -> float | None:
        """The whole job's peak: per device (train.peak_flops, else by name) times devices (on a CPU,
        the nodes: the ranks of a node share its cores)."""
        per_device = self.cfg.train.peak_flops or peak_flops(self.device, self.precision)
        if per_device is None:
            return None
        W = dist.world_size()
        return per_device * (W if self.device.type == "cuda" else W / dist.local_world_size())

    def _evaluate_row(self) -> tuple[dict, dict]:
        self.val_loss = self.evaluate()
        faults.maybe_slow("slow-eval", self.step, dist.rank())
        ppl = math.exp(min(self.val_loss, 50.0))
        self.log.write(f"step {self.step}: val_loss {self.val_loss:.4f} (ppl {ppl:.2f})")
        row = {"val_loss": self.val_loss, "val_ppl": ppl, "tokens": self.tokens}
        return row, {"val/loss": self.val_loss, "val/ppl": ppl}

    def _conditioning_row(self) -> tuple[dict, dict]:
        """The probe on two fixed validation windows: one no-grad forward on every rank (ZeRO-3
        gathers parameters collectively), the SVDs on rank 0. Touches no training state."""
        from model.probe import probe_during_training

        tags = probe_during_training(self.engine, self.val[:2, :-1], self.cfg)
        return tags, tags

    def _save(self) -> tuple[dict, dict]:
        state = {"tokens": self.tokens, "val_loss": self.val_loss, "config": self.cfg.to_dict()}
        tag = checkpoint.save(
            self.engine, self.rundir, self.step, state, self.stream.state_dict(), self.cfg.train.keep_last
        )
        self.log.write(f"step {self.step}: saved checkpoint {self.rundir.checkpoint(tag)}")
        return {}, {}

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
        if last_saved == self.step:
            self.log.write(f"stop requested at step {self.step}: nothing new to save")
        else:
            self.log.write(f"stop requested: saving at step {self.step}")

    # ---- what a user reads --------------------------------------------------------------
    def _print_summary(self) -> None:
        if not self.is_main:
            return
        c = self.cfg
        backend = resolve_backend(c.model.attn_backend, device=self.device)
        states = memory.describe(self.n_params, c.deepspeed.zero_stage, dist.world_size(), self.precision)
        lines = [
            f"run directory   {self.rundir.root}" + (f" (resuming at step {self.step})" if self.resumed else ""),
            f"model           {self.n_params / 1e6:.2f}M parameters, {c.model.n_layers} layers, d_model "
            f"{c.model.d_model}, {c.model.n_heads}/{c.model.n_kv_heads} q/kv heads",
            f"attention       backend {backend} (asked: {c.model.attn_backend}), preconditioner {c.model.precondition}",
            f"data            {c.data.loader} loader, vocab {self.prepared.vocab_size}, seq_len {c.data.seq_len}, "
            f"{len(self.val)} validation windows",
            f"batch           {self.tokens_per_step} tokens/step = {c.train.micro_batch_size} x {c.train.grad_accum} "
            f"x {dist.world_size()} ranks x {c.data.seq_len}",
            f"parallelism     world size {dist.world_size()}, ZeRO stage {c.deepspeed.zero_stage} on "
            f"{self.device.type}" + (", torch.compile" if c.train.compile else ""),
            f"precision       {self.precision} ({self.precision_choice.reason})"
            + (", DeepSpeed bf16 mode: fp32 master weights" if self.precision == "bf16" else ""),
            f"model states    {states}" + (", activation checkpointing" if c.train.activation_checkpointing else ""),
            f"steps           {self.step} -> {c.train.max_steps}",
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
            val = "n/a" if self.val_loss is None else f"{self.val_loss:.4f}"
            print(f"done at step {self.step}: last val_loss {val}")
            print(f"metrics:     {self.rundir.metrics}")
            print(f"TensorBoard: tensorboard --logdir {self.rundir.tensorboard}")
            print(f"run directory: {self.rundir.root}", flush=True)
