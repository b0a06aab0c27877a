"""Network registry and a strict state-dict loader with a readable mismatch report.

`build_nnet(config.nnet)` maps `name` to a class and passes every other entry as a keyword.
`load_nnet_state_dict(model, sd)` loads strictly, or raises CheckpointError naming the missing / unexpected keys
and differing shapes; it accepts DDP ('module.') and torch.compile ('_orig_mod.') prefixes and {'state_dict': ...}.
"""
import inspect
import logging
import math
import numbers

import torch

from libs import uvit, uvit_t2i
from libs.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

NNETS = {'uvit': uvit.UViT, 'uvit_t2i': uvit_t2i.UViT}

_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
_SHOW = 5  # how many keys of each kind an error message lists


def build_nnet(nnet_config):
    """Build the network described by `nnet_config` (a dict or ConfigDict with 'name')."""
    kwargs = nnet_config.to_dict() if hasattr(nnet_config, 'to_dict') else dict(nnet_config)
    name = kwargs.pop('name', None)
    if name not in NNETS:
        raise ConfigError(f"config.nnet.name is {name!r}; known networks: {', '.join(sorted(NNETS))}")
    cls = NNETS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {'self'}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"config.nnet has entries {unknown} that network '{name}' does not take; "
                          f"it takes: {', '.join(sorted(accepted))}")
    return cls(**kwargs)


def problems(section):
    """(key in config.nnet, message) of each value a U-ViT cannot be built with: the patch size must divide the
    image size, the heads the width, qk_scale be None or > 0 (types are checked by libs.config_utils)."""
    def integer(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
    out, qk_scale = [], section.get('qk_scale')
    if qk_scale is not None and not (isinstance(qk_scale, numbers.Real) and not isinstance(qk_scale, bool)
                                     and math.isfinite(qk_scale) and qk_scale > 0):
        out.append(('qk_scale', "must be None (head_dim ** -0.5) or a number > 0"))
    img, patch, embed, heads = (section.get(k) for k in ('img_size', 'patch_size', 'embed_dim', 'num_heads'))
    if integer(img) and integer(patch) and img % patch:
        divisors = [d for d in range(1, img + 1) if img % d == 0]
        near = [d for d in divisors if d < patch][-1:] + [d for d in divisors if d > patch][:1]
        out.append(('patch_size', f"does not divide nnet.img_size = {img}: the image must split into whole patches "
                                  f"(use a divisor of {img}: {' or '.join(map(str, near))})"))
    if integer(embed) and integer(heads) and embed % heads:
        out.append(('num_heads', f"does not divide nnet.embed_dim = {embed} (each head gets embed_dim / num_heads "
                                 f"channels)"))
    return out


def unwrap_state_dict(state_dict):
    """Strip {'state_dict': ...} nesting and DDP / torch.compile key prefixes."""
    if isinstance(state_dict, dict) and 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"expected a state dict (a mapping of parameter names to tensors), got {type(state_dict).__name__}; "
                              "save networks with torch.save(model.state_dict(), path)")
    def strip(key):
        while key.startswith(_WRAPPER_PREFIXES):  # every prefix ends at its first '.'
            key = key.split('.', 1)[1]
        return key
    return {strip(key): value for key, value in state_dict.items()}


def unwrap_model(model):
    """The bare network inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, '_orig_mod', None) or getattr(model, 'module', None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _listing(title, items):
    shown = ', '.join(items[:_SHOW]) + (f', ... ({len(items)} in all)' if len(items) > _SHOW else '')
    return f"{title}: {shown}"


def load_nnet_state_dict(model, state_dict):
    """Load `state_dict` into `model` strictly, or raise CheckpointError saying what differs."""
    model = unwrap_model(model)
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    not_tensors = [k for k, v in state_dict.items() if k in own and not isinstance(v, torch.Tensor)]
    if missing or unexpected or shapes or not_tensors:
        parts = [_listing(t, items) for t, items in (('missing keys', missing), ('unexpected keys', unexpected),
                                                      ('different shapes', shapes), ('not tensors', not_tensors)) if items]
        raise CheckpointError(f"checkpoint does not match the {type(model).__name__} built from config.nnet: "
                              + '; '.join(parts)
                              + ". Check that config.nnet (size, patch_size, num_classes, conv, ...) is the one the checkpoint was trained with.")
    not_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        raise CheckpointError(_listing("checkpoint has NaN or infinite values in", not_finite)
                              + "; the file is corrupt or the run diverged: use an earlier checkpoint")
    model.load_state_dict(state_dict, strict=True)
    return model
