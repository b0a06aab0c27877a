"""Start a run from published or earlier weights: strict by default, or adapted to new classes / a new resolution.

    init_weights(nnet, 'assets/imagenet256_uvit_large.pth')                    # the same network: strict
    init_weights(nnet, 'exports/in256_l2', resize=True, null_last=True)        # new classes and/or grid

With `resize`, two tensors may differ from the network's and are adapted (one log line each):
- `label_emb.weight` (num_classes, D): the data classes the two share are copied row by row; the null
  class of classifier-free guidance stays the LAST row (num_classes - 1), so it moves when the class
  count changes; rows for new classes keep the network's own initialisation.
- `pos_embed` (1, extras + g * g, D): the extra tokens (time, label / text context) are kept as they
  are; the patch tokens, a g x g grid in row-major order (PatchEmbed), are resized bicubically to the
  network's grid (torch.nn.functional.interpolate, align_corners=False), as ViT fine-tuning at a
  new resolution does (Dosovitskiy et al., arXiv 2010.11929, sec. 3.2).
- An unconditional source into a class-conditional network: the label embedding and the label token's
  position (the first extra token) keep the network's initialisation, everything else is the source's;
  the reverse drops them.
Any other difference (width, depth, patch size, channels) stays the strict loader's error.
"""
import logging
import math
import os

import torch
import torch.nn.functional as F

from libs.errors import CheckpointError
from libs.export import load_weights
from libs.nnet import load_nnet_state_dict, unwrap_model, unwrap_state_dict

logger = logging.getLogger(__name__)

LABEL_KEY = "label_emb.weight"
POS_KEY = "pos_embed"


def resize_label_embedding(source, target, source_null, target_null):
    """Rows of `source` (N_s, D) placed in a copy of `target` (N_t, D); returns (tensor, description).

    The first min(data classes) rows are copied; when both have a null class (their last row) it is
    copied to the target's last row; every other target row is left as it is.
    """
    out = target.detach().clone()
    n_source, n_target = source.shape[0] - int(source_null), target.shape[0] - int(target_null)
    shared = min(n_source, n_target)
    out[:shared] = source[:shared].to(out.dtype)
    parts = [f"classes 0..{shared - 1} copied" if shared else "no class copied"]
    if source_null and target_null:
        out[-1] = source[-1].to(out.dtype)
        parts.append(f"null class {source.shape[0] - 1} -> {target.shape[0] - 1}")
    elif target_null:
        parts.append(f"null class {target.shape[0] - 1} new (the source has none)")
    elif source_null:
        parts.append(f"the source's null class {source.shape[0] - 1} dropped")
    if n_target > shared:
        parts.append(f"classes {shared}..{n_target - 1} new (the network's initialisation)")
    if n_source > shared:
        parts.append(f"source classes {shared}..{n_source - 1} dropped")
    return out, ", ".join(parts)


def resize_pos_embed(source, extras, grid):
    """(1, extras + g_s * g_s, D) -> (1, extras + grid * grid, D): extra tokens kept, the patch grid bicubic.

    Computed in float32 and returned in the source's dtype.
    """
    n_patches = source.shape[1] - extras
    g = math.isqrt(max(n_patches, 0))
    if n_patches <= 0 or g * g != n_patches:
        raise CheckpointError(f"the checkpoint's pos_embed has {source.shape[1]} tokens, which is not {extras} extra "
                              f"tokens plus a square grid of patches: it comes from a network with another condition "
                              f"(class / text / none); fine-tune from a checkpoint of the same kind")
    if g == grid:
        return source.clone()
    D = source.shape[2]
    patches = source[:, extras:].float().reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)  # (1, D, grid, grid)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(source.dtype)  # (1, grid^2, D)
    return torch.cat([source[:, :extras], patches], dim=1)


