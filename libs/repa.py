"""Representation alignment (REPA; Yu et al. 2025, "Representation Alignment for Generation", arXiv 2410.06940).

A training aid, not a network change: the patch tokens h (B, L, D) that one U-ViT block outputs are mapped by
a small MLP projector to the width E of a frozen self-supervised image encoder (DINOv2), and pulled towards
that encoder's patch features y (B, N, E) of the clean image with

    L_align = - mean over images b and encoder patches n of cos(proj(h)_bn, y_bn)          (REPA eq. 8)

added to the diffusion loss with weight config.repa.weight. When the block's token grid (sqrt L) differs from
the encoder's patch grid (sqrt N), the projected tokens, seen as a (B, E, sqrt L, sqrt L) map, are resized
bilinearly to the encoder's grid before the cosine (REPA aligns equal grids: 256 latents / patch 2 = 16 x 16 =
DINOv2 ViT-B/14 at 224).

The block's output is read by a forward hook, so the U-ViT gains no parameter and its state dict, checkpoints
and exports are those of the plain network; the projector lives in `AlignedNetwork` beside it and is saved in
the training checkpoint's train_state only.

Encoders (config.repa.encoder), all frozen, in eval mode:
- 'dinov2_vits14' | 'dinov2_vitb14' | 'dinov2_vitl14' | 'dinov2_vitg14': the DINOv2 code from the torch hub
  cache (<hub dir>/facebookresearch_dinov2_main) and its weights from config.repa.weights or the hub cache's
  checkpoints/<name>_pretrain.pth; features: the normalised patch tokens.
- 'timm:<model name>': a timm model built without download, weights from config.repa.weights; features: the
  forward_features tokens without the class/register tokens.
- 'torchvision:<vit_b_16 | vit_l_16 | ...>': a torchvision ViT, weights from config.repa.weights; features: the
  encoder's output tokens without the class token.
- 'torchscript': a TorchScript module from config.repa.weights taking the image batch and returning (B, N, E)
  tokens or a (B, E, h, w) map (any encoder you trace yourself).
Images go in as the network's data, (B, C, H, W) in [-1, 1], resized (bicubic) to config.repa.resolution;
the ImageNet-trained encoders get grey images as RGB and ImageNet's mean/std normalisation, a TorchScript
encoder gets the resized image in [-1, 1] unchanged.
"""
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from libs.errors import ConfigError, require_path

logger = logging.getLogger(__name__)

DINOV2 = ('dinov2_vits14', 'dinov2_vitb14', 'dinov2_vitl14', 'dinov2_vitg14')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Projector(nn.Module):
    """REPA's projector: Linear(D, hidden) -> SiLU -> Linear(hidden, hidden) -> SiLU -> Linear(hidden, E).
    (B, L, D) -> (B, L, E)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, h):
        return self.net(h)


def match_grid(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, L, E) tokens of a square grid -> (B, n, E) on the square grid of n tokens (bilinear; identity when
    L == n)."""
    B, L, E = tokens.shape
    if L == n:
        return tokens
    g, h = math.isqrt(L), math.isqrt(n)
    assert g * g == L and h * h == n, "token grids must be square"
    grid = tokens.transpose(1, 2).reshape(B, E, g, g)
    grid = F.interpolate(grid, size=(h, h), mode='bilinear', align_corners=False, antialias=h < g)
    return grid.reshape(B, E, n).transpose(1, 2)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """- mean cosine similarity per patch (REPA eq. 8): projected (B, L, E) tokens of the network (after the
    projector), target (B, N, E) encoder patch features -> 0-dim float32. L != N: `match_grid` first."""
    projected = match_grid(projected.float(), target.shape[1])
    return -F.cosine_similarity(projected, target.float(), dim=-1).mean()


class AlignedNetwork(nn.Module):
    """The U-ViT and the projector, trained together: forward is the network's; the projected patch tokens of
    block `block` (a module name such as 'mid_block' or 'in_blocks.2') of that call are left in
    `self.projected` (B, L, E). The hook adds nothing to the network's parameters or state dict."""

    def __init__(self, nnet: nn.Module, projector: nn.Module, block: str):
        super().__init__()
        self.nnet, self.projector = nnet, projector
        self._hidden, self.projected = None, None
        nnet.get_submodule(block).register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self._hidden = output

    def no_weight_decay(self):
        return {f'nnet.{n}' for n in self.nnet.no_weight_decay()}

    def forward(self, x, timesteps, **cond):
        out = self.nnet(x, timesteps, **cond)
        hidden, self._hidden = self._hidden, None
        self.projected = self.projector(hidden[:, self.nnet.extras:])  # patch tokens only
        return out


