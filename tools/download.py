"""Fetch the original U-ViT release's files by name into the paths the configs expect.

    python tools/download.py imagenet256_uvit_huge autoencoder_kl_ema
    python tools/download.py fid_stats_imagenet256_guided_diffusion
    python tools/download.py --all
    python tools/download.py cifar10_uvit_small --hub_repo=<user>/<mirror> --hub_revision=<commit sha>

The original release (github.com/baofff/U-ViT, README) hosts every file on Google Drive: each checkpoint as a
file, the FID statistics and autoencoders in one shared folder, listed when one of them is asked for. gdown shows
progress and resumes a partial download when run again. --hub_repo names a Hugging Face Hub mirror (files at the
paths below without the leading assets/, e.g. ckpts/cifar10_uvit_small.pth), used where Google Drive refuses or
cannot be reached; --hub_revision pins its commit. A file is written under a temporary name in its folder, checked
(not an HTML page; size and sha256 where known), then renamed into place, so the target is absent or whole. An
existing target is kept: delete it to fetch again.

Checkpoints (the EMA network weights) go to assets/ckpts/<name>.pth; sample or evaluate one with the config of the
same name (mscoco_uvit_small_deep: configs/mscoco_uvit_small.py --config.nnet.depth=16):
    python sample_class_cond.py --config=configs/imagenet256_uvit_huge.py \\
        --nnet_path=assets/ckpts/imagenet256_uvit_huge.pth --output_dir=samples
"""
import contextlib
import dataclasses
import difflib
import logging
import os
import re
import shutil
import sys
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gdown
import requests
from absl import flags

from libs.errors import CheckpointError, ConfigError, MissingFileError, exit_on_user_error
from libs.io_utils import sha256_of
from libs.logging_utils import setup_logging
from tools.cli import parse_flags

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = "https://github.com/baofff/U-ViT"
DRIVE_FILE_URL = "https://drive.google.com/uc?id={id}"
DRIVE_FOLDER_URL = "https://drive.google.com/drive/folders/{id}"
# The release README's shared folder with fid_stats/ and stable-diffusion/ (the FID statistics, the autoencoders).
FOLDER_ID = "1yo-XhqbPue3rp5P57j6QbA5QZx6KybvP"
CHECKPOINT_DIR = "assets/ckpts"  # ignored by git, like the other assets folders
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class ReleaseFile:
    """One published file. target: relative to the repository root; drive_id: its Google Drive id, None for a file
    of the shared folder (FOLDER_ID, found by name); size (bytes), sha256 (hex): None if unverified (no network)."""
    name: str
    target: str
    what: str
    drive_id: Optional[str] = None
    size: Optional[int] = None
    sha256: Optional[str] = None

    @property
    def hub_file(self):
        """The file's path in a Hub mirror: the target without the leading assets/."""
        return self.target.split("/", 1)[1]


def _checkpoint(name, what, drive_id):
    return ReleaseFile(name, f"{CHECKPOINT_DIR}/{name}.pth", what, drive_id)


def _fid_stats(name, what):
    return ReleaseFile(name, f"assets/fid_stats/{name}.npz", f"FID reference statistics of {what}")


