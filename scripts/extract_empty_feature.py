"""Encode the empty prompt "" with CLIP: the unconditional context of text-to-image guidance.

Writes <output>/empty_context.npy, a (77, 768) float32 array (the original's file name and layout).
Guidance training replaces a caption's context by it with probability p_uncond, and guided sampling
uses it as eps_u's condition. Skips the work when the file exists (use --overwrite to redo).

    python scripts/extract_empty_feature.py --output=assets/datasets/coco256_features
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from accelerate import PartialState  # noqa: E402

from libs.clip import CLIP_VERSION, FrozenCLIPEmbedder  # noqa: E402
from libs.errors import exit_on_user_error  # noqa: E402
from libs.io_utils import atomic_path  # noqa: E402
from libs.logging_utils import setup_logging  # noqa: E402
from tools.cli import parse_flags  # noqa: E402

logger = logging.getLogger("extract_empty_feature")
EMPTY_CONTEXT_FILE = "empty_context.npy"


def save_npy(array, path):
    """np.save atomically (no half-written file if interrupted)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def define_flags(fv):
    flags.DEFINE_string("output", None, "feature root (config.dataset.path)", flag_values=fv)
    flags.mark_flag_as_required("output", flag_values=fv)
    flags.DEFINE_string("clip", CLIP_VERSION, "CLIP text model: hub id (local cache) or directory", flag_values=fv)
    flags.DEFINE_string("device", "cuda" if torch.cuda.is_available() else "cpu", "torch device", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "recompute even if the file exists", flag_values=fv)


def parse_args(argv=None):
    """The flags of `argv` (the arguments after the program name; None: sys.argv[1:])."""
    return parse_flags(define_flags, argv, __doc__)[0]


def main(argv=None):
    args = parse_args(argv)
    state = PartialState()
    setup_logging(state.is_main_process)
    path = os.path.join(args.output, EMPTY_CONTEXT_FILE)
    if state.is_main_process:  # one prompt: nothing to split between processes
        if os.path.isfile(path) and not args.overwrite:
            logger.info("%s exists; nothing to do (--overwrite to recompute)", path)
        else:
            context = FrozenCLIPEmbedder(args.clip, device=args.device)([""])[0].cpu().numpy()
            save_npy(context.astype(np.float32), path)
            logger.info("wrote the empty prompt's context %s to %s", context.shape, path)
    state.wait_for_everyone()


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
