"""Reconstruct the post-hoc EMA of any width from a run's snapshots into a network state dict.

    python tools/posthoc_ema.py --workdir=workdir/imagenet256_uvit_large/default --sigma_rel=0.08
    python tools/posthoc_ema.py --workdir=W --sigma_rel=0.12 --step=200000 --output=in256_l2_ema012.pth

The run must have trained with --config.posthoc_ema.snapshot_interval=<steps> (libs/posthoc_ema.py; Karras
et al. 2024, EDM2). The output is a plain .pth state dict of the network, written atomically: what
eval*.py / sample_*.py take as --nnet_path and tools/export.py exports. Beside it, <stem>.config.json holds the
run's config (objective and network included): the scripts read it when no --config is given and refuse a
--config of another objective or network.
A width the stored profiles cannot reconstruct is refused in one line naming the widths that can.
"""
import json
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from absl import flags

from libs.errors import exit_on_user_error
from libs.io_utils import atomic_path
from libs.logging_utils import setup_logging
from libs.export import write_sidecar
from libs.posthoc_ema import reconstruct
from libs.resume_policy import config_history
from tools.cli import parse_flags

logger = logging.getLogger("posthoc_ema")


def define_flags(fv):
    flags.DEFINE_string("workdir", None, "the run's directory (holds posthoc_ema/<step>.pth)", flag_values=fv)
    flags.DEFINE_float("sigma_rel", None, "relative EMA width to reconstruct (EDM2's sigma_rel, e.g. 0.08)",
                       flag_values=fv)
    for name in ("workdir", "sigma_rel"):
        flags.mark_flag_as_required(name, flag_values=fv)
    flags.DEFINE_integer("step", None, "training step of the EMA (a snapshot's step); default: the last snapshot",
                         flag_values=fv)
    flags.DEFINE_string("output", None, "the .pth to write; default <workdir>/posthoc_ema_<sigma_rel>_<step>.pth",
                        flag_values=fv)


def main(argv=None):
    args = parse_flags(define_flags, argv, __doc__)[0]
    setup_logging(True)
    state, info = reconstruct(args.workdir, args.sigma_rel, args.step)
    output = args.output or os.path.join(args.workdir, f"posthoc_ema_{args.sigma_rel:g}_{info['step']}.pth")
    records = config_history(args.workdir)  # the objective and network cannot change on resume: the last one
    with atomic_path(output) as tmp:
        torch.save(state, tmp)
    if records:  # (snapshots copied without their run's config: nothing to say)
        with open(records[-1]) as f:
            config = json.load(f)
        write_sidecar(output, config, step=info['step'], source=f"posthoc_ema sigma_rel={args.sigma_rel:g}")
    logger.info("EMA of sigma_rel %g (gamma %.3f) at step %d from %d snapshots (profile error %.2g%%) -> %s",
                info['sigma_rel'], info['gamma'], info['step'], info['snapshots'], 100 * info['profile_error'],
                output)
    return output


if __name__ == "__main__":
    exit_on_user_error(main)()