# The Drive ids are those the release README's "Pretrained Models" table links.
FILES = (
    _checkpoint("cifar10_uvit_small", "U-ViT-S/2, CIFAR10 32x32, unconditional", "1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-"),
    _checkpoint("celeba64_uvit_small", "U-ViT-S/4, CelebA 64x64, unconditional", "13YpbRtlqF1HDBNLNRlKxLTbKbKeLE06C"),
    _checkpoint("imagenet64_uvit_mid", "U-ViT-M/4, ImageNet 64x64, class-conditional",
                "1igVgRY7-A0ZV3XqdNcMGOnIGOxKr9azv"),
    _checkpoint("imagenet64_uvit_large", "U-ViT-L/4, ImageNet 64x64, class-conditional",
                "19rmun-T7RwkNC1feEPWinIo-1JynpW7J"),
    _checkpoint("imagenet256_uvit_large", "U-ViT-L/2, ImageNet 256x256 latents, class-conditional",
                "1w7T1hiwKODgkYyMH9Nc9JNUThbxFZgs3"),
    _checkpoint("imagenet256_uvit_huge", "U-ViT-H/2, ImageNet 256x256 latents, class-conditional",
                "13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u"),
    _checkpoint("imagenet512_uvit_large", "U-ViT-L/4, ImageNet 512x512 latents, class-conditional",
                "1mkj4aN2utHMBTWQX9l1nYue9vleL7ZSB"),
    _checkpoint("imagenet512_uvit_huge", "U-ViT-H/4, ImageNet 512x512 latents, class-conditional",
                "1uegr2o7cuKXtf2akWGAN2Vnlrtw5YKQq"),
    _checkpoint("mscoco_uvit_small", "U-ViT-S/2, MS-COCO 256x256 latents, text-to-image",
                "15JsZWRz2byYNU6K093et5e5Xqd4uwA8S"),
    _checkpoint("mscoco_uvit_small_deep", "U-ViT-S/2 with depth 16, MS-COCO 256x256 latents, text-to-image",
                "1gHRy8sn039Wy-iFL21wH8TiheHK8Ky71"),
    ReleaseFile("autoencoder_kl", "assets/stable-diffusion/autoencoder_kl.pth",
                "Stable Diffusion KL-f8 autoencoder (all latent configs but the huge ones)"),
    ReleaseFile("autoencoder_kl_ema", "assets/stable-diffusion/autoencoder_kl_ema.pth",
                "Stable Diffusion KL-f8 autoencoder, EMA weights (imagenet*_uvit_huge configs)"),
    _fid_stats("fid_stats_cifar10_train_pytorch", "the CIFAR10 training set"),
    _fid_stats("fid_stats_celeba64_train_50000_ddim", "CelebA 64x64 (50,000 training images)"),
    _fid_stats("fid_stats_imagenet64_guided_diffusion", "ImageNet 64x64"),
    _fid_stats("fid_stats_imagenet256_guided_diffusion", "ImageNet 256x256"),
    _fid_stats("fid_stats_imagenet512_guided_diffusion", "ImageNet 512x512"),
    _fid_stats("fid_stats_mscoco256_val", "MS-COCO 256x256 (val2014)"))
BY_NAME = {f.name: f for f in FILES}


def names_help():
    width = max(len(f.name) for f in FILES)
    return "\nfiles (name: target, what it is):\n" + "".join(
        f"  {f.name:<{width}}  {f.target}  {f.what}\n" for f in FILES)


__doc__ += names_help()


@dataclasses.dataclass(frozen=True)
class Hub:
    """A Hugging Face Hub mirror: repo id and the commit to read (pinned: a branch may move)."""
    repo: str
    revision: str


def by_hand(file):
    """The manual route, in one sentence."""
    return (f"download {os.path.basename(file.target)} ({file.what}) from the original release's links "
            f"({RELEASE}, README) and put it at {file.target}, or name a Hub mirror with --hub_repo")


