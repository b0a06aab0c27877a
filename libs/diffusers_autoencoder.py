"""Any diffusers autoencoder as U-ViT's frozen latent model: `AutoencoderKL` of any channel count (the 16-channel
FLUX and SD3 VAEs, VA-VAE's f16d32) and `AutoencoderDC` (DC-AE f32c32, f64c128; Chen et al. 2024, "Deep Compression
Autoencoder for Efficient High-Resolution Diffusion Models", arXiv 2410.10733).

Named in the config (config.autoencoder.pretrained_path) by a local diffusers folder (config.json +
diffusion_pytorch_model.safetensors) or a Hugging Face Hub id read from the local cache only, with a subfolder after
the id: 'mit-han-lab/dc-ae-f32c32-in-1.0-diffusers', 'black-forest-labs/FLUX.1-dev/vae'. The SD KL-f8 family
(4-channel AutoencoderKL with quant convs) keeps its own loader (libs/autoencoder.py), bit for bit.

Latent normalisation, z = (latent - shift) * scale per channel, decode(z) = model.decode(z / scale + shift):
- 'model': the model's config.json: latents_mean / latents_std when it ships them (shift = mean, scale =
  scaling_factor / std), else scaling_factor and shift_factor (0 when absent), diffusers' pipelines' convention;
- 'data': per-channel mean / std of the data's latents (libs/latent_stats.py, written by the extraction): shift =
  mean, scale = 1 / std, i.e. unit-variance latents per channel (LightningDiT's VA-VAE recipe);
- 'fixed': config.autoencoder.scale_factor, shift 0 (what the SD path does).

Moments: a KL model's encoder gives (B, 2C, h, w) (mean, logvar) and `sample` draws mean + exp(logvar / 2) noise with
ldm's logvar clamp (as diffusers' DiagonalGaussianDistribution); a DC-AE is deterministic and its "moments" are the
(B, C, h, w) latents themselves (`stochastic` False), so stored features hold exactly what training reads.
"""
import json
import logging
import os

import torch
import torch.nn as nn

from libs.errors import CheckpointError, ConfigError, InputError, MissingFileError

logger = logging.getLogger(__name__)

