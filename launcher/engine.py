"""The model, the DeepSpeed engine and one optimizer step: what the trainer and the benchmarks share.

Legend: B micro batch, T sequence length, W world size.
"""

from __future__ import annotations

import torch

from launcher import distributed as dist
from launcher import faults
from launcher.ds_config import deepspeed_clips
from launcher.optim import build_optimizer, build_scheduler
from model import Transformer, count_parameters
from run.config import RunConfig


def parameter_count(cfg: RunConfig) -> int:
    with torch.device("meta"):  # counted without allocating
        return count_parameters(Transformer(cfg.model))


def build_model(cfg: RunConfig, ds_config: dict) -> Transformer:
    """The model with train.seed's initial weights. Under ZeRO-3 it is built inside
    deepspeed.zero.Init, so a rank holds only its partition of each parameter (and one whole
    parameter at a time while it is initialised); the weights equal an unsharded build's."""
    import deepspeed

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


def build_engine(cfg: RunConfig, model: Transformer, ds_config: dict, device: torch.device):
    """(DeepSpeed engine, learning-rate scheduler) around `model` with our optimizer."""
    import deepspeed

    optimizer = build_optimizer(model, cfg.train, device)
    scheduler = build_scheduler(optimizer, cfg.train)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if cfg.train.compile:
        engine.compile()  # in place: parameter names and checkpoints stay unchanged
    return engine, scheduler


class Stepper:
    """One optimizer step over grad_accum micro-batches of `stream`. After each step, `lr` is
    the learning rate it used and `grad_norm` the global gradient norm before clipping, decided
    here alone: DeepSpeed's when it clips, else measured (and clipped) here."""

    def __init__(self, cfg: RunConfig, engine, scheduler, stream, device: torch.device):
        self.cfg, self.engine, self.scheduler, self.stream, self.device = cfg, engine, scheduler, stream, device
        self.deepspeed_clips = deepspeed_clips(cfg)
        self.lr: float | None = None
        self.grad_norm: float | None = None

    def __call__(self, step: int) -> float:
        """Train step number `step`; returns its loss averaged over micro-batches and ranks."""
        t = self.cfg.train
        total = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum):
            batch_BT = self.stream.next_batch(t.micro_batch_size).to(self.device, non_blocking=True)
            loss = self.engine(batch_BT[:, :-1], batch_BT[:, 1:]).loss  # fp32 in every precision mode
            if faults.due("nan", step, dist.rank()):
                loss = loss * float("nan")
            self.engine.backward(loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                self.lr = self.scheduler.get_last_lr()[0]  # engine.step() moves the schedule on
                if not self.deepspeed_clips:  # DeepSpeed reports no norm without ZeRO
                    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
                    self.grad_norm = torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), clip).item()
            self.engine.step()
            if boundary and self.deepspeed_clips:
                norm = self.engine.get_global_grad_norm()
                self.grad_norm = None if norm is None else float(norm)
            total += loss.detach().float()
        dist.all_reduce(total)
        return total.item() / (t.grad_accum * dist.world_size())
