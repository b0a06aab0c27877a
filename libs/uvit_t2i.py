"""U-ViT for text-to-image diffusion (Bao et al., arXiv 2209.12152, MS-COCO models): the trunk of
libs/uvit_layers.py with one token per CLIP text-encoder state (`context_embed`). Tokens: [time, context, patches].
"""
import torch
import torch.nn as nn

from libs.errors import InputError
from libs.uvit_layers import UViTBase


class UViT(UViTBase):
    """Text-conditional U-ViT; keywords are the `config.nnet` entries of the MS-COCO configs.

    clip_dim: width of the text-encoder states (768 for CLIP ViT-L/14);
    num_clip_token: their number (77, CLIP's context length).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm, mlp_time_embed=False,
                 use_checkpoint=False, clip_dim=768, num_clip_token=77, conv=True, skip=True, second_time=False):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         mlp_time_embed=mlp_time_embed, second_time=second_time)
        self.clip_dim = clip_dim
        self.num_clip_token = num_clip_token
        self.context_embed = nn.Linear(clip_dim, embed_dim)
        self._build_trunk(extras=1 + num_clip_token, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                          qkv_bias=qkv_bias, qk_scale=qk_scale, norm_layer=norm_layer,
                          use_checkpoint=use_checkpoint, conv=conv, skip=skip)

    def forward(self, x, timesteps, context, timesteps2=None):
        """Predict the noise in x.

        x: (B, in_chans, img_size, img_size) latents; timesteps: (B,) or a scalar (n or 1000 t);
        context: (B, num_clip_token, clip_dim) text-encoder states (float);
        timesteps2: the second time input (B,) or a scalar, only for networks built with second_time.
        Returns (B, in_chans, img_size, img_size).
        """
        self._check_image(x)
        self._check_context(context, x.shape[0])

        patches = self.patch_embed(x)  # (B, L, D)
        time_tokens = self._time_tokens(timesteps, timesteps2, x)  # (B, 1 or 2, D)
        context_tokens = self.context_embed(context)  # (B, num_clip_token, D)
        x = torch.cat([time_tokens, context_tokens, patches], dim=1)  # (B, 1 or 2 + num_clip_token + L, D)
        return self._trunk(x)  # (B, C, H, W)

    def _check_context(self, context, batch_size):
        expected = (batch_size, self.num_clip_token, self.clip_dim)
        if not isinstance(context, torch.Tensor) or tuple(context.shape) != expected:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise InputError(f"context must have shape {expected} (B, num_clip_token, clip_dim), got {got}; "
                             "encode the prompts with the CLIP text encoder of config.nnet (clip_dim, num_clip_token)")
