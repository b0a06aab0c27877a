"""The pieces of U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", arXiv
2209.12152, Fig. 1) and `UViTBase`, the trunk both networks share (libs/uvit.py, libs/uvit_t2i.py). Module and
parameter names are the original release's, so its checkpoints load strictly.

Shapes: B batch, C image channels, H, W image size, p patch size, L = (H / p) * (W / p) patch tokens,
T = extras + L tokens, D width, h heads, Dh = D / h.
"""
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from libs import attention as attention_backends
from libs.attention import attention
from libs.errors import InputError


def timestep_embedding(timesteps, dim, max_period=10000, dtype=torch.float32):
    """Sinusoidal embedding [cos(t f) | sin(t f)] of (B,) time values (e.g. 999 t or n in 1..1000) -> (B, dim).

    The transformer position encoding (Vaswani et al. 2017) applied to time, as in DDPM (Ho et al. 2020):
    f_i = max_period ** (-i / half), i < half = dim // 2, plus a zero column when dim is odd. float32 (the
    published models were trained so, and low precision would blur large t) unless `dtype` says float64 (float64
    networks: derivative checks then see the time path exactly).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half)  # (half,)
    args = timesteps.to(dtype)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class PatchEmbed(nn.Module):
    """Image to patch tokens: a p x p convolution with stride p, tokens in row-major grid order."""

    def __init__(self, patch_size, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, L, D)."""
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form) -> fc2. No dropout (U-ViT trains without any)."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D)."""
        x = self.act(self.fc1(x))  # (B, T, hidden)
        return self.fc2(x)  # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention, kernel chosen by libs.attention; qkv features laid out (3, h, Dh) as the original."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, h, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, Dh)
        x = attention(q, k, v, scale=self.scale)  # (B, h, T, Dh)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(x)  # (B, T, D)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x = skip_linear(cat([x, skip], -1)) (out-blocks only), then
    x = x + attn(norm1(x)); x = x + mlp(norm2(x)). use_checkpoint recomputes training forwards in the
    backward pass (non-reentrant torch.utils.checkpoint): same gradients, far less activation memory.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None,
                 norm_layer=nn.LayerNorm, skip=False, use_checkpoint=False):
        super().__init__()
        # Registration order = the original's state-dict order.
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x, skip=None):
        """x: (B, T, D), skip: (B, T, D) or None (ignored by blocks without skip_linear) -> (B, T, D)."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, T, 2D) -> (B, T, D)
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        return x + self.mlp(self.norm2(x))  # (B, T, D)


def unpatchify(x, channels):
    """Patch tokens (B, L, p * p * C), features ordered (p1, p2, C), L square -> image (B, C, sqrt(L) p, sqrt(L) p)."""
    B, L, patch_dim = x.shape
    p = int(math.isqrt(patch_dim // channels))
    grid = int(math.isqrt(L))
    assert p * p * channels == patch_dim and grid * grid == L, "unpatchify needs square patches and a square grid"
    x = x.reshape(B, grid, grid, p, p, channels)  # (B, H/p, W/p, p1, p2, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p1, W/p, p2)
    return x.reshape(B, channels, grid * p, grid * p)  # (B, C, H, W)


class UViTBase(nn.Module):
    """What both U-ViTs share: patch and time embeddings, the U-shaped stack of blocks with long skips, the
    head. A subclass registers its condition embedding between `__init__` (patch_embed, time_embed) and
    `_build_trunk` (pos_embed, blocks, head), keeping the original's state-dict order, and builds the tokens
    in `forward`. Depth D gives D // 2 in-blocks, a middle block and D // 2 out-blocks: an odd depth builds
    the even depth below it, a quirk of the original kept so configs and checkpoints mean the same here.
    """

    def __init__(self, img_size, patch_size, in_chans, embed_dim, mlp_time_embed, second_time=False):
        super().__init__()
        attention_backends.prepare()  # fail early on a bad UVIT_ATTENTION; import xformers outside forward
        self.img_size, self.patch_size, self.in_chans, self.embed_dim = img_size, patch_size, in_chans, embed_dim
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)

        def time_mlp():
            return nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                 nn.Linear(4 * embed_dim, embed_dim)) if mlp_time_embed else nn.Identity()
        self.time_embed = time_mlp()
        # The second time input of the few-step objectives (sde.MeanFlow: t - r or r; sde.Shortcut: the step d),
        # one more token; absent otherwise, so the published layouts are untouched.
        self.second_time = bool(second_time)
        if self.second_time:
            self.time2_embed = time_mlp()

    def _build_trunk(self, extras, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, norm_layer,
                     use_checkpoint, conv, skip):
        """Register pos_embed, the blocks and the head, then initialise every weight."""
        extras += self.second_time  # the second time token follows the first
        self.extras, self.depth = extras, depth
        self.pos_embed = nn.Parameter(torch.zeros(1, extras + self.num_patches, self.embed_dim))
        block = dict(dim=self.embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     qk_scale=qk_scale, norm_layer=norm_layer, use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=skip) for _ in range(depth // 2)])
        self.norm = norm_layer(self.embed_dim)
        self.patch_dim = self.patch_size ** 2 * self.in_chans
        self.decoder_pred = nn.Linear(self.embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(self.in_chans, self.in_chans, 3, padding=1) if conv else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=.02)
        self.apply(_init_weights)

    @staticmethod
    def init_module(module):
        """Initialise `module`'s own parameters (not its children's) as a build does, in distribution: PyTorch's
        default (`reset_parameters`), then the original's `_init_weights`; the U-ViT itself: pos_embed
        trunc-normal(std .02). libs/fsdp.py's meta-device build calls it once per module, seeded per module."""
        if isinstance(module, UViTBase):
            nn.init.trunc_normal_(module.pos_embed, std=.02)
            return
        if hasattr(module, 'reset_parameters'):
            module.reset_parameters()
        _init_weights(module)

    def no_weight_decay(self):
        """Parameter names an optimizer should not decay (the original listed it but never used it)."""
        return {"pos_embed"}

    def _check_image(self, x):
        """x must be (B, in_chans, img_size, img_size); returns B."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"{type(self).__name__} expects x of shape (B, {', '.join(map(str, expected))}), got {got}; "
                             "check the dataset resolution / latent shape against config.nnet (img_size, in_chans)")
        return x.shape[0]

    def _check_timesteps(self, timesteps, x):
        """timesteps: (B,) or a scalar (tensor or number), broadcast to (B,). Returns (B,) on x.device."""
        B = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(B)
        if timesteps.shape != (B,):
            raise InputError(f"timesteps must have shape ({B},) (one per image) or be a scalar, got {tuple(timesteps.shape)}")
        return timesteps

    def _time_token(self, timesteps, embed=None):
        """timesteps: (B,) -> (B, 1, D) through `embed` (default time_embed)."""
        # The sinusoid is float32; cast it to the parameter dtype so that a float64 (or bf16)
        # model works (the original crashed in float64 with mlp_time_embed). Under autocast the
        # parameters stay float32, so this is a no-op and autocast decides the Linear's precision.
        exact = torch.float64 if self.pos_embed.dtype == torch.float64 else torch.float32
        emb = timestep_embedding(timesteps, self.embed_dim, dtype=exact).to(self.pos_embed.dtype)  # (B, D)
        return (embed or self.time_embed)(emb).unsqueeze(1)  # (B, 1, D)

    def _time_tokens(self, timesteps, timesteps2, x):
        """[time token] or, with second_time, [time token, second time token]: (B, 1 or 2, D). timesteps2: (B,),
        a scalar, or None (networks without second_time only)."""
        token = self._time_token(self._check_timesteps(timesteps, x))
        if not self.second_time:
            if timesteps2 is not None:
                raise InputError(f"this {type(self).__name__} has no second time input (built with "
                                 "second_time=False) but got timesteps2; drop it, or build with second_time=True")
            return token
        if timesteps2 is None:
            raise InputError(f"this {type(self).__name__} takes a second time input (second_time=True: MeanFlow / "
                             "shortcut objectives); pass timesteps2 (B,)")
        token2 = self._time_token(self._check_timesteps(timesteps2, x), self.time2_embed)
        return torch.cat([token, token2], dim=1)  # (B, 2, D)

    def _trunk(self, x):
        """x: (B, T, D) tokens, the first `extras` of them condition tokens -> (B, C, H, W)."""
        x = x + self.pos_embed  # (B, T, D)
        skips = []
        for blk in self.in_blocks:
            x = blk(x)  # (B, T, D)
            skips.append(x)
        x = self.mid_block(x)  # (B, T, D)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())  # (B, T, D); last in, first out
        x = self.norm(x)  # (B, T, D)
        x = self.decoder_pred(x)  # (B, T, p * p * C)
        x = x[:, self.extras:, :]  # (B, L, p * p * C)
        x = unpatchify(x, self.in_chans)  # (B, C, H, W)
        return self.final_layer(x)  # (B, C, H, W)


def _init_weights(m):
    """The original's init: Linear trunc-normal(std .02), zero bias; LayerNorm 1 / 0; convolutions and the
    label embedding keep PyTorch's defaults."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
