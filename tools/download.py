"""Fetch the original U-ViT release's files into the paths the configs expect.

    python tools/download.py cifar10_uvit_small
    python tools/download.py autoencoder_kl fid_stats_imagenet256_guided_diffusion
    python tools/download.py imagenet256_uvit_huge --id=https://drive.google.com/file/d/<id>/view
    python tools/download.py --all

The original release (github.com/baofff/U-ViT, README, pretrained models) hosts every file on
Google Drive; gdown fetches it with a progress bar and resumes a partial download when run again.
Give --id=<Google Drive link or file id> (the link from that README) for a file whose id the
table below does not hold; a folder link (that README links the FID statistics and the
autoencoders as folders) serves every named file it holds:
    python tools/download.py fid_stats_cifar10_train_pytorch fid_stats_mscoco256_val --id=<folder link>
A file is written under a temporary name in its folder, checked (size and sha256 where known, and
that it is not an HTML page), then renamed into place, so the target either does not exist or is
the whole file. An existing target is kept: delete it to fetch again.

Checkpoints (the EMA network weights) go to assets/ckpts/<name>.pth; evaluate one with the config of
the same name and the eval script of its kind (eval.py, eval_ldm.py, eval_ldm_discrete.py, eval_t2i_discrete.py):
    python eval.py --config=configs/cifar10_uvit_small.py --nnet_path=assets/ckpts/cifar10_uvit_small.pth
(mscoco_uvit_small_deep: configs/mscoco_uvit_small.py with --config.nnet.depth=16).
"""
import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gdown
import requests
from absl import app, flags

from libs.errors import CheckpointError, InputError, MissingFileError, exit_on_user_error
from libs.logging_utils import setup_logging

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = "https://github.com/baofff/U-ViT"
TARGETS_HELP = "the targets listed by --help"
CHECKPOINT_DIR = "assets/ckpts"  # ignored by git, like the other assets folders


@dataclasses.dataclass(frozen=True)
class ReleaseFile:
    """One published file. target: path relative to the repository root; size in bytes, sha256 as
    hex and drive_id (Google Drive file id) are None where not verified against the release."""
    name: str
    target: str
    what: str
    drive_id: Optional[str] = None
    size: Optional[int] = None
    sha256: Optional[str] = None


def _checkpoint(name, what):
    return ReleaseFile(name, f"{CHECKPOINT_DIR}/{name}.pth", what)


def _fid_stats(name, what):
    return ReleaseFile(name, f"assets/fid_stats/{name}.npz", f"FID reference statistics of {what}")


FILES = (
    _checkpoint("cifar10_uvit_small", "U-ViT-S/2 checkpoint, CIFAR10 32x32, unconditional"),
    _checkpoint("celeba64_uvit_small", "U-ViT-S/4 checkpoint, CelebA 64x64, unconditional"),
    _checkpoint("imagenet64_uvit_mid", "U-ViT-M/4 checkpoint, ImageNet 64x64, class-conditional"),
    _checkpoint("imagenet64_uvit_large", "U-ViT-L/4 checkpoint, ImageNet 64x64, class-conditional"),
    _checkpoint("imagenet256_uvit_large", "U-ViT-L/2 checkpoint, ImageNet 256x256 latents, class-conditional"),
    _checkpoint("imagenet256_uvit_huge", "U-ViT-H/2 checkpoint, ImageNet 256x256 latents, class-conditional"),
    _checkpoint("imagenet512_uvit_large", "U-ViT-L/4 checkpoint, ImageNet 512x512 latents, class-conditional"),
    _checkpoint("imagenet512_uvit_huge", "U-ViT-H/4 checkpoint, ImageNet 512x512 latents, class-conditional"),
    _checkpoint("mscoco_uvit_small", "U-ViT-S/2 checkpoint, MS-COCO 256x256 latents, text-to-image"),
    _checkpoint("mscoco_uvit_small_deep", "U-ViT-S/2 checkpoint with depth 16, MS-COCO 256x256 latents, text-to-image"),
    ReleaseFile("autoencoder_kl", "assets/stable-diffusion/autoencoder_kl.pth",
                "Stable Diffusion KL-f8 autoencoder (all latent configs but the huge ones)"),
    ReleaseFile("autoencoder_kl_ema", "assets/stable-diffusion/autoencoder_kl_ema.pth",
                "Stable Diffusion KL-f8 autoencoder, EMA weights (imagenet*_uvit_huge configs)"),
    _fid_stats("fid_stats_cifar10_train_pytorch", "the CIFAR10 training set"),
    _fid_stats("fid_stats_celeba64_train_50000_ddim", "CelebA 64x64 (50,000 training images)"),
    _fid_stats("fid_stats_imagenet64_guided_diffusion", "ImageNet 64x64"),
    _fid_stats("fid_stats_imagenet256_guided_diffusion", "ImageNet 256x256"),
    _fid_stats("fid_stats_imagenet512_guided_diffusion", "ImageNet 512x512"),
    _fid_stats("fid_stats_mscoco256_val", "MS-COCO 256x256 (val2014)"),
)
BY_NAME = {f.name: f for f in FILES}