def adapt_state_dict(nnet, state_dict, source_null, target_null):
    """`state_dict` with label_emb / pos_embed adapted to `nnet`'s shapes where they differ; (dict, adapted names).

    A class-conditional U-ViT has one extra token more than an unconditional one (the label token,
    first), so a label embedding may also be added (unconditional -> class model: every row and the
    label token's position keep the network's initialisation) or dropped (class -> unconditional).
    """
    model = unwrap_model(nnet)
    own = model.state_dict()
    out, adapted = dict(state_dict), []
    label_added = LABEL_KEY in own and LABEL_KEY not in out
    label_dropped = LABEL_KEY in out and LABEL_KEY not in own
    if (set(out) ^ set(own)) - {LABEL_KEY}:
        return out, adapted  # another kind of network (depth, text vs class): the strict loader says what differs
    if label_added:
        out[LABEL_KEY] = own[LABEL_KEY].detach().clone()
        logger.info("init: %s new %s: the source is unconditional; every row keeps the network's initialisation",
                    LABEL_KEY, tuple(own[LABEL_KEY].shape))
        adapted.append(LABEL_KEY)
    elif label_dropped:
        logger.info("init: %s %s dropped: the network is unconditional", LABEL_KEY, tuple(out.pop(LABEL_KEY).shape))
        adapted.append(LABEL_KEY)
    else:
        src, dst = out.get(LABEL_KEY), own.get(LABEL_KEY)
        if src is not None and src.shape != dst.shape and src.shape[1:] == dst.shape[1:]:
            out[LABEL_KEY], how = resize_label_embedding(src, dst, source_null, target_null)
            logger.info("init: %s %s -> %s: %s", LABEL_KEY, tuple(src.shape), tuple(dst.shape), how)
            adapted.append(LABEL_KEY)
    src, dst = out.get(POS_KEY), own.get(POS_KEY)
    if src is not None and dst is not None and src.shape != dst.shape and src.shape[2] == dst.shape[2]:
        extras = model.extras
        source_extras = extras - int(label_added) + int(label_dropped)
        grid = math.isqrt(dst.shape[1] - extras)
        new = resize_pos_embed(src, source_extras, grid).to(dst.dtype)  # (1, source_extras + grid^2, D)
        if label_added:
            new = torch.cat([dst[:, :1], new], dim=1)  # the label token comes first
            kept = f"{source_extras} extra token(s) kept, the label token's new"
        elif label_dropped:
            new = new[:, 1:]
            kept = f"the label token dropped, {extras} extra token(s) kept"
        else:
            kept = f"{extras} extra token(s) kept"
        out[POS_KEY] = new
        g = math.isqrt(src.shape[1] - source_extras)
        logger.info("init: %s %s -> %s: %s, patch grid %dx%d -> %dx%d%s", POS_KEY, tuple(src.shape),
                    tuple(dst.shape), kept, g, g, grid, grid, " (bicubic)" if g != grid else "")
        adapted.append(POS_KEY)
    return out, adapted


def init_weights(nnet, path, resize=False, null_last=True, source_null=None):
    """Load the weights at `path` into `nnet` (a fresh run's network); returns the adapted tensor names.

    path: a `ckpts/<step>.ckpt` directory (its EMA weights), a `.pth` state dict or an exported folder.
    resize: adapt label_emb / pos_embed to `nnet` (module docstring); False = strict, any difference
    is a CheckpointError listing it.
    null_last: the network's last label is the null class (config.dataset.cfg).
    source_null: whether the source's last label is a null class; None = from an exported folder's
    config.json, else assumed equal to `null_last`.
    """
    state_dict, meta = load_weights(path)
    state_dict = unwrap_state_dict(state_dict)
    adapted = []
    if resize:
        if source_null is None:
            source_null = (meta.get("null_class") is not None) if meta is not None else null_last
        state_dict, adapted = adapt_state_dict(nnet, state_dict, bool(source_null), bool(null_last))
    try:
        load_nnet_state_dict(nnet, state_dict)
    except CheckpointError as e:
        hint = "" if resize else (" (to fine-tune on other classes or another resolution, resize the label and "
                                  "position embeddings: --config.init.resize=True)")
        raise CheckpointError(f"--init_from '{os.fspath(path)}': {e}{hint}") from e
    logger.info("initialised the network from '%s'%s", os.fspath(path),
                f" ({', '.join(adapted)} adapted)" if adapted else "")
    return adapted
