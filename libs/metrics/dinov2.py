"""The DINOv2 ViT-L/14 feature network of FD-DINOv2 (Stein et al. 2023, arXiv 2306.04675; EDM2, arXiv 2312.02696).

FD-DINOv2 is the Frechet distance (libs.fid.frechet_distance) of the 1024-d features DINOv2 ViT-L/14
(Oquab et al. 2023) returns for each image: its normalised class token. Images are prepared as EDM2's
evaluation does ("torch" resize mode): uint8 pixels resized to 224 x 224 bicubically with antialiasing,
divided by 255, normalised with ImageNet's mean and std.

The network is the facebookresearch/dinov2 torch hub entry `dinov2_vitl14`, built from the hub's local
repository cache (`<torch hub dir>/facebookresearch_dinov2_main`, written by any earlier
`torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`) and loaded with the weights file
`dinov2_vitl14_pretrain.pth` (`<torch hub dir>/checkpoints/`), so nothing is downloaded.
"""
import logging
import os

import torch
import torch.nn.functional as F

from libs.errors import CheckpointError, require_path

logger = logging.getLogger(__name__)

DIMS = 1024
INPUT_SIZE = 224
HUB_ENTRY = "dinov2_vitl14"
WEIGHTS_FILENAME = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + WEIGHTS_FILENAME
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_repo_dir():
    return os.path.join(torch.hub.get_dir(), "facebookresearch_dinov2_main")


def default_weights_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILENAME)


class DINOv2Features(torch.nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> {'dinov2': (B, D) float32}, D = 1024 for ViT-L/14."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        x = F.interpolate(x.float().mul(255).round(), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        x = x / 255
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (_MEAN, _STD))
        return {"dinov2": self.model((x - mean) / std).float()}


def load_dinov2(weights_path=None, repo_dir=None, device=None):
    """DINOv2Features of ViT-L/14 from the hub repository `repo_dir` and the weights file `weights_path`
    (defaults: the torch hub cache). A missing file is a MissingFileError saying what to put where."""
    repo_dir = repo_dir or default_repo_dir()
    weights_path = weights_path or default_weights_path()
    require_path(os.path.join(repo_dir, "hubconf.py"), "the DINOv2 code (its hubconf.py, in the torch hub cache)",
                 f"On a machine with network run `python -c \"import torch; torch.hub.load('facebookresearch/dinov2', "
                 f"'{HUB_ENTRY}')\"` and copy {torch.hub.get_dir()} here, or give the folder with hubconf.py "
                 "(--config.metrics.dinov2_repo, tools/evaluator.py --dinov2_repo)", kind='file')
    require_path(weights_path, "DINOv2 weights", f"Download {WEIGHTS_URL} and put it there, or give its path "
                 "(--config.metrics.dinov2_weights, tools/evaluator.py --dinov2_weights)", kind='file')
    model = torch.hub.load(repo_dir, HUB_ENTRY, source="local", pretrained=False, verbose=False)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise CheckpointError(f"'{weights_path}' is not the {HUB_ENTRY} weights ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]}); download {WEIGHTS_URL} again") from e
    logger.info("loaded DINOv2 %s from %s", HUB_ENTRY, weights_path)
    return DINOv2Features(model).to(device or "cpu")
