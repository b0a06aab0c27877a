"""The feature networks of the metrics: Inception's sFID features, DINOv2 from a torch hub cache, the CLIP score
against torchmetrics; a missing file is one line saying what to put where. Tiny random networks, no download."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from libs.errors import MissingFileError
from libs.metrics import clip_score, dinov2
from benchmarks.tiny_models import write_tiny_clip
from libs.metrics import inception

HUBCONF = '''
import torch


def dinov2_vitl14(pretrained=True, **kwargs):
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 5))
    net.embed_dim = 5
    return net
'''


def test_spatial_features_are_mixed_6_conv_first_channels_in_hwc_order():
    net = inception.FIDInceptionV3()
    net.load_state_dict(inception.random_state_dict(seed=1))
    seen = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool, logits = net(x, with_logits=True)
        feats = net.all_features(x)
    assert torch.equal(feats["pool"], pool) and torch.equal(feats["logits"], logits)  # FID / IS bit-identical
    conv = seen[0][:, :7]  # (2, 7, 17, 17) as TF's mixed_6/conv[..., :7], flattened (h, w, c)
    assert feats["spatial"].shape == (2, inception.SPATIAL_DIMS)
    assert torch.equal(feats["spatial"].view(2, 17, 17, 7)[:, 3, 5], conv[:, :, 3, 5])


def test_dinov2_from_a_hub_cache_and_edm2_preprocessing(tmp_path):
    repo = tmp_path / "facebookresearch_dinov2_main"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    with pytest.raises(MissingFileError, match="dinov2_vitl14_pretrain.pth"):
        dinov2.load_dinov2(str(tmp_path / "absent.pth"), str(repo))
    with pytest.raises(MissingFileError, match="torch.hub.load"):
        dinov2.load_dinov2(str(tmp_path / "absent.pth"), str(tmp_path / "no_repo"))
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 5))
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    net = dinov2.load_dinov2(str(tmp_path / "w.pth"), str(repo))
    images = torch.randint(0, 256, (2, 3, 40, 40)).float() / 255
    pixels = F.interpolate(images * 255, size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(images)["dinov2"], reference((pixels - mean) / std), atol=1e-5)


def _tiny_clip_model(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tiny_clip(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return model, processor


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns outputs with pooler_output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_equals_torchmetrics(tmp_path):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    model, processor = _tiny_clip_model(tmp_path / "clip")
    scorer = clip_score.load_clip_scorer(str(tmp_path / "clip"))
    images = torch.randint(0, 256, (3, 3, 40, 48), generator=torch.Generator().manual_seed(1)).float() / 255
    prompts = ["the cat", "a dog", "the dog"]
    ours = scorer(images, prompts)
    theirs = tm_clip_score(list(images.mul(255).round().to(torch.uint8)), prompts,
                           model_name_or_path=lambda: (_TensorFeatures(model), processor))
    assert float(ours.mean()) == pytest.approx(float(theirs), rel=1e-4, abs=1e-4)
    with pytest.raises(MissingFileError, match="clip-vit-large-patch14"):
        clip_score.load_clip_scorer(str(tmp_path / "absent"))
    assert np.all(ours.numpy() >= 0)
