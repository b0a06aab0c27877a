"""torch.compile can capture the whole U-ViT forward in one graph (no graph breaks), with
gradient checkpointing on, so compiled training runs without Python round trips per block."""
import pytest
import torch
import torch._dynamo

from libs import uvit, uvit_t2i

TINY = dict(img_size=8, patch_size=2, embed_dim=32, depth=4, num_heads=4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_class_model_traces_without_graph_breaks():
    model = uvit.UViT(**TINY, num_classes=5, mlp_time_embed=True, use_checkpoint=True).train()
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2) * 999, torch.tensor([1, 4])
    report = torch._dynamo.explain(model)(x, t, y)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_text_model_traces_without_graph_breaks():
    model = uvit_t2i.UViT(**TINY, in_chans=4, clip_dim=8, num_clip_token=3).eval()
    report = torch._dynamo.explain(model)(torch.randn(2, 4, 8, 8), 500.0, torch.randn(2, 3, 8))
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
