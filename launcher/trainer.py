"""The training loop: DeepSpeed engine, data stream, evaluation, checkpoints, logs, faults.

Legend: B micro batch, T sequence length, W world size.
"""

from __future__ import annotations

import math
import resource
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import TokenStream, prepare_data, validation_windows
from data.config import ConfigError
from kernels import resolve_backend
from launcher import checkpoint, faults
from launcher import distributed as dist
from launcher.config import RunConfig, load_run_config, save_run_config
from launcher.ds_config import build_ds_config
from launcher.metrics import MetricsLogger
from launcher.optim import build_optimizer, build_scheduler
from model import Transformer, count_parameters, flops_per_token

# Dense bf16 peak FLOP/s per device for MFU; CPU: measured on the 2-core development machines.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "cpu-bf16": 1.0e12, "cpu-fp32": 0.23e12}


class DivergedError(RuntimeError):
    pass


def peak_flops(device: torch.device, precision: str) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)
    return PEAK_FLOPS[f"cpu-{precision}"]


class GlobalOrderStream:
    """train.batch_order=global: every rank reads the whole stream and keeps its slice of
    each global batch, so batches do not depend on the world size (costs W x tokenising)."""

    def __init__(self, prepared, seed: int):
        self.stream = TokenStream(prepared, rank=0, world_size=1, seed=seed)

    def next_batch(self, B: int) -> torch.Tensor:
        W, r = dist.world_size(), dist.rank()
        return self.stream.next_batch(B * W)[r * B : (r + 1) * B]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.is_main = dist.rank() == 0
        self.stop_requested = False
        self.grad_norm = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.device = self.device or torch.device("cpu")

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self._prepare_run_dir()
        if self.is_main:
            self.prepared = prepare_data(
                cfg.data, model_vocab_size=cfg.model.vocab_size, model_max_seq_len=cfg.model.max_seq_len
            )
        dist.barrier()
        if not self.is_main:
            self.prepared = prepare_data(
                cfg.data, model_vocab_size=cfg.model.vocab_size, model_max_seq_len=cfg.model.max_seq_len, progress=False
            )
        if self.is_main:
            shutil.copyfile(self.prepared.tokenizer_path, self.run_dir / "tokenizer.json.tmp")
            (self.run_dir / "tokenizer.json.tmp").replace(self.run_dir / "tokenizer.json")
        if cfg.train.batch_order == "global":
            self.stream = GlobalOrderStream(self.prepared, cfg.train.seed)
        else:
            self.stream = TokenStream(
                self.prepared, rank=dist.rank(), world_size=dist.world_size(), seed=cfg.train.seed
            )
        self.val = validation_windows(self.prepared)
        self._build_engine()
        state = checkpoint.load(self.engine, self.ckpt_dir)
        self.step, self.tokens, self.val_loss = 0, 0, None
        if state is not None:
            self.step, self.tokens, self.val_loss = state["step"], state["tokens"], state.get("val_loss")
            self.stream.load_state_dict(state["data_state"])
        self.resumed = state is not None

    def _prepare_run_dir(self) -> None:
        """Create the run dir and save the resolved config; refuse to resume a different model."""
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            saved = self.run_dir / "config.yaml"
            if saved.is_file() and checkpoint.latest_tag(self.ckpt_dir):
                before = load_run_config(saved)
                for section in ("model", "data"):
                    if getattr(before, section) != getattr(self.cfg, section):
                        raise ConfigError(
                            f"train.output_dir {self.run_dir}: holds a run with a different {section} section; "
                            "use a new train.output_dir (or the saved config.yaml) to resume"
                        )
            save_run_config(self.cfg, saved)
        dist.barrier()

    def _build_engine(self) -> None:
        import deepspeed

        torch.manual_seed(self.cfg.train.seed)
        model = Transformer(self.cfg.model)
        self.n_params = count_parameters(model)
        optimizer = build_optimizer(model, self.cfg.train, self.device)
        scheduler = build_scheduler(optimizer, self.cfg.train)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=build_ds_config(self.cfg, dist.world_size()),
        )
        if self.cfg.train.compile:
            self.engine.compile()  # in place: parameter names and checkpoints stay unchanged

    # ---- the loop -----------------------------------------------------------------------
    def autocast(self):
        bf16 = self.cfg.train.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the loss averaged over ranks."""
        t = self.cfg.train
        total = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum):
            batch_BT = self.stream.next_batch(t.micro_batch_size).to(self.device)
            with self.autocast():
                loss = self.engine(batch_BT[:, :-1], batch_BT[:, 1:]).loss
            if faults.poison_loss(self.step + 1, dist.rank()):
                loss = loss * float("nan")
            self.engine.backward(loss)
            if self.cfg.deepspeed.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                # DeepSpeed reports no norm for a plain optimizer without ZeRO: clip (and measure) here
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
            with self.autocast():
                logits = self.engine(batch_BT[:, :-1]).logits
            if real:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch_BT[:, 1:].flatten(), reduction="sum")
                sums[0] += loss.double()
                sums[1] += batch_BT[:, 1:].numel()
        self.engine.train()
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def run(self) -> int:
        """Train to max_steps (or until SIGTERM/SIGINT), evaluating, logging and checkpointing."""
        cfg, t = self.cfg, self.cfg.train
        self._install_signal_handlers()
        tokens_per_step = t.micro_batch_size * t.grad_accum * dist.world_size() * cfg.data.seq_len
        flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
        peak = peak_flops(self.device, t.precision) * (
            dist.world_size() if self.device.type == "cuda" else dist.world_size() / dist.local_world_size()
        )
        self._print_summary(tokens_per_step)
        log = MetricsLogger(
            self.run_dir,
            enabled=self.is_main,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total=t.max_steps,
            start=self.step,
        )
        self.log = log
        last_time, last_tokens, last_saved = time.perf_counter(), self.tokens, self.step
        try:
            while self.step < t.max_steps and not self._stop_agreed():
                loss = self.train_step()
                self.step += 1
                self.tokens += tokens_per_step
                if not math.isfinite(loss):
                    raise DivergedError(f"loss is {loss} at step {self.step}")
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    now = time.perf_counter()
                    tps = (self.tokens - last_tokens) / max(now - last_time, 1e-9)
                    self._log_train(loss, tps, tps * flops_tok / peak)
                    last_time, last_tokens = now, self.tokens
                    log.progress(self.step, loss=loss, tok_s=tps)
                if self._due(t.eval_interval):
                    self._log_eval()
                if cfg.log.conditioning_interval and self._due(cfg.log.conditioning_interval):
                    self._log_conditioning()
                if self._due(t.save_interval):
                    self._save()
                    last_saved = self.step
                faults.maybe_kill(self.step, dist.rank())
            if self.stop_requested:
                log.write(f"stop requested: saving at step {self.step}")
            if last_saved != self.step:
                self._save()
        finally:
            log.close()
        self._print_end()
        return 0

    def _due(self, interval: int) -> bool:
        return self.step == self.cfg.train.max_steps or (interval > 0 and self.step % interval == 0)

    def _log_train(self, loss: float, tokens_per_sec: float, mfu: float) -> None:
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm() if self.cfg.deepspeed.zero_stage else self.grad_norm
        grad_norm = float(grad_norm) if grad_norm is not None else None
        mem_gb = self._memory_gb()
        row = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens=self.tokens, tokens_per_sec=tokens_per_sec)
        row.update(mfu=mfu, mem_gb=mem_gb)
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
        scalars.update({"train/tokens_per_sec": tokens_per_sec, "train/mfu": mfu, "train/mem_gb": mem_gb})
        self.log.log(self.step, row, scalars)

    def _log_eval(self) -> None:
        self.val_loss = self.evaluate()
        ppl = math.exp(min(self.val_loss, 50.0))
        self.log.log(
            self.step,
            {"val_loss": self.val_loss, "val_ppl": ppl, "tokens": self.tokens},
            {"val/loss": self.val_loss, "val/ppl": ppl},
        )
        self.log.write(f"step {self.step}: val_loss {self.val_loss:.4f} (ppl {ppl:.2f})")

    def _log_conditioning(self) -> None:
        """The probe on two fixed validation windows: one no-grad forward on every rank (ZeRO-3
        gathers parameters collectively), the SVDs on rank 0. Touches no training state."""
        from launcher.conditioning import probe_during_training

        start = time.perf_counter()
        tags = probe_during_training(self.engine, self.val[:2, :-1], self.cfg, self.autocast)
        seconds = time.perf_counter() - start
        self.log.log(self.step, {**tags, "cond_seconds": seconds}, {**tags, "cond/seconds": seconds})
        self.log.write(f"step {self.step}: conditioning probe took {seconds:.2f} s")

    def _save(self) -> None:
        state = {"tokens": self.tokens, "val_loss": self.val_loss, "config": self.cfg.to_dict()}
        tag = checkpoint.save(
            self.engine, self.ckpt_dir, self.step, state, self.stream.state_dict(), self.cfg.train.keep_last
        )
        self.log.write(f"step {self.step}: saved checkpoint {self.ckpt_dir / tag}")

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB

    # ---- faults -------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _stop_agreed(self) -> bool:
        """All ranks stop at the same step if any of them was signalled."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        self.stop_requested = dist.all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item() > 0
        return self.stop_requested

    # ---- what a user reads --------------------------------------------------------------
    def _print_summary(self, tokens_per_step: int) -> None:
        if not self.is_main:
            return
        c = self.cfg
        backend = resolve_backend(c.model.attn_backend, device=self.device)
        lines = [
            f"run directory   {self.run_dir}" + (f" (resuming at step {self.step})" if self.resumed else ""),
            f"model           {self.n_params / 1e6:.2f}M parameters, {c.model.n_layers} layers, d_model "
            f"{c.model.d_model}, {c.model.n_heads}/{c.model.n_kv_heads} q/kv heads",
            f"attention       backend {backend} (asked: {c.model.attn_backend}), preconditioner {c.model.precondition}",
            f"data            vocab {self.prepared.vocab_size}, seq_len {c.data.seq_len}, "
            f"{len(self.val)} validation windows",
            f"batch           {tokens_per_step} tokens/step = {c.train.micro_batch_size} x {c.train.grad_accum} "
            f"x {dist.world_size()} ranks x {c.data.seq_len}",
            f"parallelism     world size {dist.world_size()}, ZeRO stage {c.deepspeed.zero_stage}, "
            f"{c.train.precision} on {self.device.type}" + (", torch.compile" if c.train.compile else ""),
            f"steps           {self.step} -> {c.train.max_steps}",
        ]
        print("\n".join(lines), flush=True)

    def _print_end(self) -> None:
        if self.is_main:
            val = "n/a" if self.val_loss is None else f"{self.val_loss:.4f}"
            print(f"done at step {self.step}: last val_loss {val}")
            print(f"metrics:     {self.run_dir / 'metrics.jsonl'}")
            print(f"TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}")
            print(f"run directory: {self.run_dir}", flush=True)