def names_help():
    width = max(len(f.name) for f in FILES)
    return "\nfiles (name: target, what it is):\n" + "".join(
        f"  {f.name:<{width}}  {f.target}  {f.what}\n" for f in FILES)


__doc__ += names_help()


def where_to_get(file):
    """The manual route, in one sentence."""
    return (f"download {os.path.basename(file.target)} ({file.what}) from the original release's links "
            f"({RELEASE}, README, pretrained models) and put it at {file.target}, or rerun with "
            f"--id=<its Google Drive link>")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check(file, path):
    """Raise CheckpointError unless `path` is plausibly `file`: not an HTML page (what Google Drive
    answers for a quota or permission error), and of the expected size and sha256 where known."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(f"{file.name}: Google Drive sent a web page instead of the file (quota exceeded or "
                              f"no access); {where_to_get(file)}")
    size = os.path.getsize(path)
    if file.size is not None and size != file.size:
        raise CheckpointError(f"{file.name}: got {size} bytes, the release's file has {file.size}; "
                              f"{where_to_get(file)}")
    if file.sha256 is not None and sha256_of(path) != file.sha256:
        raise CheckpointError(f"{file.name}: sha256 differs from the release's file; {where_to_get(file)}")


@contextlib.contextmanager
def drive_errors(subject, how):
    """Turn a network failure or a refusal by Google Drive into a one-line MissingFileError."""
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise MissingFileError(f"cannot reach Google Drive ({type(e).__name__}) for {subject}: {how}") from e
    except gdown.exceptions.DownloadError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingFileError(f"Google Drive refused {subject} ({reason}): {how}") from e


def is_folder_link(source):
    return "://" in source and "/folders/" in source


def folder_ids(link):
    """{file name: Google Drive file id} of the files in a shared Google Drive folder (and its sub-folders)."""
    entries = gdown.download_folder(url=link, skip_download=True, quiet=True)
    return {os.path.basename(e.path): e.id for e in entries}


def drive_id(source):
    """The file id of a Google Drive file link (or `source` itself when it is already an id)."""
    if "://" not in source:
        return source
    if is_folder_link(source):
        raise InputError(f"--id={source} is a Google Drive folder; open it and give the link of the file itself")
    file_id, _ = gdown.parse_url.parse_url(source)
    if not file_id:
        raise InputError(f"--id={source} is not a Google Drive file link (https://drive.google.com/file/d/<id>/...)")
    return file_id


def drive_fetch(source, output):
    """Download a Google Drive id or link to `output` with a progress bar; gdown keeps a partial
    download beside `output` and resumes it when run again."""
    gdown.download(id=drive_id(source), output=output, quiet=False, resume=True)


def fetch(file, root=ROOT, source=None, fetcher=drive_fetch):
    """Place `file` at root/file.target; returns that path. source: a Google Drive id or link
    overriding the table's. Raises MissingFileError when no id is known or the network is unreachable."""
    target = os.path.join(root, file.target)
    if os.path.exists(target):
        logger.info("%s: already at %s (delete it to fetch again)", file.name, file.target)
        return target
    source = source or file.drive_id
    if source is None:
        raise MissingFileError(f"no Google Drive id is known for {file.name}: {where_to_get(file)}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".unverified"  # same folder, so the final rename is atomic
    with drive_errors(file.name, where_to_get(file)):
        fetcher(source, partial)
    try:
        check(file, partial)
    except CheckpointError:
        os.remove(partial)
        raise
    os.replace(partial, target)
    logger.info("%s: %s (%d bytes, sha256 %s)", file.name, file.target, os.path.getsize(target), sha256_of(target))
    return target


def selected(names, everything):
    """The ReleaseFiles named on the command line (or all of them), validated before any download."""
    if everything == bool(names):
        raise InputError("name the files to fetch, or give --all (and no names); see --help for the names")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise InputError(f"unknown name(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return list(FILES) if everything else [BY_NAME[n] for n in dict.fromkeys(names)]


def download(names=(), everything=False, source=None, root=ROOT, fetcher=drive_fetch):
    """Fetch the named files (or all of them); returns their paths."""
    files = selected(names, everything)
    if source is not None and len(files) != 1 and not is_folder_link(source):
        raise InputError("--id=<file link or id> is one file's: give exactly one name with it (a folder link may "
                         "serve several)")
    todo = [f for f in files if not os.path.exists(os.path.join(root, f.target))]
    sources = {f.name: f.drive_id for f in todo}
    if source is not None and todo:
        sources.update(folder_sources(source, todo) if is_folder_link(source) else {todo[0].name: source})
    unknown = [f for f in todo if sources[f.name] is None]
    if len(unknown) > 1:  # known before any download: say it once
        raise MissingFileError(
            f"no Google Drive id is known for {', '.join(f.name for f in unknown)}: download them from the original "
            f"release's links ({RELEASE}, README, pretrained models) and put them at {TARGETS_HELP} "
            f"(checkpoints in {CHECKPOINT_DIR}/, autoencoders in assets/stable-diffusion/, FID statistics in "
            f"assets/fid_stats/), or give their Google Drive link: <name> --id=<file link>, <names> --id=<folder link>")
    return [fetch(f, root=root, source=sources.get(f.name), fetcher=fetcher) for f in files]


def folder_sources(link, files):
    """{name: Google Drive file id} of `files`, found by file name in the shared folder `link`
    (the original README links the FID statistics and the autoencoders as folders)."""
    how = f"download {', '.join(os.path.basename(f.target) for f in files)} from {link} by hand into {TARGETS_HELP}"
    with drive_errors(f"the folder {link}", how):
        ids = folder_ids(link)
    missing = [os.path.basename(f.target) for f in files if os.path.basename(f.target) not in ids]
    if missing:
        raise InputError(f"the folder {link} holds {', '.join(sorted(ids)) or 'no files'} but not "
                         f"{', '.join(missing)}; give the link of the folder or file that holds them")
    return {f.name: ids[os.path.basename(f.target)] for f in files}


@exit_on_user_error
def main(argv):
    setup_logging()
    f = flags.FLAGS
    download(argv[1:], everything=f.all, source=f.id, root=f.root)


def define_flags():
    flags.DEFINE_bool("all", False, "fetch every file listed above")
    flags.DEFINE_string("id", None, "Google Drive link or id of the one named file, or link of a folder holding "
                        "the named files (from the original release's README), for files whose id the table lacks")
    flags.DEFINE_string("root", ROOT, "folder the targets are relative to (the repository root)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
