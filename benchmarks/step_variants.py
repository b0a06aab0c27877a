"""The training step the benchmark times, with every optimisation of libs/trainer.py switchable.

`TrainStep` runs zero_grad, LSimple forward, backward, AdamW, LR scheduler and EMA either the plain way (`PLAIN`:
explicit-softmax attention, for-loop AdamW, Python-loop EMA, a host sync per step) or as libs/trainer.py does
(`OPTIMIZED`: SDPA, fused AdamW, `torch._foreach_lerp_` EMA, no per-step sync), one switch at a time, so
benchmarks/benchmark.py measures each optimisation alone. `trainer_step` is `libs.trainer.train_step` itself (the
headline figure); tests/test_optimized_step.py checks its numbers, this module only times.
"""
import contextlib
import copy
import dataclasses
import itertools

import ml_collections
import torch
from accelerate import Accelerator

from libs import attention, fsdp
from libs.ema import EMAUpdater, make_ema
from libs.family import family_of
from libs.optim import build_lr_scheduler, build_optimizer
from libs.perf import maybe_compile
from libs.trainer import Run, train_step

@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How one training step is computed. Every field is one switchable optimisation.

    attention: 'math' (explicit softmax) | 'sdpa' | 'xformers' | 'auto' (libs.attention backends).
    optimizer: 'for-loop' (one update per tensor) | 'foreach' (multi-tensor) | 'fused' (one kernel; CUDA and CPU)
        | 'auto' (libs.optim.build_optimizer's choice: fused on CUDA and CPU, foreach elsewhere).
    ema: 'loop' (ema.mul_(rate).add_(p, alpha=1 - rate) per parameter, as the original) | 'foreach' (one
        torch._foreach_lerp_, libs.ema.EMAUpdater).
    sync_every_step: loss.item() every step (the original's logging) instead of a device tensor read per log interval.
    precision: 'fp32' | 'bf16' | 'fp16' autocast of the network forward (loss in float32). compile: torch.compile.
    """
    attention: str = "sdpa"
    optimizer: str = "auto"
    ema: str = "foreach"
    sync_every_step: bool = False
    precision: str = "fp32"
    compile: bool = False

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# The straightforward implementation of the same network and step.
PLAIN = StepOptions(attention="math", optimizer="for-loop", ema="loop", sync_every_step=True)
# What libs/trainer.py does (config.compile and mixed precision off).
OPTIMIZED = StepOptions(attention="sdpa", optimizer="auto", ema="foreach", sync_every_step=False)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def optimizer_flags(kind, device):
    """AdamW keyword flags {'foreach', 'fused'} of an optimizer kind on `device`."""
    if kind == "auto":
        kind = "fused" if torch.device(device).type in ("cuda", "cpu") else "foreach"
    flags = {"for-loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True, "fused": False},
             "fused": {"foreach": False, "fused": True}}
    if kind not in flags:
        raise ValueError(f"optimizer implementation {kind!r} is not one of auto, {', '.join(flags)}")
    return flags[kind]


def set_optimizer_kind(optimizer, kind, device):
    """Switch an existing AdamW between for-loop / foreach / fused in place. The three share the per-parameter
    state; only the 'step' counter's device differs on CUDA (device for fused, host otherwise), so it is moved."""
    flags = optimizer_flags(kind, device)
    for group in optimizer.param_groups:
        if group.get("fused") == flags["fused"] and group.get("foreach") == flags["foreach"]:
            continue
        group.update(flags)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state and not group.get("capturable", False):
                state["step"] = state["step"].to(p.device if flags["fused"] else "cpu")


@torch.no_grad()
def ema_update_loop(ema_params, online_params, rate):
    """The original U-ViT's EMA: one mul_ + add_ per parameter from Python."""
    for e, p in zip(ema_params, online_params):
        e.mul_(rate).add_(p.detach(), alpha=1.0 - rate)


@contextlib.contextmanager
def attention_backend(name):
    """Use attention backend `name` inside the block, then put the previous request back."""
    previous = attention.get_attention_backend()
    attention.set_attention_backend(name)
    try:
        yield
    finally:
        attention.set_attention_backend(previous)


class TrainStep:
    """One U-ViT training step, configurable per `StepOptions` between calls.

    Holds the network, its EMA, AdamW (libs.optim.build_optimizer: the trainer's parameter groups) and the LR
    scheduler; a call runs the step in the trainer's order and returns the loss (a float when
    options.sync_every_step, else a 0-d device tensor).

    nnet: on its device already. diffusion: sde.ContinuousVP / DiscreteVP. optimizer_cfg / lr_cfg: config.optimizer /
    config.lr_scheduler (ConfigDicts or dicts). options: the initial StepOptions; `step(x0, options=...)` overrides
    per call, so one model and optimizer state serve every variant (the benchmark interleaves them).
    """

    def __init__(self, nnet, diffusion, optimizer_cfg, lr_cfg, n_steps=500000, ema_rate=0.9999,
                 options=OPTIMIZED, grad_scaler=None):
        def as_cfg(c):
            return c if isinstance(c, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(c))

        self.nnet = nnet
        self.device = next(nnet.parameters()).device
        self.diffusion = diffusion
        self.ema_rate = ema_rate
        self.options = options
        self.nnet_ema = make_ema(nnet)
        self.optimizer = build_optimizer(nnet, as_cfg(optimizer_cfg))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, as_cfg(lr_cfg), n_steps)
        self.ema = EMAUpdater(self.nnet_ema, nnet)
        self.grad_scaler = grad_scaler  # a torch.amp.GradScaler for fp16, as accelerate builds one
        self.loss_sum = torch.zeros((), device=self.device)  # the trainer's device-side accumulator
        self._compiled = None

    def _network(self, options):
        if not options.compile:
            return self.nnet
        if self._compiled is None:
            self._compiled = maybe_compile(self.nnet, True)
        return self._compiled

    def __call__(self, x0, options=None, **cond):
        o = self.options if options is None else options
        set_optimizer_kind(self.optimizer, o.optimizer, self.device)
        amp_dtype = AUTOCAST_DTYPES[o.precision]
        net = self._network(o)
        self.optimizer.zero_grad(set_to_none=True)
        with attention_backend(o.attention):
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = self.diffusion.loss(net, x0, **cond).mean()
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        if o.ema == "loop":
            ema_update_loop(self.ema.ema_params, self.ema.online_params, self.ema_rate)
            for e, b in zip(self.ema.ema_buffers, self.ema.online_buffers):
                e.copy_(b)
        elif o.ema == "foreach":
            self.ema.update(self.ema_rate)
        else:
            raise ValueError(f"EMA implementation {o.ema!r} is not 'loop' or 'foreach'")
        if o.sync_every_step:
            return loss.item()  # the host sync the optimized loop avoids
        self.loss_sum += loss.detach()
        return loss.detach()


def trainer_step(nnet, config, precision="fp32", compile=False, compile_backend="inductor", sharded=False):
    """step(x0, **cond) -> (loss, grad_norm, applied): one `libs.trainer.train_step` on a Run built as libs.trainer.train builds it
    (accelerate-prepared network and AdamW, the config's optimizer, EMA rate, grad clip and diffusion). sharded: the
    network and EMA sharded with FSDP2 over this one process, as config.fsdp does (config.nnet must describe nnet).

    x0 is given directly (latents for latent configs), so the family is taken as pixel-space (the per-step moment
    sampling, a few elementwise ops, is not timed).
    """
    device = next(nnet.parameters()).device
    if sharded:  # FSDP2 over this one process (libs/fsdp.py): bf16 through its policy, not accelerate's autocast
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
        cfg = ml_collections.ConfigDict(dict(reshard_after_forward=True, replicate=1, cpu_offload=False,
                                             mixed_precision="bf16" if precision == "bf16" else "no"))
        mesh = fsdp.device_mesh(cfg, 1, device)
        nnet = fsdp.shard(nnet, mesh, cfg)
        nnet_ema = fsdp.sharded_ema(nnet, config.nnet, mesh, cfg, device)
    else:
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision))
        nnet_ema = make_ema(nnet)
    optimizer = build_optimizer(nnet, config.optimizer)
    # warmup_steps 0: the benchmark's first steps should not run at lr 0 (the speed is the same).
    lr_scheduler = build_lr_scheduler(optimizer, ml_collections.ConfigDict(dict(name="customized", warmup_steps=0)),
                                      config.train.n_steps)
    train_nnet, optimizer = (nnet, accelerator.prepare(optimizer)) if sharded else accelerator.prepare(nnet, optimizer)
    family = dataclasses.replace(family_of(config), data="pixels")
    config = copy.deepcopy(config)
    if config.get("dataset"):  # no null label here: time the step without condition dropping, as before
        config.dataset.cfg = False
    r = Run(config=config, workdir=None, family=family, accelerator=accelerator, data=None, nnet=nnet,
            nnet_ema=nnet_ema, optimizer=optimizer, lr_scheduler=lr_scheduler, loader=None,
            autoencoder=None, null=None, train_nnet=maybe_compile(train_nnet, compile, backend=compile_backend))
    counter = itertools.count()

    def step(x0, **cond):
        return train_step(r, {"x": x0, **cond}, next(counter))

    step.nnet = nnet
    return step
