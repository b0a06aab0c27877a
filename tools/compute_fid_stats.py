"""Write FID reference statistics (mu, sigma, n, source) of an image folder or a dataset config.

    python tools/compute_fid_stats.py --path=my_images/ --output=assets/fid_stats/my_data.npz
    python tools/compute_fid_stats.py --config=configs/cifar10_uvit_small.py \\
        --output=assets/fid_stats/fid_stats_cifar10_train_pytorch.npz
    accelerate launch --num_processes 8 tools/compute_fid_stats.py --config=...   # sharded over GPUs

With --config the dataset's training images ('x' in [-1, 1]) are mapped to [0, 1], quantised as
PNGs would be, and scored with random flips turned off, so the statistics describe the data
itself. The output is written atomically: an interrupted run leaves any previous file intact.
"""
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from absl import app, flags
from accelerate import Accelerator

from libs import fid
from libs.config_utils import define_config_flag
from libs.datasets import dataset_kwargs, get_dataset
from libs.datasets.base import list_images
from libs.errors import ConfigError, exit_on_user_error
from libs.logging_utils import setup_logging
from libs.metrics.suite import (MetricOptions, dataset_batches, load_networks, parse_names, reference_arrays,
                                reference_file_arrays)
from libs.metrics.inception import load_fid_inception

logger = logging.getLogger(__name__)


class DatasetImages(torch.utils.data.Dataset):
    """A libs.datasets training set seen as images (3, H, W) in [0, 1], quantised like a PNG."""

    def __init__(self, train):
        self.train = train

    def __len__(self):
        return len(self.train)

    def __getitem__(self, i):
        x = self.train[i]["x"]
        x = ((x.float() + 1) / 2).clamp(0, 1)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return fid.quantize_like_png(x[None])[0]


class NestedImageFolder(fid.ImageFolder):
    """fid.ImageFolder over a folder and its subfolders: an `image_folder` dataset with one subfolder per class
    (hidden files and folders skipped, as the dataset does), read as fid.ImageFolder reads its images."""

    where = " or its subfolders"

    @staticmethod
    def list_files(path):
        return list_images(path, recursive=True)


def dataset_images(config):
    """(images dataset, description) of a config's training set."""
    kwargs = dataset_kwargs(config)
    if "random_flip" in kwargs:
        kwargs["random_flip"] = False  # reference statistics of the data, not of its augmentation
    data = get_dataset(config.dataset.name, **kwargs)
    if data.kind == "latent_moments":
        raise ConfigError(f"dataset {config.dataset.name!r} stores autoencoder latents, not images; compute the "
                          f"statistics from the image folder instead (--path=<folder of the original images>)")
    return DatasetImages(data.train), f"dataset {config.dataset.name} ({kwargs})"


def compute(output, path=None, config=None, batch_size=50, num_workers=0, weights_path=None, splits=0, metrics="",
            resize="pytorch-fid"):
    """Write the statistics of `path` (an image folder) or `config` (its training set) to `output`."""
    problems = ["give exactly one of --path (an image folder) and --config (a dataset config)"] if (
        (path is None) == (config is None)) else []
    problems += [] if output.endswith(".npz") else [f"--output must end in .npz (got {output!r})"]
    if problems:
        raise ConfigError("; ".join(problems))
    accelerator = Accelerator()
    if path is not None:
        # Loose images: that folder alone (pytorch-fid's reading); none: the class subfolders of an image_folder.
        flat = os.path.isdir(path) and list_images(path, recursive=False)
        images = fid.ImageFolder(path) if flat else NestedImageFolder(path)
        source = f"image folder {os.path.abspath(path)}"
    else:
        images, source = dataset_images(config)
    model = load_fid_inception(weights_path, device=accelerator.device)
    stats = fid.dataset_statistics(images, model, batch_size=batch_size, num_workers=num_workers, splits=splits,
                                   accelerator=accelerator, desc="reference statistics")
    extra = {}
    if metrics:  # the reference arrays of sFID, precision/recall, KID, FD-DINOv2 too (a second pass)
        names = [m for m in parse_names(metrics) if m not in ("fid", "is", "clip_score")]
        options = MetricOptions(names=tuple(names), inception_weights=weights_path, resize=resize)
        networks = load_networks(options, accelerator.device)
        extra = reference_file_arrays(reference_arrays(dataset_batches(images, accelerator, batch_size, num_workers),
                                                       len(images), names, networks, accelerator))
    if accelerator.is_main_process:
        fid.save_statistics(output, stats, source, **extra)
    accelerator.wait_for_everyone()
    return stats


@exit_on_user_error
def main(argv):
    del argv
    f = flags.FLAGS
    setup_logging(int(os.environ.get("RANK", 0)) == 0)
    compute(f.output, path=f.path, config=f.config, batch_size=f.batch_size, num_workers=f.num_workers,
            weights_path=f.inception_weights, metrics=f.metrics, resize=f.resize)


def define_flags():
    define_config_flag("config", None, "dataset config (configs/X.py) whose training images are described")
    flags.DEFINE_string("path", None, "folder of images (png, jpg, ...) to describe")
    flags.DEFINE_string("output", None, "the .npz to write (mu, sigma, n, source)", required=True)
    flags.DEFINE_integer("batch_size", 50, "images per Inception forward")
    flags.DEFINE_integer("num_workers", 0, "data loader worker processes")
    flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    flags.DEFINE_string("metrics", "", "also the reference arrays of these metrics (e.g. sfid,prc,kid,fd_dinov2): "
                                       "mu_s/sigma_s, pool (N x 2048 features), mu_dinov2/sigma_dinov2")
    flags.DEFINE_enum("resize", "pytorch-fid", ["pytorch-fid", "adm"], "the Inception network's resize for them")


if __name__ == "__main__":
    define_flags()
    app.run(main)
