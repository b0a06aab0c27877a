"""Fine-tuning initialisation: strict by default; label / position embeddings resized on request."""
import logging
import os

import ml_collections
import pytest
import torch
import torch.nn.functional as F

from libs.errors import CheckpointError
from libs.export import export_model
from libs.finetune import init_weights
from libs.nnet import build_nnet

BASE = dict(name='uvit', img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2,
            mlp_time_embed=False, num_classes=5, conv=True)


def net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_nnet({**BASE, **kwargs})


def saved(tmp_path, nnet, name='src.pth'):
    path = tmp_path / name
    torch.save(nnet.state_dict(), path)
    return str(path)


def grid_of(pos, extras, g):
    """(1, extras + g*g, D) -> (1, D, g, g), token i at row i // g, column i % g (written out, no reshape)."""
    D = pos.shape[2]
    out = torch.empty(1, D, g, g)
    for i in range(g * g):
        out[0, :, i // g, i % g] = pos[0, extras + i]
    return out


def test_strict_by_default(tmp_path):
    src = saved(tmp_path, net(num_classes=5))
    with pytest.raises(CheckpointError) as e:
        init_weights(net(seed=1, num_classes=8, img_size=12), src)
    msg = str(e.value)
    assert '\n' not in msg and 'label_emb.weight checkpoint (5, 16) vs model (8, 16)' in msg
    assert 'pos_embed' in msg and '--config.init.resize=True' in msg
    same = net(seed=1)
    assert init_weights(same, src) == []
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), torch.load(src).values()))


def test_grow_classes_and_grid(tmp_path, caplog):
    source = net(seed=0, num_classes=5)  # 4 classes + null (4)
    target = net(seed=1, num_classes=8, img_size=12)  # 7 classes + null (7); grid 4x4 -> 6x6
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.INFO, logger='libs.finetune'):
        adapted = init_weights(target, saved(tmp_path, source), resize=True, null_last=True)
    assert adapted == ['label_emb.weight', 'pos_embed']
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('init: ')]
    assert len(lines) == 2
    assert lines[0].startswith('init: label_emb.weight (5, 16) -> (8, 16)') and 'null class 4 -> 7' in lines[0]
    assert lines[1].startswith('init: pos_embed (1, 18, 16) -> (1, 38, 16)') and '4x4 -> 6x6' in lines[1]

    src, dst = source.state_dict(), target.state_dict()
    lab = dst['label_emb.weight']
    assert lab.shape == (8, 16)
    assert torch.equal(lab[:4], src['label_emb.weight'][:4])  # data classes kept
    assert torch.equal(lab[7], src['label_emb.weight'][4])  # the null class moved last
    assert torch.equal(lab[4:7], before['label_emb.weight'][4:7])  # new classes: the network's own init
    pos = dst['pos_embed']
    assert pos.shape == (1, 2 + 36, 16)
    assert torch.equal(pos[:, :2], src['pos_embed'][:, :2])  # label and time tokens untouched
    expected = F.interpolate(grid_of(src['pos_embed'], 2, 4), size=(6, 6), mode='bicubic', align_corners=False)
    assert torch.allclose(grid_of(pos, 2, 6), expected, atol=1e-6)
    for k in src:  # every other tensor is the source's
        if k not in ('label_emb.weight', 'pos_embed'):
            assert torch.equal(dst[k], src[k]), k


def test_bicubic_keeps_a_constant_grid_constant(tmp_path):
    # Bicubic weights sum to 1 (Keys 1981), so a constant grid stays constant at any size.
    source = net(seed=0)
    with torch.no_grad():
        source.pos_embed[:, 2:] = torch.arange(16.).view(1, 1, 16) * 0.1
    target = net(seed=1, img_size=16)  # grid 8x8
    init_weights(target, saved(tmp_path, source), resize=True)
    assert torch.allclose(target.pos_embed[:, 2:], source.pos_embed[:, 2:3].expand(1, 64, 16), atol=1e-6)


def test_shrink_classes_and_grid(tmp_path):
    source = net(seed=0, num_classes=8, img_size=12)  # 7 classes + null
    target = net(seed=1, num_classes=3)  # 2 classes + null; grid 6x6 -> 4x4
    init_weights(target, saved(tmp_path, source), resize=True)
    src = source.state_dict()
    assert torch.equal(target.label_emb.weight[:2], src['label_emb.weight'][:2])
    assert torch.equal(target.label_emb.weight[2], src['label_emb.weight'][7])
    expected = F.interpolate(grid_of(src['pos_embed'], 2, 6), size=(4, 4), mode='bicubic', align_corners=False)
    assert torch.allclose(grid_of(target.pos_embed.detach(), 2, 4), expected, atol=1e-6)


def test_without_null_class_rows_map_one_to_one(tmp_path):
    source, target = net(seed=0, num_classes=5), net(seed=1, num_classes=7)
    before = target.label_emb.weight.detach().clone()
    init_weights(target, saved(tmp_path, source), resize=True, null_last=False)
    assert torch.equal(target.label_emb.weight[:5], source.label_emb.weight)
    assert torch.equal(target.label_emb.weight[5:], before[5:])