def check_block(nnet: nn.Module, block: str):
    """ConfigError unless `block` names a transformer block of nnet."""
    names = [n for n, m in nnet.named_modules() if type(m).__name__ == 'Block']
    if block not in names:
        raise ConfigError(f"config.repa.block={block!r} is not a block of this U-ViT; choose one of "
                          f"{', '.join(names)}")


# -- encoders -----------------------------------------------------------------------------------------

def _read_weights(path: str, what: str):
    require_path(path or None, f"{what} weights", "Put the encoder's weights file there and set config.repa.weights "
                 "to its path", kind='file')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file  # optional
        return load_file(path)
    state = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('model', 'state_dict', 'teacher'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _dinov2(name: str, weights: str):
    hub = torch.hub.get_dir()
    code = require_path(os.path.join(hub, 'facebookresearch_dinov2_main'), "the DINOv2 code (in the torch hub cache)",
                        f"Run torch.hub.load('facebookresearch/dinov2', '{name}') once where there is internet and "
                        f"copy {hub} here (or set TORCH_HOME)", kind='folder')
    weights = weights or os.path.join(hub, 'checkpoints', f'{name}_pretrain.pth')
    state = _read_weights(weights, f"DINOv2 {name}")
    model = torch.hub.load(code, name, source='local', pretrained=False)
    model.load_state_dict(state)
    return model, lambda m, x: m.forward_features(x)['x_norm_patchtokens']


def _timm(name: str, weights: str):
    state = _read_weights(weights, f"timm {name}")  # before the import: a missing file costs nothing
    import timm  # optional
    model = timm.create_model(name, pretrained=False, num_classes=0)
    model.load_state_dict(state, strict=False)  # without the classifier head (num_classes=0)

    def features(m, x):
        f = m.forward_features(x)
        return f[:, getattr(m, 'num_prefix_tokens', 0):] if f.ndim == 3 else f
    return model, features


def _torchvision(name: str, weights: str):
    state = _read_weights(weights, f"torchvision {name}")
    import torchvision  # heavy
    model = torchvision.models.get_model(name, weights=None)
    if not hasattr(model, 'class_token'):
        raise ConfigError(f"config.repa.encoder='torchvision:{name}': only torchvision ViTs (vit_b_16, vit_l_16, "
                          f"...) give patch tokens; trace another model to TorchScript and use 'torchscript'")
    model.load_state_dict(state)

    def features(m, x):
        x = m._process_input(x)
        x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return m.encoder(x)[:, 1:]
    return model, features


class Encoder(nn.Module):
    """A frozen image encoder: (B, C, H, W) images in [-1, 1] -> (B, N, E) float32 patch features."""

    def __init__(self, spec: str, weights: str = '', resolution: int = 224):
        super().__init__()
        kind, _, name = spec.partition(':')
        if spec in DINOV2:
            model, self._features = _dinov2(spec, weights)
        elif kind == 'timm' and name:
            model, self._features = _timm(name, weights)
        elif kind == 'torchvision' and name:
            model, self._features = _torchvision(name, weights)
        elif spec == 'torchscript':
            require_path(weights or None, "TorchScript encoder", "Save one with torch.jit.save and set "
                         "config.repa.weights to its path", kind='file')
            model, self._features = torch.jit.load(weights, map_location='cpu'), lambda m, x: m(x)
        else:
            raise ConfigError(f"config.repa.encoder={spec!r}: use one of {', '.join(DINOV2)}, 'timm:<name>', "
                              f"'torchvision:<vit name>' or 'torchscript'")
        self.spec, self.resolution, self.imagenet = spec, int(resolution), spec != 'torchscript'
        self.model = model.eval()
        for p in self.model.parameters():  # (ScriptModules have no requires_grad_)
            p.requires_grad_(False)

    def train(self, mode=True):  # always in eval mode: frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        x = x.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode='bicubic', align_corners=False,
                              antialias=True)
        if self.imagenet:
            x = (x.clamp(-1, 1) + 1) / 2
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
            x = (x - mean) / std
        f = self._features(self.model, x)
        if f.ndim == 4:  # a (B, E, h, w) map
            f = f.flatten(2).transpose(1, 2)
        return f.float()


def build_encoder(repa_config, device):
    """The Encoder of config.repa, on `device`."""
    return Encoder(repa_config.encoder, repa_config.weights, repa_config.resolution).to(device)


