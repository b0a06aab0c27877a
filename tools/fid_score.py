"""FID between two image sets, each a folder of images or an .npz with 'mu' and 'sigma'.

    python tools/fid_score.py samples/ assets/fid_stats/fid_stats_cifar10_train_pytorch.npz

Same network, preprocessing and statistics as pytorch-fid (see tools/inception.py), so the
number is comparable with the paper's. The math lives in libs/fid.py.
"""
import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from libs import fid
from libs.errors import MissingFileError, UViTError
from tools.inception import load_fid_inception

logger = logging.getLogger(__name__)


def default_num_workers():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return min(cpus, 8)


def statistics_of_path(path, model, batch_size=50, num_workers=0, dims=2048):
    """(mu, sigma) of an .npz file or of the images in a folder."""
    if path.endswith(".npz"):
        return fid.load_statistics(path)
    if not os.path.exists(path):
        raise MissingFileError(f"'{path}' is neither an existing image folder nor an .npz statistics file")
    stats = fid.dataset_statistics(fid.ImageFolder(path), model(), batch_size=batch_size,
                                   num_workers=num_workers, splits=0, dims=dims, desc=os.path.basename(path.rstrip("/")))
    return stats.mean_and_covariance()


def calculate_fid_given_paths(paths, batch_size=50, device=None, dims=2048, weights_path=None, num_workers=None):
    """FID between paths[0] and paths[1] (folders of images or .npz statistics files)."""
    if len(paths) != 2:
        raise MissingFileError(f"give exactly two paths (image folders or .npz files), got {len(paths)}")
    for p in paths:
        if not os.path.exists(p):
            raise MissingFileError(f"'{p}' does not exist: give an image folder or an .npz with 'mu' and 'sigma'")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs=2, help="image folders or .npz statistics files")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda if available)")
    parser.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048])
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers (default min(8, cpus))")
    parser.add_argument("--weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        value = calculate_fid_given_paths(args.path, args.batch_size, args.device, args.dims, args.weights, args.num_workers)
    except UViTError as e:
        logger.error("%s", e)
        return 1
    logger.info("FID: %.6f", value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
