"""Encode the fixed visualisation prompts with CLIP: the rows of text-to-image sample grids.

Writes <output>/vis_prompts.json (the K prompts) and <output>/vis_contexts.npy ((K, 77, 768) float32).
By default the prompts are the twelve MS-COCO val2014 captions the original used for its training
grids (run_vis); --prompts_file gives others, one per line. Skips the work when both files exist
and hold the same prompts (use --overwrite to redo).

    python scripts/extract_test_prompt_feature.py --output=assets/datasets/coco256_features
"""
import io
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from accelerate import PartialState  # noqa: E402

from libs.clip import CLIP_VERSION, FrozenCLIPEmbedder  # noqa: E402
from libs.errors import DataError, MissingFileError, exit_on_user_error  # noqa: E402
from libs.io_utils import atomic_write_bytes  # noqa: E402
from libs.logging_utils import setup_logging  # noqa: E402
from tools.cli import parse_flags  # noqa: E402

logger = logging.getLogger("extract_test_prompt_feature")
VIS_PROMPTS_FILE, VIS_CONTEXTS_FILE = "vis_prompts.json", "vis_contexts.npy"

# MS-COCO val2014 captions, the original's visualisation prompts.
DEFAULT_PROMPTS = [
    "A green train is coming down the tracks.",
    "A group of skiers are preparing to ski down a mountain.",
    "A small kitchen with a low ceiling.",
    "A group of elephants walking in muddy water.",
    "A living area with a television and a table.",
    "A road with traffic lights, street lights and cars.",
    "A bus driving in a city area with traffic signs.",
    "A bus pulls over to the curb close to an intersection.",
    "A group of people are walking and one is holding an umbrella.",
    "A baseball player taking a swing at an incoming ball.",
    "A city street line with brick buildings and trees.",
    "A close up of a plate of broccoli and sauce.",
]


def read_prompts(path):
    """Non-empty lines of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"prompts file '{path}' not found (one prompt per line).")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise DataError(f"prompts file '{path}' holds no prompts.")
    return prompts


def define_flags(fv):
    flags.DEFINE_string("output", None, "feature root (config.dataset.path)", flag_values=fv)
    flags.mark_flag_as_required("output", flag_values=fv)
    flags.DEFINE_string("prompts_file", None, "text file, one prompt per line (default: the built-in list)",
                        flag_values=fv)
    flags.DEFINE_string("clip", CLIP_VERSION, "CLIP text model: hub id (local cache) or directory", flag_values=fv)
    flags.DEFINE_string("device", "cuda" if torch.cuda.is_available() else "cpu", "torch device", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "prompts per CLIP forward pass", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "recompute even if the files exist", flag_values=fv)


def parse_args(argv=None):
    """The flags of `argv` (the arguments after the program name; None: sys.argv[1:])."""
    return parse_flags(define_flags, argv, __doc__)[0]


def _up_to_date(prompts_path, contexts_path, prompts):
    if not (os.path.isfile(prompts_path) and os.path.isfile(contexts_path)):
        return False
    with open(prompts_path) as f:
        return json.load(f) == prompts


def main(argv=None):
    args = parse_args(argv)
    state = PartialState()
    setup_logging(state.is_main_process)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else list(DEFAULT_PROMPTS)
    prompts_path = os.path.join(args.output, VIS_PROMPTS_FILE)
    contexts_path = os.path.join(args.output, VIS_CONTEXTS_FILE)
    if state.is_main_process:  # a dozen prompts: nothing to split between processes
        if _up_to_date(prompts_path, contexts_path, prompts) and not args.overwrite:
            logger.info("%s is up to date; nothing to do (--overwrite to recompute)", contexts_path)
        else:
            clip = FrozenCLIPEmbedder(args.clip, device=args.device)
            contexts = np.concatenate([clip(prompts[i:i + args.batch_size]).cpu().numpy()
                                       for i in range(0, len(prompts), args.batch_size)]).astype(np.float32)
            buf = io.BytesIO()
            np.save(buf, contexts)
            # Contexts first, prompts last: the prompts file names what the contexts hold.
            atomic_write_bytes(buf.getvalue(), contexts_path)
            atomic_write_bytes(json.dumps(prompts, indent=1).encode(), prompts_path)
            logger.info("wrote %d prompt contexts %s to %s", len(prompts), contexts.shape, contexts_path)
    state.wait_for_everyone()


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