def extraction_encoder(args, image_resolution, device):
    """(Encoder or None, (N, E) or None, settings dict) of the extraction flags --repa_encoder / _weights /
    _resolution / _dtype (tools.cli.define_repa_encoder); the settings go into the shard records and manifest."""
    if not args.repa_encoder:
        return None, None, {}
    encoder = Encoder(args.repa_encoder, args.repa_weights, args.repa_resolution).to(device)
    shape = tuple(encoder(torch.zeros(1, 3, image_resolution, image_resolution, device=device)).shape[1:])
    return encoder, shape, {'repa_encoder': args.repa_encoder, 'repa_resolution': args.repa_resolution,
                            'repa_weights': os.path.abspath(args.repa_weights) if args.repa_weights else '',
                            'repa_dtype': args.repa_dtype}


def stored_features(data, repa_config):
    """(N, E) of the encoder features stored with a latent dataset's moments (switching them on in its items),
    or None when it stores none. ConfigError when they come from another encoder or resolution."""
    reader = getattr(data.train, 'reader', None)
    shape = getattr(reader, 'repa_shape', None)
    if shape is None:
        return None
    info = reader.manifest.get('info', {})
    made = (info.get('repa_encoder'), info.get('repa_resolution'))
    if made != (repa_config.encoder, repa_config.resolution):
        raise ConfigError(f"the encoder features stored in '{reader.folder}' come from {made[0]!r} at "
                          f"{made[1]} pixels, but config.repa asks for {repa_config.encoder!r} at "
                          f"{repa_config.resolution}; set config.repa.encoder / resolution to match, or extract again")
    data.train.with_repa = True
    return tuple(shape)


def build_alignment(repa_config, nnet, data, device):
    """(AlignedNetwork of nnet with a new projector, the Encoder or None when `data` stores its features)."""
    check_block(nnet, repa_config.block)
    shape = stored_features(data, repa_config)
    encoder = None
    if shape is None:
        if data.kind == 'latent_moments':
            raise ConfigError("config.repa with a latent feature dataset needs the encoder features stored with "
                              "the latents: extract them with scripts/extract_imagenet_feature.py --repa_encoder="
                              f"{repa_config.encoder} (docs/training.md)")
        encoder = build_encoder(repa_config, device)
        probe = data.data_shape if data.kind == 'pixels' else (3, repa_config.resolution, repa_config.resolution)
        with torch.no_grad():
            shape = tuple(encoder(torch.zeros(1, *probe, device=device)).shape[1:])
    logger.info("REPA: block %s -> projector (%d -> %d -> %d) -> %d encoder patches of %s (%s), weight %g",
                repa_config.block, nnet.embed_dim, repa_config.projector_dim, shape[1], shape[0],
                repa_config.encoder, 'stored with the latents' if encoder is None else 'computed each step',
                repa_config.weight)
    projector = Projector(nnet.embed_dim, repa_config.projector_dim, shape[1]).to(device)
    return AlignedNetwork(nnet, projector, repa_config.block), encoder


class Alignment:
    """REPA as a training aid (libs/training_aids.py): config.repa, the projector in train_state.pth."""
    section, state_key, fresh = 'repa', 'repa_projector', 'the REPA projector starts afresh'

    def __init__(self, section, nnet, data, device):
        self.weight = section.weight
        self.aligner, self.encoder = build_alignment(section, nnet, data, device)

    @staticmethod
    def problems(section):
        """config.repa's encoder name and weights file (when enabled)."""
        out, spec, weights = [], section.get('encoder'), section.get('weights')
        if section.get('enabled') is not True:
            return out
        if isinstance(spec, str) and not (spec in DINOV2 or spec == 'torchscript' or (
                spec.partition(':')[0] in ('timm', 'torchvision') and spec.partition(':')[2])):
            out.append(('encoder', f"not one of {', '.join(DINOV2)}, 'timm:<name>', 'torchvision:<vit name>', "
                                   f"'torchscript'"))
        if isinstance(weights, str) and weights and not os.path.isfile(weights):
            out.append(('weights', "does not exist: give the encoder's weights file ('' = the torch hub cache, "
                                   "DINOv2)"))
        return out

    @staticmethod
    def enabled(section):
        return bool(section.enabled)

    def wrap(self, module):
        assert module is self.aligner.nnet, "REPA wraps the network itself"
        return self.aligner  # the projector is clipped and stepped with the network

    def losses(self, batch):
        """The alignment loss on the block tokens of the same forward; its target (B, N, E) is the encoder
        features stored with the latents, or the encoder's of the images."""
        target = batch['repa'] if 'repa' in batch else self.encoder(batch['x'])
        return {'align_loss': (self.weight, alignment_loss(self.aligner.projected, target))}

    def after_step(self, run, step, applied):
        pass

    def state_dict(self):
        return self.aligner.projector.state_dict()

    def load_state_dict(self, state):
        self.aligner.projector.load_state_dict(state)