SUPPORTED = ("AutoencoderKL", "AutoencoderDC")
SCALINGS = ("fixed", "model", "data")
# ldm's / diffusers' DiagonalGaussianDistribution logvar clamp.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def read_config(folder):
    """The diffusers config.json of `folder` as a dict, or None when there is none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the diffusers config '{path}': {e}; download the model again") from e


def is_sd_kl_f8(c):
    """True for a diffusers config of the Stable Diffusion KL-f8 family (4 latent channels, quant convs, plain
    down/up blocks, mid-block attention, GroupNorm(32)): the architecture libs/autoencoder.py loads itself."""
    return (c.get("_class_name", "AutoencoderKL") == "AutoencoderKL" and int(c.get("latent_channels", 4)) == 4
            and c.get("use_quant_conv", True) and c.get("use_post_quant_conv", True)
            and c.get("mid_block_add_attention", True) and int(c.get("norm_num_groups", 32)) == 32
            and all(t == "DownEncoderBlock2D" for t in c.get("down_block_types", ["DownEncoderBlock2D"]))
            and all(t == "UpDecoderBlock2D" for t in c.get("up_block_types", ["UpDecoderBlock2D"]))
            and c.get("latents_mean") is None and c.get("shift_factor") is None)


def _looks_like_hub_id(name):
    parts = name.split("/")
    return (len(parts) >= 2 and not os.path.isabs(name) and not name.startswith(".") and all(parts)
            and os.path.splitext(name)[1] not in (".pth", ".ckpt", ".safetensors", ".bin", ".pt"))


def resolve(name):
    """A local folder for `name`: itself when it exists, else a Hub id ('org/repo[/subfolder]') looked up in the
    Hugging Face cache without any download; None when `name` is neither (the caller's loader says what is
    missing). MissingFileError when a Hub id is not in the cache."""
    if os.path.exists(name) or not _looks_like_hub_id(name):
        return name if os.path.isdir(name) else None
    parts = name.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import constants, snapshot_download  # optional: only Hub ids need it
    from huggingface_hub.errors import LocalEntryNotFoundError  # optional

    try:
        folder = snapshot_download(repo, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise MissingFileError(
            f"autoencoder '{name}' is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
            f"on a machine with internet run `huggingface-cli download {repo}"
            + (f" --include '{sub}/*'" if sub else "") + "` and copy the cache here (or set HF_HOME), or download the "
            "folder and set config.autoencoder.pretrained_path to it") from e
    folder = os.path.join(folder, sub) if sub else folder
    if read_config(folder) is None:
        raise MissingFileError(f"'{folder}' (Hub id '{name}' in the cache) has no config.json: name the subfolder "
                               "that holds the autoencoder, e.g. 'org/repo/vae'")
    return folder


class DiffusersAutoencoder(nn.Module):
    """A frozen diffusers autoencoder with the latent interface of libs/autoencoder.FrozenAutoencoderKL.

    model: a diffusers AutoencoderKL / AutoencoderDC. shift, scale: (C,) float tensors, z = (latent - shift) * scale.
    Attributes: embed_dim (C), downsample_factor (f: (B, 3, H, W) -> (B, C, H/f, W/f)), stochastic, moment_channels
    (2C or C), scale_factor (a float for messages: the mean of `scale`), source (where it was loaded from).
    """

    def __init__(self, model, shift, scale, source=""):
        super().__init__()
        self.model = model
        self.kind = type(model).__name__
        self.embed_dim = int(model.config.latent_channels)
        self.stochastic = self.kind != "AutoencoderDC"
        self.moment_channels = 2 * self.embed_dim if self.stochastic else self.embed_dim
        self.downsample_factor = int(getattr(model, "spatial_compression_ratio", 0)
                                     or 2 ** (len(model.config.block_out_channels) - 1))
        self.in_channels = int(model.config.in_channels)
        shift, scale = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (shift, scale))
        if shift.numel() == 1:
            shift = shift.expand(self.embed_dim)
        if scale.numel() == 1:
            scale = scale.expand(self.embed_dim)
        if shift.numel() != self.embed_dim or scale.numel() != self.embed_dim:
            raise ConfigError(f"latent statistics of {shift.numel()} / {scale.numel()} channels do not fit the "
                              f"{self.embed_dim}-channel autoencoder {source}; extract the statistics with this model")
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone(), persistent=False)
        self.scale_factor = float(scale.mean())
        self.source = source
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode=True):
        """Frozen: stays in eval mode whatever is asked."""
        return super().train(False)

    def latent_shape(self, image_shape):
        """(C, H/f, W/f) of the latents of (3, H, W) images."""
        return (self.embed_dim, image_shape[-2] // self.downsample_factor, image_shape[-1] // self.downsample_factor)

    def encode_moments(self, x):
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of f -> (B, 2C, H/f, W/f) (mean, logvar) of a KL model, or
        the (B, C, H/f, W/f) latents of a deterministic one (unnormalised)."""
        f = self.downsample_factor
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise InputError(f"images must be (B, {self.in_channels}, H, W) in [-1, 1] with H, W multiples of {f}; "
                             f"got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        out = self.model.encode(x)
        return out.latent_dist.parameters if self.stochastic else out.latent

    def sample(self, moments, generator=None):
        """moments (`encode_moments`) -> normalised latents z (B, C, h, w). KL: the posterior sample mean + std *
        noise (noise drawn as diffusers' DiagonalGaussianDistribution.sample draws it, from `generator`)."""
        if moments.dim() != 4 or moments.shape[1] != self.moment_channels:
            raise InputError(f"moments must be (B, {self.moment_channels}, h, w); got {tuple(moments.shape)}")
        latent = moments
        if self.stochastic:
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
            latent = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalize(latent)

    def mean_latent(self, moments):
        """The unnormalised posterior mean (B, C, h, w) of `moments` (the latents themselves for a DC-AE)."""
        return moments[:, :self.embed_dim]

    def normalize(self, latent):
        return (latent - self.shift.to(latent.dtype)) * self.scale.to(latent.dtype)

    def encode(self, x, generator=None):
        """x: (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f)."""
        return self.sample(self.encode_moments(x), generator)

    def decode(self, z):
        """z: normalised latents (B, C, h, w) -> images (B, 3, f h, f w), roughly in [-1, 1] (not clamped)."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise InputError(f"latents must be (B, {self.embed_dim}, h, w); got {tuple(z.shape)}")
        return self.model.decode(z / self.scale.to(z.dtype) + self.shift.to(z.dtype)).sample

    def decode_in_chunks(self, z, chunk=50):
        """decode() `chunk` latents at a time."""
        assert chunk >= 1, chunk
        return torch.cat([self.decode(part) for part in z.split(chunk)], dim=0)


def model_normalisation(c, name):
    """(shift, scale) of 'model' scaling from a diffusers config dict (the module docstring)."""
    if c.get("latents_mean") is not None and c.get("latents_std") is not None:
        std = torch.as_tensor(c["latents_std"], dtype=torch.float32)
        return torch.as_tensor(c["latents_mean"], dtype=torch.float32), float(c.get("scaling_factor", 1.0)) / std
    if "scaling_factor" not in c:
        raise ConfigError(f"autoencoder '{name}' ships no scaling_factor in its config.json: set "
                          "config.autoencoder.latent_scaling='data' (per-channel statistics of the extracted latents)")
    return float(c.get("shift_factor") or 0.0), float(c["scaling_factor"])


def load(folder, name, latent_scaling="model", scale_factor=None, stats=None):
    """The DiffusersAutoencoder of a diffusers folder. latent_scaling: 'model' | 'data' | 'fixed' (module docstring);
    stats: the LatentStats of 'data'; scale_factor: the number of 'fixed'. `name`: the config's name, for messages."""
    c = read_config(folder)
    assert c is not None, f"'{folder}' has no config.json (libs.autoencoder.get_model reads it first)"
    kind = c.get("_class_name")
    if kind not in SUPPORTED:
        raise ConfigError(f"'{name}' is a diffusers {kind!r}; supported autoencoders: {', '.join(SUPPORTED)}")
    try:
        import diffusers  # optional: only non-SD autoencoders need it
    except ImportError as e:
        raise ConfigError(f"the autoencoder '{name}' ({kind}) is loaded through diffusers: pip install diffusers") from e
    model = getattr(diffusers, kind).from_pretrained(folder, local_files_only=True).float()
    if latent_scaling == "data":
        assert stats is not None, "latent_scaling='data' needs the statistics (loaded where the config enters)"
        shift, scale = stats.mean, 1.0 / stats.std
    elif latent_scaling == "model":
        shift, scale = model_normalisation(c, name)
    else:
        shift, scale = 0.0, float(scale_factor)
    ae = DiffusersAutoencoder(model, shift, scale, source=name)
    logger.info("loaded diffusers %s from %s: %d latent channels, /%d, latent scaling %s", kind, folder,
                ae.embed_dim, ae.downsample_factor, latent_scaling)
    return ae
