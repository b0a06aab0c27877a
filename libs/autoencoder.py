"""The KL-f8 autoencoder of latent diffusion, frozen, as U-ViT's latent models use it.

Architecture from Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022),
Stable Diffusion's first stage: a conv encoder maps a (B, 3, H, W) image in [-1, 1] to the mean and log-variance of
a diagonal Gaussian over a (B, 4, H/8, W/8) latent; a decoder maps back. Parameter names follow the original, so
`assets/stable-diffusion/autoencoder_kl.pth` (U-ViT release) loads strict (tests/test_autoencoder.py checks the keys).

Beyond the original: the model builds without a checkpoint (random init, for tests); a checkpoint may carry its own
architecture, ``{'ddconfig': ..., 'embed_dim': ..., 'state_dict': ...}`` (tiny test models); diffusers weights (e.g.
sd-vae-ft-ema / -mse ``diffusion_pytorch_model.safetensors``, DiT's autoencoders) are converted on load by a tested
one-to-one table of renaming rules (`diffusers_to_ours_state_dict`). Every other diffusers autoencoder (AutoencoderKL of
other channel counts or blocks, AutoencoderDC) loads through diffusers itself (libs/diffusers_autoencoder.py);
`autoencoder_of(config)` picks the loader and checks config.z_shape against the model.

Conventions: images (B, 3, H, W) float in [-1, 1]; moments (B, 2 * embed_dim, H/8, W/8) holding
(mean, logvar) in that order along channels; latents z = scale_factor * (mean + std * noise).
"""
import contextlib
import json
import logging
import os
import pickle
import re
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from libs import diffusers_autoencoder
from libs.errors import CheckpointError, ConfigError, InputError, require_path
from libs.latent_stats import FILE as LATENT_STATS_FILE, LatentStats

logger = logging.getLogger(__name__)

# Stable Diffusion's first-stage configuration (ldm `kl-f8`), the one every U-ViT latent model uses.
SD_KL_F8_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                         ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0)
SD_EMBED_DIM = 4
# Latent scaling of Stable Diffusion (unit variance of the scaled ImageNet latents). The MS-COCO
# config overrides it with 0.23010 in its own config file.
SD_LATENT_SCALE = 0.18215
# Log-variance clamp of ldm's DiagonalGaussianDistribution.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

DEFAULT_PATH = "assets/stable-diffusion/autoencoder_kl.pth"
_WHERE_TO_GET_IT = (
    "Download the Stable Diffusion autoencoder of the U-ViT release (autoencoder_kl.pth, or "
    "autoencoder_kl_ema.pth for the *huge* configs) and put it at assets/stable-diffusion/, or point "
    "config.autoencoder.pretrained_path at a diffusers KL-f8 'diffusion_pytorch_model.safetensors'.")


