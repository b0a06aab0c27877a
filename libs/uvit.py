"""U-ViT for unconditional and class-conditional diffusion (Bao et al., arXiv 2209.12152): the trunk of
libs/uvit_layers.py plus the label token and the input checks. Tokens: [label (class models), time, patches].
"""
import torch
import torch.nn as nn

from libs.errors import InputError
from libs.uvit_layers import UViTBase


class UViT(UViTBase):
    """U-ViT, unconditional (num_classes <= 0) or class-conditional.

    The constructor's keywords are exactly the `config.nnet` entries of the paper's configs
    (without `name`). For guided models (ImageNet 256/512) the last label, num_classes - 1, is the
    null class used for classifier-free guidance.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm, mlp_time_embed=False,
                 num_classes=-1, use_checkpoint=False, conv=True, skip=True, second_time=False):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         mlp_time_embed=mlp_time_embed, second_time=second_time)
        self.num_classes = num_classes
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        self._build_trunk(extras=2 if num_classes > 0 else 1, depth=depth, num_heads=num_heads,
                          mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, norm_layer=norm_layer,
                          use_checkpoint=use_checkpoint, conv=conv, skip=skip)

    def forward(self, x, timesteps, y=None, timesteps2=None):
        """Predict the noise in x.

        x: (B, in_chans, img_size, img_size); timesteps: (B,) or a scalar, the raw time values
        the scripts pass (999 t for continuous models, n or 1000 t for discrete ones);
        y: (B,) int64 labels in [0, num_classes) for class models, None otherwise;
        timesteps2: the second time input (B,) or a scalar, only for networks built with second_time.
        Returns (B, in_chans, img_size, img_size).
        """
        self._check_image(x)
        self._check_labels(y, x.shape[0])

        patches = self.patch_embed(x)  # (B, L, D)
        tokens = [self._time_tokens(timesteps, timesteps2, x), patches]  # (B, 1 or 2, D), (B, L, D)
        if self.num_classes > 0:
            tokens.insert(0, self.label_emb(y).unsqueeze(1))  # (B, 1, D) first
        x = torch.cat(tokens, dim=1)  # (B, extras + L, D)
        return self._trunk(x)  # (B, C, H, W)

    def _check_labels(self, y, batch_size):
        """Shapes always; the value range only on the CPU.

        Checking values on a GPU would force a host sync every step, so there (and while
        torch.compile traces) an out-of-range label is left to the embedding's own device-side
        index check, which aborts with a less friendly message.
        """
        if self.num_classes <= 0:
            if y is not None:
                raise InputError("this U-ViT is unconditional (num_classes <= 0) but got labels y; "
                                 "drop y, or build the model with num_classes > 0")
            return
        if y is None:
            raise InputError(f"this U-ViT is class-conditional (num_classes={self.num_classes}) and needs labels y of shape (B,); "
                             f"pass y (the null class for guidance is {self.num_classes - 1} when the config appends one)")
        if not isinstance(y, torch.Tensor) or y.shape != (batch_size,) or y.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputError(f"labels y must be an integer (int64) tensor of shape ({batch_size},), got {got}")
        if y.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                raise InputError(f"labels must lie in [0, {self.num_classes}), got {y[bad][:5].tolist()}; "
                                 "check the dataset's label range and config.nnet.num_classes")
