"""Encode the empty prompt "" with CLIP: the unconditional context of text-to-image guidance.

Writes <output>/empty_context.npy, a (77, 768) float32 array (the original's file name and layout).
Guidance training replaces a caption's context by it with probability p_uncond, and guided sampling
uses it as eps_u's condition. Skips the work when the file exists (use --overwrite to redo).

    python scripts/extract_empty_feature.py --output assets/datasets/coco256_features
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from libs.clip import CLIP_VERSION, FrozenCLIPEmbedder  # noqa: E402
from libs.errors import exit_on_user_error  # noqa: E402
from libs.io_utils import atomic_path  # noqa: E402
from libs.logging_utils import setup_logging  # noqa: E402

logger = logging.getLogger("extract_empty_feature")
EMPTY_CONTEXT_FILE = "empty_context.npy"


def save_npy(array, path):
    """np.save atomically (no half-written file if interrupted)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="feature root (config.dataset.path)")
    p.add_argument("--clip", default=CLIP_VERSION, help="CLIP text model: hub id (local cache) or directory")
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="recompute even if the file exists")
    return p.parse_args(argv)


def main(argv=None):
    from accelerate import PartialState

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