def _group_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice plus a (1x1 conv when channels change) shortcut; no time input."""

    def __init__(self, in_channels, out_channels, dropout=0.0):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, projections as 1x1 convs (ldm's 'vanilla')."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head of width C; SDPA's default scale C^-0.5 is ldm's scale.
        q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (right/bottom only), as ldm does."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: n ResnetBlocks, each followed by an AttnBlock when `attention`, then an optional
    resampling layer the caller stores as `downsample` / `upsample` (keys `down.{i}.block.{j}`); `.channels`: width."""

    def __init__(self, block_in, width, n_blocks, attention, dropout):
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(block_in, width, dropout))
            block_in = width
            if attention:
                self.attn.append(AttnBlock(width))
        self.channels = width

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                h = getattr(self, name)(h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels, dropout):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2*z_channels if double_z else z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, dropout=0.0, in_channels,
                 resolution, z_channels, double_z=True, **ignored):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level(ch * in_mult[i], ch * mult, num_res_blocks, res in attn_resolutions, dropout)
            block_in = level.channels
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*2^(L-1), w*2^(L-1)); levels stored low-res last as in ldm."""

    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout=0.0, resolution,
                 z_channels, **ignored):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout)
        levels = []
        for i in reversed(range(self.num_resolutions)):
            level = _Level(block_in, ch * ch_mult[i], num_res_blocks + 1, res in attn_resolutions, dropout)
            block_in = level.channels
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # up[0] is the full-resolution level, executed last
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FrozenAutoencoderKL(nn.Module):
    """KL autoencoder with U-ViT's latent interface; always frozen and in eval mode.

    ddconfig: the ldm Encoder/Decoder settings (SD_KL_F8_DDCONFIG). embed_dim: latent channels (4 for KL-f8).
    pretrained_path: original .pth, self-describing dict, or diffusers safetensors / directory; None: random init.
    scale_factor: multiplies latents after sampling and divides them before decoding.
    """

    def __init__(self, ddconfig, embed_dim, pretrained_path=None, scale_factor=SD_LATENT_SCALE):
        super().__init__()
        ddconfig = dict(ddconfig)
        assert ddconfig.get("double_z", True), "the encoder must output mean and logvar (get_model checks the files)"
        self.ddconfig = ddconfig
        self.embed_dim = int(embed_dim)
        self.scale_factor = float(scale_factor)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        state_dict = None
        if pretrained_path is not None:
            state_dict = read_state_dict(pretrained_path, num_resolutions=len(ddconfig["ch_mult"]))
        # With weights to load, skip the random initialisation (seconds for 84M parameters on a CPU):
        # build on the meta device and adopt the loaded tensors.
        with torch.device("meta") if state_dict is not None else contextlib.nullcontext():
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
            self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * self.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(self.embed_dim, ddconfig["z_channels"], 1)
        if state_dict is not None:
            load_strict(self, state_dict, source=pretrained_path, assign=True)
            logger.info("loaded autoencoder weights from %s", pretrained_path)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode=True):
        """Frozen: stays in eval mode whatever is asked (the trainer may call .train() on everything)."""
        return super().train(False)

    stochastic = True  # moments are (mean, logvar): `sample` draws a latent

    @property
    def moment_channels(self):
        return 2 * self.embed_dim

    def latent_shape(self, image_shape):
        """(embed_dim, H/f, W/f) of the latents of (3, H, W) images."""
        return (self.embed_dim, image_shape[-2] // self.downsample_factor, image_shape[-1] // self.downsample_factor)

    def mean_latent(self, moments):
        """The unscaled posterior mean (B, embed_dim, h, w) of `moments`."""
        return moments[:, :self.embed_dim]

    # -- latent interface -----------------------------------------------------------------------

    def encode_moments(self, x):
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> (B, 2*embed_dim, H/8, W/8) (mean, logvar)."""
        _check_image(x, self.ddconfig["in_channels"], self.downsample_factor)
        return self.quant_conv(self.encoder(x))

    def sample(self, moments, generator=None):
        """moments: (B, 2*embed_dim, h, w) -> z = scale_factor * (mean + exp(logvar/2) * noise), (B, embed_dim, h, w).
        logvar is clamped to [-30, 20] as in ldm's DiagonalGaussianDistribution. `generator` (on the moments'
        device) seeds the noise; None uses torch's default generator.
        """
        if moments.dim() != 4 or moments.shape[1] != 2 * self.embed_dim:
            raise InputError(f"moments must be (B, {2 * self.embed_dim}, h, w) (mean, logvar); got {tuple(moments.shape)}.")
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean + std * noise)

    def encode(self, x, generator=None):
        """x: (B, 3, H, W) in [-1, 1] -> scaled latent sample (B, embed_dim, H/8, W/8)."""
        return self.sample(self.encode_moments(x), generator)

    def decode(self, z):
        """z: scaled latents (B, embed_dim, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise InputError(f"latents must be (B, {self.embed_dim}, h, w); got {tuple(z.shape)}.")
        return self.decoder(self.post_quant_conv(z / self.scale_factor))

    def decode_in_chunks(self, z, chunk=50):
        """decode() `chunk` latents at a time so that decoding 50k samples never holds all activations."""
        assert chunk >= 1, chunk
        return torch.cat([self.decode(part) for part in z.split(chunk)], dim=0)


def _check_image(x, channels, factor):
    shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
    # NaN/inf checked on the CPU only: on a GPU it would cost a host sync per batch in the training loop.
    # NaN moments are still caught before anything is written (libs/shards.ShardWriter.write).
    if (not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor
            or (x.device.type == "cpu" and not torch.isfinite(x).all())):
        raise InputError(f"images must be a (B, {channels}, H, W) tensor in [-1, 1] without NaN or inf values, "
                         f"height and width multiples of {factor} (crop or resize first); got {shape}.")


def autoencoder_of(config, path=None, image_shape=None):
    """The frozen autoencoder of config.autoencoder (weights from `path` when given, e.g. a sampling script's
    --autoencoder), checked against config.z_shape: the latent channels always, the latent size too when
    `image_shape` (3, H, W) of the data is known. A disagreement is one ConfigError naming both shapes."""
    a = config.autoencoder
    scaling = a.get("latent_scaling", "fixed")
    stats = None
    if scaling == "data":
        stats = LatentStats.load(a.get("latent_stats") or os.path.join(config.dataset.path, LATENT_STATS_FILE))
    name = path or a.pretrained_path
    ae = get_model(name, a.scale_factor, latent_scaling=scaling, stats=stats)
    if scaling == "fixed" and isinstance(ae, diffusers_autoencoder.DiffusersAutoencoder):
        own = ae.model.config.get("scaling_factor")
        if own is not None and abs(own - a.scale_factor) > 1e-6 * abs(own):
            logger.warning("autoencoder %s: config.autoencoder.scale_factor %g is not the model's scaling_factor %g; "
                           "set config.autoencoder.latent_scaling='model' to use the model's", name, a.scale_factor, own)
    z = tuple(config.z_shape)
    expected = ae.latent_shape(image_shape) if image_shape is not None else (ae.embed_dim, *z[1:])
    if z != tuple(expected):
        at = f" of {image_shape[-2]}x{image_shape[-1]} images" if image_shape is not None else ""
        raise ConfigError(f"config.z_shape = {z} but the autoencoder '{name}' gives {tuple(expected)} latents{at}: "
                          f"set config.z_shape = {tuple(expected)} (and config.nnet.in_chans, img_size to match)")
    return ae


def feature_settings(autoencoder, name, resolution):
    """What an extraction records of its autoencoder (the manifest's info; resumed shards must match): the name, and
    for models beyond the SD KL-f8 loader their kind and latent shape (the readers' data shape). SD extractions
    record what they always did, so theirs still resume."""
    out = {"autoencoder": os.path.abspath(name) if os.path.exists(name) else name}
    if isinstance(autoencoder, diffusers_autoencoder.DiffusersAutoencoder):
        out.update(autoencoder_kind=autoencoder.kind,
                   latent_shape=list(autoencoder.latent_shape((3, resolution, resolution))))
    return out


def get_model(pretrained_path=DEFAULT_PATH, scale_factor=SD_LATENT_SCALE, latent_scaling="fixed", stats=None):
    """Build the frozen autoencoder from a checkpoint.

    pretrained_path: the U-ViT release file (a plain SD KL-f8 state dict), a self-describing dict ``{'ddconfig',
        'embed_dim', 'state_dict'}`` (its architecture is used), a diffusers ``.safetensors`` file (SD KL-f8
        architecture, or the ``config.json`` next to it), a diffusers model directory, or a Hugging Face Hub id
        in the local cache ('org/repo[/subfolder]'). Diffusers models other than the SD KL-f8 family, or with
        latent_scaling other than 'fixed', load through diffusers (libs/diffusers_autoencoder.py).
    scale_factor: latent scale of 'fixed' scaling; 0.18215 for ImageNet, the MS-COCO config passes 0.23010.
    latent_scaling: 'fixed' | 'model' | 'data' (libs/diffusers_autoencoder.py); stats: the LatentStats of 'data'.
    """
    folder = diffusers_autoencoder.resolve(pretrained_path) if isinstance(pretrained_path, str) else None
    if folder is not None:
        c = diffusers_autoencoder.read_config(folder)
        if c is not None and (latent_scaling != "fixed" or not diffusers_autoencoder.is_sd_kl_f8(c)):
            return diffusers_autoencoder.load(folder, pretrained_path, latent_scaling, scale_factor, stats)
        pretrained_path = folder  # the SD KL-f8 family in diffusers layout (possibly in the Hub cache)
    path = require_path(pretrained_path, "autoencoder weights", _WHERE_TO_GET_IT)
    ddconfig, embed_dim = SD_KL_F8_DDCONFIG, SD_EMBED_DIM
    raw = _read_raw(path)
    if isinstance(raw, dict) and "ddconfig" in raw:
        ddconfig, embed_dim = raw["ddconfig"], raw.get("embed_dim")
        if not isinstance(ddconfig, dict) or not ddconfig.get("double_z", True) or not isinstance(embed_dim, int):
            raise CheckpointError(f"'{path}' has a 'ddconfig' entry but is not a KL autoencoder's self-describing file: "
                                  "it needs a dict 'ddconfig' with double_z = True (mean and logvar) and an integer "
                                  "'embed_dim'")
    else:
        config_json = _diffusers_config_path(path)
        if config_json is not None:
            ddconfig, embed_dim = ddconfig_from_diffusers_config(config_json)
    return FrozenAutoencoderKL(ddconfig, embed_dim, pretrained_path=_Preloaded(path, raw), scale_factor=scale_factor)


class _Preloaded(str):
    """A checkpoint path whose content was already read (so get_model reads the file once)."""

    def __new__(cls, path, content):
        obj = super().__new__(cls, path)
        obj.content = content
        return obj


def _safetensors_file(path):
    if os.path.isdir(path):
        return require_path(os.path.join(path, "diffusion_pytorch_model.safetensors"), "the directory's "
                            "diffusion_pytorch_model.safetensors", _WHERE_TO_GET_IT, kind='file')
    return path if path.endswith(".safetensors") else None


def _diffusers_config_path(path):
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if _safetensors_file(path) is None:
        return None
    c = os.path.join(folder, "config.json")
    return c if os.path.isfile(c) else None


def ddconfig_from_diffusers_config(config_json):
    """diffusers AutoencoderKL config.json -> (ddconfig, embed_dim) for our classes."""
    try:
        with open(config_json) as f:
            c = json.load(f)
        widths = list(c["block_out_channels"])
        ddconfig = dict(SD_KL_F8_DDCONFIG)
        ddconfig.update(ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
                        num_res_blocks=int(c.get("layers_per_block", 2)), in_channels=int(c.get("in_channels", 3)),
                        out_ch=int(c.get("out_channels", 3)), z_channels=int(c.get("latent_channels", 4)),
                        resolution=int(c.get("sample_size", 256)))
        if int(c.get("norm_num_groups", 32)) != 32:
            raise CheckpointError(f"{config_json}: norm_num_groups={c['norm_num_groups']} is not supported (KL-f8 uses 32).")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the diffusers autoencoder config {config_json}: {e}") from e
    return ddconfig, ddconfig["z_channels"]


def _read_raw(path):
    """The object stored at `path`: a torch-loaded object or a safetensors state dict."""
    st = _safetensors_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True) if st is None else load_file(st)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            SafetensorError) as e:
        raise CheckpointError(f"cannot read autoencoder checkpoint '{st or path}' (truncated or corrupt?): {e}. "
                              f"Download it again. {_WHERE_TO_GET_IT}") from e


def read_state_dict(path, num_resolutions=len(SD_KL_F8_DDCONFIG["ch_mult"])):
    """Any supported autoencoder checkpoint -> a state dict in our key layout: a plain state dict (U-ViT release),
    ``{'state_dict': ...}`` (self-describing files and ldm training checkpoints: ``first_stage_model.`` prefix
    stripped, the discriminator's ``loss.`` entries dropped), or diffusers safetensors (keys converted)."""
    sd = path.content if isinstance(path, _Preloaded) else _read_raw(require_path(path, "autoencoder weights", _WHERE_TO_GET_IT))
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"'{path}' does not hold an autoencoder state dict (a mapping of names to tensors).")
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    if is_diffusers_state_dict(sd):
        sd = diffusers_to_ours_state_dict(sd, num_resolutions)
    # Half-precision files (some diffusers uploads) load into the float32 model, as load_state_dict would.
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _all_finite(t):
    # min/max propagate NaN and expose inf; several times faster than isfinite().all() on a CPU.
    if t.numel() == 0:
        return True
    lo, hi = t.aminmax()
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def load_strict(model, state_dict, source="state dict", assign=False):
    """load_state_dict(strict=True) with a CheckpointError naming the first differing keys/shapes. assign: adopt
    the given tensors instead of copying (for models built on the meta device)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    nonfinite = [k for k, v in state_dict.items() if v.is_floating_point() and not _all_finite(v)]
    parts = [f"{len(keys)} {what} (e.g. {keys[:3]})" for keys, what in (
        (missing, "missing"), (unexpected, "unexpected"), (wrong, "with another shape"), (nonfinite, "holding NaN/inf"))
        if keys]
    if parts:
        fix = ("it is corrupt: download it again" if len(parts) == 1 and nonfinite else
               "is it a KL-f8 autoencoder with this configuration?")
        raise CheckpointError(f"autoencoder checkpoint {source} does not fit the model ({model.ddconfig}): "
                              + "; ".join(parts) + f"; {fix}")
    model.load_state_dict(state_dict, strict=True, assign=assign)


# diffusers <-> original key names. Rules apply to the key with its leading 'encoder.' / 'decoder.' kept. diffusers
# numbers the decoder's up blocks from low to high resolution, ldm from high to low: ours = num_resolutions - 1 -
# theirs. Attention projections are nn.Linear (C, C) there, 1x1 nn.Conv2d (C, C, 1, 1) here: reshaped. Each rule
# maps a disjoint set of keys onto a disjoint set, so the map is one to one (tests check it on random models).

_KEY_RULES = [  # (diffusers regex, ours template)
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", "encoder.down.{0}.block.{1}.{2}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", "encoder.down.{0}.downsample.conv.{1}"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", "decoder.up.{U0}.block.{1}.{2}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", "decoder.up.{U0}.upsample.conv.{1}"),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.+)", "{0}.mid.block_1.{1}"),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.+)", "{0}.mid.block_2.{1}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(.+)", "{0}.mid.attn_1.norm.{1}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.(.+)", "{0}.mid.attn_1.q.{1}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.(.+)", "{0}.mid.attn_1.k.{1}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.(.+)", "{0}.mid.attn_1.v.{1}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.(.+)", "{0}.mid.attn_1.proj_out.{1}"),
    (r"(encoder|decoder)\.conv_norm_out\.(.+)", "{0}.norm_out.{1}"),
    (r"(encoder|decoder|quant_conv|post_quant_conv)(\..+)?", None),  # identical names (conv_in, conv_out, quant convs)
]
# Inside resnets diffusers calls the 1x1 shortcut conv_shortcut, ldm nin_shortcut.
_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
# Checkpoints saved by diffusers < 0.14 (e.g. the sd-vae-ft-* .bin files) use older attention names.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_PROJ = re.compile(r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def is_diffusers_state_dict(sd):
    return any(".mid_block." in k or ".down_blocks." in k or ".up_blocks." in k for k in sd)


def _legacy_to_current(key):
    m = re.match(r"(.*\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
    return f"{m.group(1)}{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}" if m else key


def diffusers_to_ours_key(key, num_resolutions):
    """One diffusers AutoencoderKL key -> our key. CheckpointError for keys outside the KL-f8 layout."""
    key = _legacy_to_current(key)
    for pattern, template in _KEY_RULES:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        if template is None:
            if ".down_blocks." in key or ".up_blocks." in key or ".mid_block." in key:
                break
            return key.replace(".conv_shortcut.", ".nin_shortcut.")
        groups = list(m.groups())
        if "{U0}" in template:  # mirrored decoder level index
            groups[0] = str(num_resolutions - 1 - int(groups[0]))
            template = template.replace("{U0}", "{0}")
        out = template.format(*groups)
        for theirs, ours in _RESNET_PARTS.items():
            out = out.replace(f".{theirs}.", f".{ours}.")
        return out
    raise CheckpointError(f"diffusers autoencoder key '{key}' has no counterpart in the KL-f8 layout "
                          "(only DownEncoderBlock2D/UpDecoderBlock2D autoencoders without per-level attention are supported).")


def diffusers_to_ours_state_dict(sd, num_resolutions=len(SD_KL_F8_DDCONFIG["ch_mult"])):
    """Convert a diffusers AutoencoderKL state dict (current or legacy names) to our layout."""
    out = {}
    for key, value in sd.items():
        new = diffusers_to_ours_key(key, num_resolutions)
        if new in out:
            raise CheckpointError(f"diffusers checkpoint maps two keys onto '{new}' (both legacy and current attention names?).")
        if _ATTN_PROJ.match(new) and value.dim() == 2:
            value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[new] = value
    return out
