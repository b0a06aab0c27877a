"""FID between two image sets, each a folder of images or an .npz with 'mu' and 'sigma'.

    python tools/fid_score.py samples/ assets/fid_stats/fid_stats_cifar10_train_pytorch.npz
    python tools/fid_score.py samples/ other_samples/ --batch_size=100 --device=cuda:1

Same network, preprocessing and statistics as pytorch-fid (see libs/metrics/inception.py), so the
number is comparable with the paper's. The math lives in libs/fid.py.
"""
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from absl import flags

from libs import fid
from libs.errors import MissingFileError, exit_on_user_error
from tools.cli import parse_flags
from libs.metrics.inception import load_fid_inception

logger = logging.getLogger(__name__)


def default_num_workers():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return min(cpus, 8)


def statistics_of_path(path, model, batch_size=50, num_workers=0, dims=2048):
    """(mu, sigma) of an .npz file or of the images in a folder (that it exists was checked by
    calculate_fid_given_paths; the folder's reader checks it is one)."""
    if path.endswith(".npz"):
        return fid.load_statistics(path)
    stats = fid.dataset_statistics(fid.ImageFolder(path), model(), batch_size=batch_size,
                                   num_workers=num_workers, splits=0, dims=dims, desc=os.path.basename(path.rstrip("/")))
    return stats.mean_and_covariance()


def calculate_fid_given_paths(paths, batch_size=50, device=None, dims=2048, weights_path=None, num_workers=None):
    """FID between paths[0] and paths[1] (folders of images or .npz statistics files)."""
    missing = [p for p in paths if not os.path.exists(p)]
    if len(paths) != 2 or missing:
        raise MissingFileError(f"give two existing paths, image folders or .npz files with 'mu' and 'sigma' (got "
                               f"{len(paths)}" + (f"; does not exist: {', '.join(map(repr, missing))})" if missing
                                                  else ")"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_workers = default_num_workers() if num_workers is None else num_workers
    net = None

    def model():  # built once, and only if a folder needs it (two .npz files need no weights)
        nonlocal net
        if net is None:
            net = load_fid_inception(weights_path, device=device)
        return net

    m1, s1 = statistics_of_path(paths[0], model, batch_size, num_workers, dims)
    m2, s2 = statistics_of_path(paths[1], model, batch_size, num_workers, dims)
    return fid.frechet_distance(m1, s1, m2, s2)


def define_flags(fv):
    flags.DEFINE_integer("batch_size", 50, "images per Inception forward", flag_values=fv)
    flags.DEFINE_string("device", None, "cuda, cuda:0 or cpu (default: cuda if available)", flag_values=fv)
    flags.DEFINE_enum("dims", "2048", ["64", "192", "768", "2048"], "Inception feature width (the paper: 2048)",
                      flag_values=fv)
    flags.DEFINE_integer("num_workers", None, "data loader workers (default min(8, cpus))", flag_values=fv)
    flags.DEFINE_string("weights", None, "pt_inception-2015-12-05-6726825d.pth (default: torch hub cache)",
                        flag_values=fv)


def main(argv=None):
    """argv: two paths (image folders or .npz statistics files) and the flags; None: sys.argv[1:].
    Returns the FID."""
    fv, paths = parse_flags(define_flags, argv, __doc__, positional=("path_1", "path_2"))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    value = calculate_fid_given_paths(paths, fv.batch_size, fv.device, int(fv.dims), fv.weights, fv.num_workers)
    logger.info("FID: %.6f", value)
    return value


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
