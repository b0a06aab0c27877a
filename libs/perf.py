"""Performance switches that belong to no single module, the U-ViT FLOP count, and the two
training-step presets the benchmark and the equivalence test compare.

- `configure_tf32`, `maybe_compile`, `to_channels_last`: one-line switches with the reason each
  exists (TF32 matmuls on Ampere+, torch.compile of the network, NHWC for convolution stacks).
- `uvit_forward_macs`: the analytic multiply-accumulate count of one U-ViT forward pass per image
  (the figure the U-ViT and DiT papers call "GFLOPs": U-ViT-H/2 on 4x32x32 latents = 133 G);
  `mfu` turns a measured throughput into a model-FLOPs utilisation.
- `StepOptions`, `PLAIN`, `OPTIMIZED`, `TrainStep`: one training step (zero_grad, LSimple forward,
  backward, AdamW step, LR-scheduler step, EMA update) built either the straightforward way
  (explicit-softmax attention, for-loop AdamW, Python-loop EMA, a host sync per step) or the way
  libs/trainer.py does it (SDPA, foreach/fused AdamW from libs.optim, `torch._foreach_lerp_` EMA
  from libs.ema, no per-step sync), each switch separately, so that every optimisation can be
  measured on its own (benchmarks/benchmark.py) and checked to change no number
  (tests/test_optimized_step.py).
"""
import contextlib
import dataclasses
import logging

import torch

from libs.errors import ConfigError

logger = logging.getLogger(__name__)

