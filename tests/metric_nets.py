"""Tiny random feature networks with the interfaces of libs.metrics' (no download): for the metric tests."""
import torch
import torch.nn.functional as F


class TinyInception(torch.nn.Module):
    """images (B, 3, H, W) in [0, 1] -> {'pool': (B, 16), 'logits': (B, 10), 'spatial': (B, 12)}."""

    dims = {"pool": 16, "logits": 10, "spatial": 12}

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_pool = torch.nn.Parameter(torch.randn(48, 16, generator=g) / 4, requires_grad=False)
        self.w_logits = torch.nn.Parameter(torch.randn(16, 10, generator=g), requires_grad=False)
        self.w_spatial = torch.nn.Parameter(torch.randn(48, 12, generator=g) / 4, requires_grad=False)

    def forward(self, images):
        x = F.adaptive_avg_pool2d(images.float(), 4).flatten(1) * 4 - 2  # (B, 48)
        pool = torch.tanh(x @ self.w_pool) + x[:, :16]
        return {"pool": pool, "logits": pool @ self.w_logits, "spatial": torch.relu(x @ self.w_spatial)}


class TinyDINOv2(torch.nn.Module):
    """images -> {'dinov2': (B, 8)}."""

    dims = {"dinov2": 8}

    def __init__(self, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(27, 8, generator=g), requires_grad=False)

    def forward(self, images):
        return {"dinov2": torch.sin(F.adaptive_avg_pool2d(images.float(), 3).flatten(1) @ self.w)}


def images_of(indices, size=12):
    """Image i is a function of i only (as a per-index-seeded sampler's are)."""
    return torch.stack([torch.rand(3, size, size, generator=torch.Generator().manual_seed(100 + int(i)))
                        for i in indices])