def check(file, path):
    """CheckpointError unless `path` is plausibly `file`: not an HTML page (Google Drive's answer to a quota or
    permission error), of the expected size and sha256 where known."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    size = os.path.getsize(path)
    # (fails, why), in order: the first that fails is reported; the sha256 is read only when the others pass.
    rules = ((lambda: head.startswith((b"<!doctype html", b"<html")),
              "the server sent a web page instead of the file (quota exceeded or no access)"),
             (lambda: file.size is not None and size != file.size, f"got {size} bytes, the release's file has {file.size}"),
             (lambda: file.sha256 is not None and sha256_of(path) != file.sha256, "sha256 differs from the release's file"))
    why = next((why for fails, why in rules if fails()), None)
    if why:
        raise CheckpointError(f"{file.name}: {why}; {by_hand(file)}")


@contextlib.contextmanager
def drive_errors(subject, how):
    """Turn a network failure or a refusal by Google Drive into a one-line MissingFileError."""
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, gdown.exceptions.DownloadError,
            requests.exceptions.HTTPError) as e:
        offline = isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
        reason = str(e).strip().splitlines()[0] if str(e).strip() and not offline else type(e).__name__
        raise MissingFileError((f"cannot reach Google Drive ({reason}) for {subject}" if offline else
                                f"Google Drive refused {subject} ({reason})") + f": {how}") from e


def folder_ids(folder_id=FOLDER_ID):
    """{file name: Google Drive file id} of the files in the shared folder and its sub-folders (listing only)."""
    entries = gdown.download_folder(url=DRIVE_FOLDER_URL.format(id=folder_id), skip_download=True, quiet=True)
    return {os.path.basename(e.path): e.id for e in entries}


def drive_fetch(drive_id, output):
    """Download a Google Drive file to `output` with a progress bar; gdown resumes its partial download beside
    `output` (<output>XXXXXXXX.part) with a Range request when run again."""
    gdown.download(url=DRIVE_FILE_URL.format(id=drive_id), output=output, quiet=False, resume=True)


def hub_fetch(hub, file, output):
    """Download `file` from the Hub mirror to `output`; a one-line MissingFileError when it cannot."""
    import huggingface_hub  # optional
    from huggingface_hub.errors import HfHubHTTPError  # optional

    staging = output + ".hub"  # hf_hub_download's own resumable partial lives here
    try:
        path = huggingface_hub.hf_hub_download(repo_id=hub.repo, filename=file.hub_file, revision=hub.revision,
                                               local_dir=staging)
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingFileError(f"the Hub mirror {hub.repo}@{hub.revision[:8]} has no {file.hub_file} for "
                               f"{file.name} ({reason}); {by_hand(file)}") from e
    os.replace(path, output)
    shutil.rmtree(staging, ignore_errors=True)


def _place(file, partial, fetch_into):
    """fetch_into(partial), then check it; a file that fails the check is removed."""
    fetch_into(partial)
    try:
        check(file, partial)
    except CheckpointError:
        os.remove(partial)
        raise


def fetch(file, drive_id, root=ROOT, fetcher=drive_fetch, hub=None):
    """Place `file` at root/file.target from Google Drive (`drive_id`; None: not on Drive this run),
    else from the Hub mirror `hub`; returns the path. One-line MissingFileError / CheckpointError."""
    target = os.path.join(root, file.target)
    if os.path.exists(target):
        logger.info("%s: already at %s (delete it to fetch again)", file.name, file.target)
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".unverified"  # same folder, so the final rename is atomic
    error = None
    if drive_id is None:
        error = MissingFileError(f"{file.name} is not in the release's Google Drive listing: {by_hand(file)}")
    else:
        try:
            with drive_errors(file.name, by_hand(file)):
                _place(file, partial, lambda out: fetcher(drive_id, out))
        except (MissingFileError, CheckpointError) as e:
            error = e
    if error is not None:
        if hub is None:
            raise error
        logger.warning("%s; trying the Hub mirror %s", str(error).split(":")[0], hub.repo)
        _place(file, partial, lambda out: hub_fetch(hub, file, out))
    os.replace(partial, target)
    logger.info("%s: %s (%d bytes, sha256 %s)", file.name, file.target, os.path.getsize(target), sha256_of(target))
    return target


def selected(names, everything):
    """The ReleaseFiles named on the command line (or all of them), validated before any download."""
    problems = ["name the files to fetch, or give --all (and no names)"] if everything == bool(names) else []
    for n in names:
        if n not in BY_NAME:
            close = difflib.get_close_matches(n, BY_NAME, n=1, cutoff=0.5)
            problems.append(f"unknown name {n!r}" + (f": did you mean {close[0]}?" if close else ""))
    if problems:
        raise ConfigError("; ".join(problems) + " (python tools/download.py --help lists every name)")
    return list(FILES) if everything else [BY_NAME[n] for n in dict.fromkeys(names)]


def download(names=(), everything=False, root=ROOT, fetcher=drive_fetch, hub=None):
    """Fetch the named files (or all of them); returns their paths. The shared folder is listed once,
    only when a file it holds is missing; a listing that fails goes to the Hub mirror when there is one.
    Every file is tried: one that fails raises its own one-line error; several are each logged, then named
    together, each with the folder it goes to."""
    files = selected(names, everything)
    todo = [f for f in files if not os.path.exists(os.path.join(root, f.target))]
    ids = {f.name: f.drive_id for f in todo}
    in_folder = [f for f in todo if f.drive_id is None]
    failed = []  # (file, its error); the files of a failed listing share one
    if in_folder:
        how = (f"download {', '.join(os.path.basename(f.target) for f in in_folder)} from "
               f"{DRIVE_FOLDER_URL.format(id=FOLDER_ID)} by hand ("
               + "; ".join(f"{os.path.basename(f.target)} into {os.path.dirname(f.target)}/" for f in in_folder) + ")")
        listing = {}
        try:
            with drive_errors("the folder of FID statistics and autoencoders", how):
                listing = folder_ids()
        except MissingFileError as e:
            if hub is None:
                failed += [(f, e) for f in in_folder]
            else:
                logger.warning("%s; using the Hub mirror %s for its files", str(e).split(":")[0], hub.repo)
        ids.update({f.name: listing.get(os.path.basename(f.target)) for f in in_folder})
    paths, given_up = [], {f.name for f, _ in failed}
    for f in files:
        if f.name in given_up:
            continue
        try:
            paths.append(fetch(f, ids.get(f.name), root=root, fetcher=fetcher, hub=hub))
        except (MissingFileError, CheckpointError) as e:
            failed.append((f, e))
    errors = list(dict.fromkeys(e for _, e in failed))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        for e in errors:
            logger.error("%s", e)
        raise MissingFileError(f"{len(failed)} of {len(files)} files could not be fetched (the reasons are above): "
                               + ", ".join(f"{f.name} (to {os.path.dirname(f.target)}/)" for f, _ in failed))
    return paths


def define_flags(fv):
    flags.DEFINE_bool("all", False, "fetch every file listed above", flag_values=fv)
    flags.DEFINE_string("root", ROOT, "folder the targets are relative to (the repository root)", flag_values=fv)
    flags.DEFINE_string("hub_repo", None, "Hugging Face Hub mirror, <user or org>/<name>, used where Google "
                        "Drive refuses or cannot be reached", flag_values=fv)
    flags.DEFINE_string("hub_revision", None, "the mirror's commit (40 hex digits), so that what is fetched "
                        "cannot change under the same command", flag_values=fv)


def hub_of(repo, revision):
    """The Hub mirror the flags name, or None; the revision must be a full commit hash."""
    if repo is None and revision is None:
        return None
    if repo is None or revision is None or not _COMMIT.match(revision):
        raise ConfigError(f"--hub_repo=<user or org>/<name> (got {repo}) needs --hub_revision, the mirror's full commit "
                          f"hash (40 hex digits, from the repository's history on huggingface.co; got {revision}), so "
                          "a moved branch cannot change the files")
    return Hub(repo, revision)


@exit_on_user_error
def main(argv=None):
    fv, names = parse_flags(define_flags, argv, __doc__, positional=None)
    setup_logging()
    download(names, everything=fv.all, root=fv.root, hub=hub_of(fv.hub_repo, fv.hub_revision))


if __name__ == "__main__":
    main()
