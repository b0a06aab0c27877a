"""The FID Inception-v3: TF's 2015-12-05 graph as ported by pytorch-fid.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
arXiv 1706.08500) is defined on the pool3 features of the TensorFlow graph `inception-2015-12-05`. Its PyTorch port
(`pt_inception-2015-12-05-6726825d.pth`, published by pytorch-fid) is torchvision's Inception-v3 layout with these
differences, all reproduced here:
- the average-pooling branch of the A, C and first E blocks divides by the number of real pixels in each 3x3
  window (TF's 'SAME' average pooling), not by 9 at the borders;
- the last E block (Mixed_7c) pools its pool branch with a 3x3 *max* pool;
- the classifier has 1008 outputs (TF's label map), and there is no auxiliary head.
The paper's FIDs (and DiT/SiT/ADM tables computed with pytorch-fid) use exactly this network; another Inception
would make our numbers incomparable.

Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv 1606.03498): the reference
code multiplies pool3 of the same graph by the 1008-way softmax layer's weights *without its bias*, then takes a
softmax over all 1008 outputs. `logits` below are exactly that (torch-fidelity's 'logits_unbiased'). The remaining
differences to the TF reference are the resize kernel (torch bilinear instead of TF's) and float rounding.
"""
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from libs.errors import CheckpointError, InputError, require_path

logger = logging.getLogger(__name__)

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
INPUT_SIZE = 299
NUM_TF_CLASSES = 1008  # TF's Inception label map: 1000 ImageNet classes + 8 unused entries
FEATURE_DIMS = (64, 192, 768, 2048)  # the four depths pytorch-fid exposes; 2048 = pool3 (the FID standard)
# sFID (Nash et al. 2021, arXiv 2103.03841, as the ADM evaluator computes it): the first 7 channels of TF's
# 'mixed_6/conv' (the 1x1 branch of Mixed_6d, (B, 192, 17, 17) after its ReLU), flattened height-width-channel
# as TF's NHWC tensors are, so statistics equal ADM reference batches' 'mu_s' / 'sigma_s' up to the resize.
SPATIAL_CHANNELS = 7
SPATIAL_DIMS = 17 * 17 * SPATIAL_CHANNELS  # 2023
RESIZES = ("pytorch-fid", "adm")  # how images reach 299x299 (see `resize_for_inception`)
_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub convention: the file name carries its hash prefix
_DOWNLOAD_TIMEOUT_S = 10


def default_weights_path():
    """Where torch hub (and so pytorch-fid) caches the FID weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILENAME)


def tf1_resize_bilinear(x, size):
    """x: (B, C, h, w) float -> (B, C, size, size), as TF1's tf.image.resize_bilinear(align_corners=False), which
    the ADM evaluator's graph uses: TF1 (no half-pixel centres) samples output pixel o at input position o * h / size,
    clamping the right neighbour at the border; torch's align_corners=False samples (o + 0.5) h / size - 0.5."""
    def axis(n):
        pos = torch.arange(size, dtype=torch.float64) * (n / size)
        lo = pos.floor().long().clamp(max=n - 1)
        return lo, (lo + 1).clamp(max=n - 1), (pos - lo).to(x.dtype).to(x.device)

    (y0, y1, fy), (x0, x1, fx) = axis(x.shape[2]), axis(x.shape[3])
    fy, fx = fy[:, None], fx[None, :]
    top = x[:, :, y0][:, :, :, x0] * (1 - fx) + x[:, :, y0][:, :, :, x1] * fx
    bottom = x[:, :, y1][:, :, :, x0] * (1 - fx) + x[:, :, y1][:, :, :, x1] * fx
    return top * (1 - fy) + bottom * fy


def resize_for_inception(x, resize="pytorch-fid"):
    """x: (B, 3, H, W) float in [0, 1] -> (B, 3, 299, 299) in about [-1, 1], the network's input.

    'pytorch-fid' (the default, U-ViT's and the paper's FIDs): torch bilinear (align_corners=False), then 2 x - 1.
    'adm': the ADM evaluator's TF graph on uint8 pixels p = 255 x: `tf1_resize_bilinear`, then (p - 128) / 128.
    """
    assert resize in RESIZES, resize  # config.metrics.resize and tools/evaluator.py's --resize are checked choices
    if resize == "pytorch-fid":
        return 2 * F.interpolate(x.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False) - 1
    return (tf1_resize_bilinear(x.float().mul(255).round(), INPUT_SIZE) - 128) / 128


def _tf_avg_pool(x):
    # TF's 'SAME' average pooling ignores the zero padding when averaging.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _BlockA(InceptionA):
    """Mixed_5b..5d: torchvision's InceptionA layers, TF pooling."""

    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_tf_avg_pool(x))]


class _BlockC(InceptionC):
    """Mixed_6b..6e: torchvision's InceptionC layers, TF pooling."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_tf_avg_pool(x))]


class _BlockE(InceptionE):
    """Mixed_7b (TF average pooling) and Mixed_7c (max pooling, a quirk of the TF graph)."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self._pool = pool

    def _forward(self, x):
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1),
                torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1), self.branch_pool(self._pool(x))]