def test_exported_source_says_whether_it_has_a_null_class(tmp_path):
    source = net(seed=0, num_classes=5)  # 5 data classes, trained without guidance: no null class
    config = ml_collections.ConfigDict(dict(nnet=BASE, z_shape=None, autoencoder=dict(scale_factor=1.0),
                                            dataset=dict(name='toy', cfg=False), sample=dict()))
    folder = export_model(saved(tmp_path, source), tmp_path / 'export', config)
    target = net(seed=1, num_classes=8)  # 7 classes + null
    before = target.label_emb.weight.detach().clone()
    init_weights(target, folder, resize=True, null_last=True)
    assert torch.equal(target.label_emb.weight[:5], source.label_emb.weight)
    assert torch.equal(target.label_emb.weight[5:], before[5:])  # classes 5, 6 and the null class are new


def test_unconditional_source_into_a_class_model(tmp_path, caplog):
    # CIFAR10-like unconditional U-ViT -> a 10-class model with guidance (11 labels), grid 4x4 -> 6x6.
    source = net(seed=0, num_classes=-1)
    target = net(seed=1, num_classes=11, img_size=12)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.INFO, logger='libs.finetune'):
        assert init_weights(target, saved(tmp_path, source), resize=True) == ['label_emb.weight', 'pos_embed']
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('init: ')]
    assert len(lines) == 2 and 'the source is unconditional' in lines[0] and "the label token's new" in lines[1]
    src = source.state_dict()
    assert torch.equal(target.label_emb.weight, before['label_emb.weight'])
    assert torch.equal(target.pos_embed[:, 0], before['pos_embed'][:, 0])  # the label token: network's init
    assert torch.equal(target.pos_embed[:, 1], src['pos_embed'][:, 0])  # the time token: the source's
    expected = F.interpolate(grid_of(src['pos_embed'], 1, 4), size=(6, 6), mode='bicubic', align_corners=False)
    assert torch.allclose(grid_of(target.pos_embed.detach(), 2, 6), expected, atol=1e-6)
    for k in src:
        if k != 'pos_embed':
            assert torch.equal(target.state_dict()[k], src[k]), k


def test_class_source_into_an_unconditional_model(tmp_path):
    source = net(seed=0, num_classes=5)
    target = net(seed=1, num_classes=-1)  # same grid: the patch positions are copied exactly
    assert init_weights(target, saved(tmp_path, source), resize=True) == ['label_emb.weight', 'pos_embed']
    assert torch.equal(target.pos_embed, source.pos_embed[:, 1:])
    assert not hasattr(target, 'label_emb')


def test_checkpoint_directory_source(tmp_path):
    source = net(seed=0)
    ckpt = tmp_path / 'ckpts' / '100.ckpt'
    os.makedirs(ckpt)
    torch.save(source.state_dict(), ckpt / 'nnet_ema.pth')
    target = net(seed=1, img_size=12)
    assert init_weights(target, str(ckpt), resize=True) == ['pos_embed']
    assert torch.equal(target.label_emb.weight, source.label_emb.weight)


def test_text_network_keeps_its_context_tokens(tmp_path):
    t2i = dict(name='uvit_t2i', img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=2, num_heads=2,
               clip_dim=8, num_clip_token=3)
    torch.manual_seed(0)
    source = build_nnet(t2i)
    target = build_nnet({**t2i, 'img_size': 4})  # grid 4x4 -> 2x2
    init_weights(target, saved(tmp_path, source), resize=True)
    assert torch.equal(target.pos_embed[:, :4], source.pos_embed[:, :4])  # time + 3 context tokens
    expected = F.interpolate(grid_of(source.pos_embed.detach(), 4, 4), size=(2, 2), mode='bicubic', align_corners=False)
    assert torch.allclose(grid_of(target.pos_embed.detach(), 4, 2), expected, atol=1e-6)


@pytest.mark.parametrize('change', [dict(patch_size=4), dict(depth=4), dict(embed_dim=32), dict(in_chans=4)])
def test_other_differences_stay_errors(tmp_path, change):
    src = saved(tmp_path, net(seed=0))
    with pytest.raises(CheckpointError, match='does not match'):
        init_weights(net(seed=1, **change), src, resize=True)


def test_the_resume_refusal_of_a_new_resolution_gives_an_init_from_that_works(tmp_path):
    import libs.trainer as trainer
    from configs.digits_uvit_tiny import get_config
    from libs.errors import ConfigError
    from libs.family import PIXELS_CONTINUOUS

    def config(resolution):
        c = get_config()
        c.nnet.update(embed_dim=32, depth=1, num_heads=2, img_size=resolution)
        c.dataset.resolution = resolution
        c.train.update(n_steps=2, batch_size=8, log_interval=2, eval_interval=1000, save_interval=2)
        c.fid.n_samples = 0
        c.sample.update(n_samples=2, sample_steps=1, mini_batch_size=2)
        return c

    trainer.train(config(8), str(tmp_path / "a"), PIXELS_CONTINUOUS)
    with pytest.raises(ConfigError) as e:
        trainer.train(config(16), str(tmp_path / "a"), PIXELS_CONTINUOUS)
    ckpt = tmp_path / "a" / "ckpts" / "2.ckpt"
    advice = f"start a new run from these weights in another --workdir: --init_from={ckpt} --config.init.resize=True"
    assert advice in str(e.value)
    # What the advice says, as written: the new run starts from the adapted weights.
    new = config(16)
    new.init.update(path=str(ckpt), resize=True)
    assert trainer.train(new, str(tmp_path / "b"), PIXELS_CONTINUOUS)["step"] == 2
