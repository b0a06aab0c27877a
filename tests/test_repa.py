"""Representation alignment (libs/repa.py): the loss against its formula, where gradients go, the stored
encoder features written and read exactly, and an exact resume with alignment and post-hoc EMA on."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.tiny_models import write_tiny_autoencoder, write_tiny_clip
from configs.digits_uvit_tiny import get_config
from libs import shards as F
from libs.datasets.base import DatasetBase
from libs.datasets.features import LabelledMoments
from libs.errors import ConfigError, MissingFileError
from libs.family import PIXELS_CONTINUOUS
from libs.repa import AlignedNetwork, Encoder, Projector, alignment_loss, build_alignment, stored_features
from libs.trainer import train
from libs.uvit import UViT

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyEncoder(nn.Module):
    """(B, C, 8, 8) -> (B, 6, 4, 4): a stand-in encoder with parameters (to check they get no gradient)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 6, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


def _save_encoder(folder, channels):
    torch.manual_seed(0)
    path = str(folder / f"encoder{channels}.pt")
    torch.jit.save(torch.jit.trace(TinyEncoder(channels).eval(), torch.zeros(2, channels, 8, 8)), path)
    return path


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A TorchScript stand-in encoder of grey 8 x 8 images (the digits)."""
    return _save_encoder(tmp_path_factory.mktemp("enc"), 1)


def _numpy_bilinear_up2(grid):
    """(E, g, g) -> (E, 2g, 2g): bilinear, half-pixel centres, edges clamped (align_corners=False)."""
    e, g, _ = grid.shape
    src = np.clip((np.arange(2 * g) + 0.5) / 2 - 0.5, 0, g - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, g - 1)
    w = src - lo
    rows = grid[:, lo, :] * (1 - w)[None, :, None] + grid[:, hi, :] * w[None, :, None]
    return rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]


def _numpy_loss(proj, target):
    cos = (proj * target).sum(-1) / (np.linalg.norm(proj, axis=-1) * np.linalg.norm(target, axis=-1))
    return -cos.mean()


def test_alignment_loss_is_minus_the_mean_cosine_per_patch():
    g = torch.Generator().manual_seed(0)
    proj, target = torch.randn(3, 16, 5, generator=g), torch.randn(3, 16, 5, generator=g)
    expected = _numpy_loss(proj.double().numpy(), target.double().numpy())
    assert alignment_loss(proj, target).item() == pytest.approx(expected, abs=1e-6)
    assert alignment_loss(target, target).item() == pytest.approx(-1.0, abs=1e-6)
    # A 2 x 2 token grid against a 4 x 4 encoder grid: the projected tokens are resized bilinearly first.
    small = torch.randn(2, 4, 5, generator=g)
    target = torch.randn(2, 16, 5, generator=g)
    up = np.stack([_numpy_bilinear_up2(s.T.reshape(5, 2, 2)).reshape(5, 16).T for s in small.double().numpy()])
    assert alignment_loss(small, target).item() == pytest.approx(_numpy_loss(up, target.double().numpy()), abs=1e-6)


def tiny_uvit():
    return UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=4, num_heads=2, num_classes=11)


def test_the_hook_reads_the_block_and_adds_nothing_to_the_network(encoder_file):
    nnet = tiny_uvit()
    keys = list(nnet.state_dict())
    aligned = AlignedNetwork(nnet, Projector(16, 8, 6), 'in_blocks.1')
    assert list(nnet.state_dict()) == keys  # the saved network is the plain one
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2) * 999, torch.tensor([1, 2])
    seen = {}
    handle = nnet.in_blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault('h', out))
    out = aligned(x, t, y=y)
    handle.remove()
    assert torch.equal(out, nnet(x, t, y=y))
    assert torch.equal(aligned.projected, aligned.projector(seen['h'][:, nnet.extras:]))
    assert aligned.projected.shape == (2, 16, 6)


def test_gradients_reach_the_early_blocks_and_projector_not_the_encoder(encoder_file):
    nnet = tiny_uvit()
    aligned = AlignedNetwork(nnet, Projector(16, 8, 6), 'mid_block')
    encoder = Encoder('torchscript', encoder_file, resolution=8)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    aligned(x, torch.rand(2) * 999, y=torch.tensor([0, 3]))
    alignment_loss(aligned.projected, encoder(x)).backward()
    grads = {n: p.grad for n, p in aligned.named_parameters()}
    for name in ('nnet.patch_embed.proj.weight', 'nnet.in_blocks.0.attn.qkv.weight', 'nnet.pos_embed',
                 'projector.net.0.weight', 'projector.net.4.weight'):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads['nnet.out_blocks.0.mlp.fc1.weight'] is None  # after the aligned block: no alignment gradient
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())


def test_missing_encoder_files_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    with pytest.raises(MissingFileError, match="torch hub cache"):
        Encoder('dinov2_vitb14')
    with pytest.raises(MissingFileError, match="config.repa.weights"):
        Encoder('torchscript', str(tmp_path / 'none.pt'))
    with pytest.raises(MissingFileError, match="config.repa.weights"):
        Encoder('timm:vit_tiny_patch16_224', str(tmp_path / 'none.pth'))
    # A folder where the weights file belongs is refused the same way, before torch tries to read it.
    with pytest.raises(MissingFileError, match=f"TorchScript encoder at '{tmp_path}' is not a file"):
        Encoder('torchscript', str(tmp_path))


def test_the_stored_encoder_features_are_written_and_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    moments, labels = rng.normal(size=(5, 8, 2, 2)).astype(np.float32), np.arange(5)
    feats = rng.normal(size=(5, 4, 3)).astype(np.float32)
    for dtype in ('float32', 'float16'):
        folder = str(tmp_path / dtype)
        with F.ShardWriter(folder, 0, 3, (8, 2, 2), with_labels=True, repa_shape=(4, 3), repa_dtype=dtype) as w:
            w.write(0, moments[:3], labels[:3], repa=feats[:3])
            w.commit()
        with F.ShardWriter(folder, 1, 2, (8, 2, 2), with_labels=True, repa_shape=(4, 3), repa_dtype=dtype) as w:
            w.write(0, moments[3:], labels[3:], repa=feats[3:])
            w.commit()
        F.write_manifest(folder, 2, info={'repa_encoder': 'torchscript', 'repa_resolution': 8})
        reader = F.PackedFeatures(folder)
        assert reader.repa_shape == (4, 3)
        got = reader.repa_many([4, 0, 2])
        assert got.dtype == np.float32 and np.array_equal(got, feats[[4, 0, 2]].astype(dtype).astype(np.float32))
        items = LabelledMoments(reader)
        assert 'repa' not in items[0]  # read only when alignment asks for them
        data = DatasetBase(items, (4, 2, 2), kind='latent_moments', num_classes=5)
        cfg = get_config().repa
        cfg.update(encoder='torchscript', resolution=8)
        assert stored_features(data, cfg) == (4, 3)
        batch = items.__getitems__([1, 3])
        assert np.array_equal(batch[1]['repa'].numpy(), feats[3].astype(dtype).astype(np.float32))
        assert torch.equal(items[3]['repa'], batch[1]['repa'])
    cfg.resolution = 224
    with pytest.raises(ConfigError, match="come from 'torchscript' at 8 pixels"):
        stored_features(data, cfg)
    with pytest.raises(Exception, match="encoder features of shape"):
        with F.ShardWriter(str(tmp_path / 'bad'), 0, 1, (8, 2, 2), repa_shape=(4, 3)) as w:
            w.write(0, moments[:1])


def test_extraction_stores_the_encoder_features_of_images_and_flips(tmp_path):
    from PIL import Image


    rng = np.random.default_rng(0)
    for name, sizes in (('n01', [(16, 16), (20, 18)]), ('n02', [(16, 24)])):
        os.makedirs(tmp_path / 'train' / name)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / 'train' / name / f'{i}.png')
    encoder_file = _save_encoder(tmp_path, 3)
    spec = importlib.util.spec_from_file_location('extract_imagenet_feature', os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'extract_imagenet_feature.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / 'features'
    script.main([f'--imagenet_train={tmp_path / "train"}', f'--output={out}', '--resolution=16',
                 f'--autoencoder={write_tiny_autoencoder(str(tmp_path / "ae.pth"))}', '--batch_size=2',
                 '--num_workers=0', '--repa_encoder=torchscript', f'--repa_weights={encoder_file}',
                 '--repa_resolution=8', '--repa_dtype=float32'])
    reader = F.PackedFeatures(str(out))
    paths, labels, _ = script.list_imagenet(str(tmp_path / 'train'))
    images = script.CenterCropped(paths, labels, 16)
    encoder = Encoder('torchscript', encoder_file, resolution=8)
    for i in range(len(paths)):
        x = torch.as_tensor(images[i][0]).unsqueeze(0)
        for j, view in enumerate((x, x.flip(-1))):  # entry 2i: image i, 2i + 1: its mirror image
            expected = encoder(view)[0].numpy()
            torch.testing.assert_close(torch.from_numpy(reader.repa_many([2 * i + j])[0]),
                                       torch.from_numpy(expected), rtol=0, atol=1e-6)
    assert reader.manifest['info']['repa_encoder'] == 'torchscript'


def test_mscoco_extraction_stores_the_encoder_features_of_each_image(tmp_path):
    import json

    from PIL import Image

    from libs.datasets.features import CaptionedMoments

    coco = tmp_path / 'coco'
    os.makedirs(coco / 'train2014')
    os.makedirs(coco / 'annotations')
    rng = np.random.default_rng(0)
    ann = {'images': [], 'annotations': []}
    for image_id in (3, 1):
        name = f'COCO_train2014_{image_id:012d}.png'
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(coco / 'train2014' / name)
        ann['images'].append({'id': image_id, 'file_name': name, 'width': 16, 'height': 16})
        ann['annotations'].append({'id': image_id, 'image_id': image_id, 'caption': 'the cat'})
    (coco / 'annotations' / 'captions_train2014.json').write_text(json.dumps(ann))
    spec = importlib.util.spec_from_file_location('extract_mscoco_feature', os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'extract_mscoco_feature.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    encoder_file = _save_encoder(tmp_path, 3)
    script.main([f'--coco_root={coco}', f'--output={tmp_path / "out"}', '--split=train', '--resolution=16',
                 f'--autoencoder={write_tiny_autoencoder(str(tmp_path / "ae.pth"))}',
                 f'--clip={write_tiny_clip(str(tmp_path / "clip"), hidden_size=32)}', '--num_workers=0',
                 '--repa_encoder=torchscript', f'--repa_weights={encoder_file}', '--repa_resolution=8',
                 '--repa_dtype=float32'])
    reader = F.PackedFeatures(str(tmp_path / 'out' / 'train'))
    encoder = Encoder('torchscript', encoder_file, resolution=8)
    images = script.CocoImages(script.read_coco_captions(str(coco / 'annotations' / 'captions_train2014.json'),
                                                         str(coco / 'train2014')), 16)
    for i in range(2):  # image ids in increasing order
        expected = encoder(torch.as_tensor(images[i]).unsqueeze(0))[0]
        torch.testing.assert_close(torch.from_numpy(reader.repa_many([i])[0]), expected, rtol=0, atol=1e-6)
    items = CaptionedMoments(reader)
    items.with_repa = True
    assert torch.equal(items[1]['repa'], items.__getitems__([0, 1])[1]['repa'])


def repa_config(encoder_file, **train):
    config = get_config()
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    config.train.update({'batch_size': 16, 'log_interval': 3, 'eval_interval': 1000, 'save_interval': 1000, **train})
    config.lr_scheduler.warmup_steps = 2
    config.grid.update(n_rows=2, n_cols=2, steps=2)
    config.fid.n_samples = 0
    config.sample.update(n_samples=8, sample_steps=2, mini_batch_size=8)
    config.repa.update(enabled=True, encoder='torchscript', weights=encoder_file, resolution=8, projector_dim=16)
    config.posthoc_ema.snapshot_interval = 2
    return config


def test_resume_with_alignment_and_posthoc_ema_is_exact(tmp_path, encoder_file):
    # The stand-in encoder takes grey 8 x 8 digits: exactly the dataset's images.
    straight = train(repa_config(encoder_file, n_steps=6, save_interval=3), str(tmp_path / 'a'), PIXELS_CONTINUOUS)
    train(repa_config(encoder_file, n_steps=3), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    resumed = train(repa_config(encoder_file, n_steps=6), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    a, b = straight['run'], resumed['run']
    for x, y in ((a.nnet, b.nnet), (a.aligner.projector, b.aligner.projector)):
        assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))
    assert all(torch.equal(p, q) for pa, pb in zip(a.posthoc.averages, b.posthoc.averages) for p, q in zip(pa, pb))
    sa, sb = a.optimizer.state_dict()['state'], b.optimizer.state_dict()['state']
    assert len(sa) == len(list(a.aligner.parameters())) and all(torch.equal(sa[k]['exp_avg'], sb[k]['exp_avg']) for k in sa)
    assert [m['align_loss'] for m in b.logged] == [m['align_loss'] for m in a.logged if m['step'] > 3]
    assert all(-1 <= m['align_loss'] <= 1 for m in a.logged)
    # The checkpoint's network is the plain U-ViT; the projector is in train_state only.
    ckpt = os.path.join(straight['checkpoint'])
    nnet_sd = torch.load(os.path.join(ckpt, 'nnet_ema.pth'), weights_only=True)
    assert not any('projector' in k for k in nnet_sd) and set(nnet_sd) == set(a.nnet.state_dict())
    state = torch.load(os.path.join(ckpt, 'train_state.pth'), weights_only=False)
    assert set(state['repa_projector']) == set(a.aligner.projector.state_dict())
    assert sorted(os.listdir(tmp_path / 'a' / 'posthoc_ema')) == ['2.pth', '4.pth', '6.pth']


def test_a_latent_feature_dataset_without_stored_features_is_refused(encoder_file):
    data = DatasetBase([], (4, 2, 2), kind='latent_moments', num_classes=5)
    cfg = get_config().repa
    with pytest.raises(ConfigError, match="--repa_encoder"):
        build_alignment(cfg, tiny_uvit(), data, 'cpu')
    cfg.block = 'in_blocks.7'
    with pytest.raises(ConfigError, match="mid_block"):
        build_alignment(cfg, tiny_uvit(), data, 'cpu')
    assert math.isfinite(cfg.weight)


def test_dry_run_checks_the_alignment_setup(tmp_path, encoder_file, monkeypatch):
    from libs.trainer import dry_run

    config = repa_config(encoder_file, n_steps=2)
    dry_run(config, str(tmp_path), PIXELS_CONTINUOUS)
    config.repa.block = 'out_blocks.5'
    with pytest.raises(ConfigError, match="config.repa.block='out_blocks.5' is not a block"):
        dry_run(config, str(tmp_path), PIXELS_CONTINUOUS)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    config.repa.update(block='mid_block', encoder='dinov2_vits14', weights='', resolution=224)
    with pytest.raises(MissingFileError, match="facebookresearch_dinov2_main"):
        dry_run(config, str(tmp_path), PIXELS_CONTINUOUS)