class FIDInceptionV3(nn.Module):
    """Inception-v3 with the FID weights; pool3 features and unbiased 1008-way logits. Attribute names are the keys
    of the pt_inception weights file (loads strictly). Always eval, no gradients: a fixed measuring instrument. The
    constructor builds the layers only; `load_fid_inception` builds and loads the weights."""

    def __init__(self):
        super().__init__()
        # Stem, (B, 3, 299, 299) -> (B, 192, 35, 35)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        # 35x35 -> 17x17 -> 8x8
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = _BlockC(768, channels_7x7=128)
        self.Mixed_6c = _BlockC(768, channels_7x7=160)
        self.Mixed_6d = _BlockC(768, channels_7x7=160)
        self.Mixed_6e = _BlockC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = _BlockE(1280, pool=_tf_avg_pool)
        self.Mixed_7c = _BlockE(2048, pool=_max_pool)
        self.fc = nn.Linear(2048, NUM_TF_CLASSES)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode=True):
        # BatchNorm must use the ported running statistics, never batch statistics.
        return super().train(False)

    def forward(self, x, dims=2048, with_logits=False):
        """x: (B, 3, H, W) float in [0, 1] -> features (B, dims) float32; with `with_logits` (dims=2048 only) also the
        unbiased 1008-way logits (B, 1008) of the Inception Score. Resized to 299x299 and mapped to [-1, 1] here,
        as pytorch-fid does."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"the FID Inception network expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        # the library's own arguments (tools/fid_score.py's --dims is an enum of FEATURE_DIMS)
        assert dims in FEATURE_DIMS and (dims == 2048 or not with_logits), (dims, with_logits)
        x = resize_for_inception(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        if dims == 64:
            return x.mean((2, 3))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        if dims == 192:
            return x.mean((2, 3))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)  # ends at (B, 768, 17, 17)
        if dims == 768:
            return x.mean((2, 3))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        features = x.mean((2, 3))  # pool3, (B, 2048)
        if not with_logits:
            return features
        return features, features @ self.fc.weight.t()  # no bias: Salimans et al.'s reference IS code

    def all_features(self, x, resize="pytorch-fid"):
        """x: (B, 3, H, W) float in [0, 1] -> {'pool': (B, 2048), 'logits': (B, 1008), 'spatial': (B, 2023)}.
        One forward for FID / precision / recall / KID (pool3), IS (unbiased logits) and sFID (spatial).
        With resize='pytorch-fid', 'pool' and 'logits' equal `forward(x, with_logits=True)` bit for bit.
        """
        assert x.ndim == 4 and x.shape[1] == 3, x.shape  # the metric suite's batches (libs/metrics/suite.py)
        x = resize_for_inception(x, resize)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # TF's mixed_6/conv, (B, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))
        pool = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x))).mean((2, 3))
        return {"pool": pool, "logits": pool @ self.fc.weight.t(),
                "spatial": spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)}


def problems(fid):
    """[('inception_weights', message)] when config.fid names weights that are not there (None: the default
    location, downloaded when absent): what libs.config_utils.parse_and_validate reports before any work."""
    weights = fid.get("inception_weights")
    if weights is not None and not (isinstance(weights, str) and os.path.exists(weights)):
        return [("inception_weights", "does not exist: give the path of pt_inception-2015-12-05 weights, or None "
                                      "for the default location")]
    return []


def load_fid_inception(weights_path=None, device=None, download=True):
    """The FID Inception network with its weights loaded (strictly), in eval mode, on `device`.

    weights_path: the `pt_inception-2015-12-05-6726825d.pth` file; None = the torch hub cache
    (`default_weights_path()`), downloaded there if absent and the network is reachable."""
    path = weights_path or default_weights_path()
    net = FIDInceptionV3()
    net.load_state_dict(load_weights(path, download=download and weights_path is None))
    return net.to(device or "cpu")


def load_weights(path, download=False):
    """The FID weights' state dict from `path`; download to it first if allowed and absent. Raises MissingFileError
    (absent, not downloadable) or CheckpointError (unreadable file)."""
    if not os.path.exists(path) and download:
        _download(path)
    require_path(path, "FID Inception weights", f"Download {WEIGHTS_URL} (the pytorch-fid port of TF's "
                 "inception-2015-12-05) and put it there, or pass its location (--inception_weights / "
                 f"weights_path=...). Default location: {default_weights_path()}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise CheckpointError(f"could not read the FID Inception weights '{path}' ({type(e).__name__}: {e}): it is "
                              f"corrupt or truncated. Delete it and download {WEIGHTS_URL} again.") from e
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise CheckpointError(f"'{path}' is not the FID Inception weights file (pt_inception-2015-12-05): it lacks "
                              f"the Mixed_7c layers. Download {WEIGHTS_URL}.")
    return state


def _download(path):
    """Fetch the weights with a short timeout; on any failure leave nothing behind and return."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    logger.info("downloading the FID Inception weights from %s to %s", WEIGHTS_URL, path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".inception-download-")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(WEIGHTS_URL, timeout=_DOWNLOAD_TIMEOUT_S) as r:
            shutil.copyfileobj(r, f)
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if not digest.startswith(_WEIGHTS_SHA256_PREFIX):
            logger.warning("downloaded FID weights have sha256 %s, expected %s...: discarded", digest, _WEIGHTS_SHA256_PREFIX)
            return
        os.replace(tmp, path)  # atomic: a concurrent reader never sees a partial file
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        logger.warning("could not download the FID Inception weights: %s", e)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def random_state_dict(seed=0):
    """A randomly initialised state dict in the FID weights' layout (for tests and smoke runs). He-normal convolutions
    and near-identity BatchNorms keep the features of order one through the 94 layers (the default init vanishes)."""
    g = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            v = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.weight"):
            v = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.startswith("fc."):
            v = torch.randn(v.shape, generator=g) * 2048 ** -0.5
        state[k] = v.clone()
    return state