# Dense (no sparsity) peak tensor-core throughput in TFLOP/s (2 FLOPs per multiply-accumulate), per
# the vendor data sheets. Keys are matched against torch.cuda.get_device_name() in order.
PEAK_TFLOPS = (
    # (name substring, {dtype: TFLOP/s})
    ("H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),  # SXM (incl. "H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


# -- switches -----------------------------------------------------------------------------------

def configure_tf32(enabled=True):
    """TF32 for float32 matmuls and convolutions on Ampere and later GPUs (no effect on CPUs).

    fp32 matmuls then run on tensor cores with a 10-bit mantissa (fast-DiT's first speed-up);
    autocast bf16/fp16 matmuls are unaffected. Returns the previous matmul setting.
    """
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return previous


def maybe_compile(module, enabled, **kwargs):
    """torch.compile(module, **kwargs) when `enabled`, else `module` itself.

    The compiled module shares its parameters with `module` (save and EMA the bare one). The
    first calls are slow while Inductor compiles (minutes for U-ViT-H on a GPU; on a 2-core CPU
    several minutes for U-ViT-S), so only long runs gain.
    """
    if not enabled:
        return module
    logger.info("compiling %s with torch.compile(%s)", type(module).__name__,
                ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    return torch.compile(module, **kwargs)


def to_channels_last(module):
    """Convert a convolutional network's 4-d weights to NHWC (channels-last) memory layout.

    Helps convolution stacks (the autoencoder, Inception) where oneDNN / cuDNN prefer NHWC; U-ViT
    itself is all Linear layers except the patch embedding and the final 3x3 conv, so it gains
    nothing measurable. Inputs should be converted too: x.to(memory_format=torch.channels_last).
    """
    return module.to(memory_format=torch.channels_last)


# -- FLOPs --------------------------------------------------------------------------------------

def uvit_forward_macs(img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio=4.0, num_classes=-1,
                      mlp_time_embed=False, conv=True, skip=True, num_text_tokens=0, clip_dim=768, **_ignored):
    """Multiply-accumulates of one U-ViT forward pass for ONE image, by layer kind.

    Counts every matmul (Linear layers, the patch-embedding and final convolutions, attention's
    q k^T and attn v); not softmax, LayerNorm, GELU, additions or embeddings lookups (< 1%).
    Takes the `config.nnet` entries (extra keys are ignored). num_text_tokens > 0 means the
    text-to-image U-ViT (uvit_t2i) with that many context tokens of width clip_dim.
    Returns a dict of MACs with 'total'; FLOPs = 2 x MACs.

    U-ViT-H/2 on (4, 32, 32) latents with 1001 classes: 133.3e9 MACs, the paper's "133 GFLOPs".
    """
    D = embed_dim
    L = (img_size // patch_size) ** 2  # patch tokens
    if num_text_tokens > 0:
        extras = 1 + num_text_tokens
    else:
        extras = 2 if num_classes > 0 else 1
    T = extras + L  # tokens through the transformer
    hidden = int(D * mlp_ratio)
    n_blocks = 2 * (depth // 2) + 1  # depth // 2 in-blocks + middle + depth // 2 out-blocks
    patch_dim = patch_size ** 2 * in_chans
    macs = {
        "patch_embed": L * patch_dim * D,  # p x p conv with stride p = one (patch_dim -> D) matmul per patch
        "time_embed": (D * 4 * D + 4 * D * D) if mlp_time_embed else 0,
        "context_embed": num_text_tokens * clip_dim * D,
        "qkv_proj": n_blocks * T * (3 * D * D + D * D),
        "attention": n_blocks * 2 * T * T * D,  # q k^T and attn v over all heads
        "mlp": n_blocks * T * 2 * D * hidden,
        "skip_linear": (depth // 2) * T * 2 * D * D if skip else 0,
        "decoder_pred": T * D * patch_dim,  # applied to every token, extras included, as the original
        "final_conv": img_size * img_size * in_chans * in_chans * 9 if conv else 0,
    }
    macs["total"] = sum(macs.values())
    return macs


def training_flops_per_image(forward_macs):
    """Model FLOPs of one training image counted as 3 forward passes (backward = 2 forwards).

    Convention of the issue and of DiT-style MFU figures: forward "FLOPs" = MACs (the papers'
    GFLOPs), so this is 3 x MACs. The hardware convention (2 FLOPs per MAC) gives twice as much;
    `mfu` reports both.
    """
    return 3 * forward_macs


def peak_tflops(device_name, precision):
    """Dense peak TFLOP/s of a known GPU for 'bf16' | 'fp16' | 'tf32' | 'fp32', else None."""
    for key, table in PEAK_TFLOPS:
        if key in device_name:
            return table.get(precision)
    return None


def mfu(images_per_s, forward_macs, peak_tflops_value):
    """Model-FLOPs utilisation of a training run, both conventions.

    Returns {'mfu_macs': 3 * MACs * images/s / peak (the issue's convention: 3 x 133 G per image
    for U-ViT-H/2), 'mfu_flops': the same with 2 FLOPs per MAC (PaLM's convention, twice the
    former)}; None values when the peak is unknown.
    """
    if not peak_tflops_value:
        return {"mfu_macs": None, "mfu_flops": None}
    achieved = training_flops_per_image(forward_macs) * images_per_s / (peak_tflops_value * 1e12)
    return {"mfu_macs": achieved, "mfu_flops": 2 * achieved}


# -- the training step, plain or optimized --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How one training step is computed. Every field is one switchable optimisation.

    attention: 'math' (explicit softmax) | 'sdpa' | 'xformers' | 'auto' (libs.attention backends).
    optimizer: 'for-loop' (one Python-level update per tensor) | 'foreach' (multi-tensor kernels)
        | 'fused' (one fused kernel; CUDA, and CPU in recent PyTorch) | 'auto' (libs.optim's choice:
        fused on CUDA, foreach elsewhere).
    ema: 'loop' (ema.mul_(rate).add_(p, alpha=1 - rate) per parameter, as the original) |
        'foreach' (libs.ema.EMAUpdater: one torch._foreach_lerp_).
    sync_every_step: read loss.item() after every step (the original's per-step logging) instead of
        accumulating it in a device tensor read every log interval.
    precision: 'fp32' | 'bf16' | 'fp16' autocast of the network forward (loss in float32).
    compile: torch.compile the network.
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
        kind = "fused" if torch.device(device).type == "cuda" else "foreach"
    flags = {"for-loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True, "fused": False},
             "fused": {"foreach": False, "fused": True}}
    if kind not in flags:
        raise ConfigError(f"optimizer implementation {kind!r} is not one of auto, {', '.join(flags)}")
    return flags[kind]


def set_optimizer_kind(optimizer, kind, device):
    """Switch an existing AdamW between for-loop / foreach / fused in place.

    The three keep the same per-parameter state ('step', 'exp_avg', 'exp_avg_sq'); only the
    'step' counter's device differs on CUDA (on the device for fused, on the host otherwise), so
    it is moved when the kind changes.
    """
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
    from libs import attention

    previous = attention.get_attention_backend()
    attention.set_attention_backend(name)
    try:
        yield
    finally:
        attention.set_attention_backend(previous)


class TrainStep:
    """One U-ViT training step, configurable per `StepOptions` between calls.

    Holds the network, its EMA copy, AdamW (libs.optim.build_optimizer, i.e. the trainer's
    parameter groups) and the LR scheduler (libs.optim.build_lr_scheduler). Calling it runs
    zero_grad, the diffusion loss forward, backward, the AdamW step, the scheduler step and the EMA
    update, in the trainer's order, and returns the loss (a float when options.sync_every_step,
    else a 0-d device tensor).

    nnet: the network (moved nowhere; put it on its device first). diffusion: sde.ContinuousVP /
    DiscreteVP. optimizer_cfg / lr_cfg: config.optimizer / config.lr_scheduler (ConfigDicts or
    dicts). options: the initial StepOptions; `step(x0, options=...)` may override per call, so one
    model and one optimizer state serve every variant (the benchmark interleaves them).
    """

    def __init__(self, nnet, diffusion, optimizer_cfg, lr_cfg, n_steps=500000, ema_rate=0.9999,
                 options=OPTIMIZED, grad_scaler=None):
        import ml_collections

        from libs.ema import EMAUpdater, make_ema
        from libs.optim import build_lr_scheduler, build_optimizer

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
            raise ConfigError(f"EMA implementation {o.ema!r} is not 'loop' or 'foreach'")
        if o.sync_every_step:
            return loss.item()  # the host sync the optimized loop avoids
        self.loss_sum += loss.detach()
        return loss.detach()

