"""Performance switches the trainer applies: TF32 matmuls on Ampere+ GPUs and torch.compile of the network."""
import logging

import torch

logger = logging.getLogger(__name__)


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
