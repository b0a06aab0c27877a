"""libs.evaluation: exact sharding, per-index seeds, and evaluate() against an independent computation."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import pytorch_fid.inception as pf_inception
from libs import evaluation, fid
from libs.errors import InputError, MissingFileError
from libs.sampling import index_generators
from libs.metrics import inception


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    weights = str(root / "inception.pth")
    torch.save(inception.random_state_dict(seed=3), weights)
    ref = str(root / "ref.npz")
    rng = np.random.default_rng(0)
    np.savez(ref, mu=rng.standard_normal(2048), sigma=np.diag(rng.uniform(0.5, 2.0, 2048)))
    return weights, ref


@pytest.mark.parametrize("n,world,batch", [(10, 1, 3), (10, 3, 2), (7, 8, 4), (50000, 8, 200), (1, 2, 5)])
def test_shards_cover_every_index_exactly_once(n, world, batch):
    shards = [evaluation.shard_indices(n, r, world, batch) for r in range(world)]
    everything = torch.cat([b for s in shards for b in s])
    assert torch.equal(everything.sort().values, torch.arange(n))
    assert all(len(b) <= batch for s in shards for b in s)
    counts = [len(s) for s in shards if s]
    assert max(counts) - min(counts) <= 1  # ranks run (almost) the same number of batches


def test_index_generators_depend_only_on_seed_and_index():
    a = [torch.randn(3, generator=g) for g in index_generators(7, [4, 9, 2])]
    b = [torch.randn(3, generator=g) for g in index_generators(7, [2, 4])]
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    c = [torch.randn(3, generator=g) for g in index_generators(8, [4])]
    assert not torch.equal(a[0], c[0])


def test_generate_all_puts_every_image_at_its_index(accelerator):
    def generate_fn(indices):
        return indices.float()[:, None, None, None].expand(-1, 3, 2, 2)
    out = evaluation.generate_all(accelerator, generate_fn, 7, 3)
    assert out.shape == (7, 3, 2, 2) and torch.equal(out[:, 0, 0, 0], torch.arange(7).float())


def _images_of(indices):
    """Image i is a function of i only (as a per-index-seeded sampler's are)."""
    return torch.stack([torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(100 + int(i))) for i in indices])


def test_evaluate_equals_independent_pytorch_fid_statistics(accelerator, files, tmp_path, monkeypatch):
    weights, ref = files
    calls = []

    def generate_fn(indices):
        calls.append(indices.clone())
        torch.rand(1)  # a sampler drawing from the default generator must not move the caller's stream
        return _images_of(indices)

    rng_before = torch.get_rng_state()
    keep = tmp_path / "samples"
    result = evaluation.evaluate(accelerator, generate_fn, 3, 2, ref, seed=0, inception_weights=weights,
                                 keep_path=str(keep))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert result["n"] == 3 and torch.equal(torch.cat(calls).sort().values, torch.arange(3))
    assert [len(c) for c in calls] == [2, 1]

    # Independent: pytorch-fid's network on the PNGs written, numpy statistics.
    names = sorted(os.listdir(keep))
    assert names == [f"{i}.png" for i in range(3)]
    pngs = torch.stack([torch.from_numpy(np.asarray(Image.open(keep / f"{i}.png")).copy()) for i in range(3)])
    pngs = pngs.permute(0, 3, 1, 2).float() / 255
    assert torch.equal(pngs, fid.quantize_like_png(_images_of(range(3))))
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights))
    with torch.no_grad():
        feats = pf_inception.InceptionV3([3]).eval()(pngs)[0].flatten(1).double().numpy()
    with np.load(ref) as f:
        expected = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), f["mu"], f["sigma"])
    assert result["fid"] == pytest.approx(expected, rel=1e-5)
    assert result["inception_score"] == pytest.approx(1.0)  # 3 splits of one image each: IS is exactly 1


def test_evaluate_checks_the_reference_before_sampling(accelerator, files, tmp_path):
    weights, _ = files
    with pytest.raises(MissingFileError, match="compute_fid_stats"):
        evaluation.evaluate(accelerator, lambda i: pytest.fail("sampled before checking"), 4, 2,
                            str(tmp_path / "absent.npz"), seed=0, inception_weights=weights)


def test_evaluate_rejects_diverged_or_misshaped_samples(accelerator, files):
    weights, ref = files
    with pytest.raises(InputError, match="NaN"):
        evaluation.evaluate(accelerator, lambda i: torch.full((len(i), 3, 8, 8), float("nan")), 2, 2, ref, seed=0,
                            inception_weights=weights)
    with pytest.raises(InputError, match="generate_fn returned shape"):
        evaluation.evaluate(accelerator, lambda i: torch.zeros(len(i), 8, 8), 2, 2, ref, seed=0,
                            inception_weights=weights)
