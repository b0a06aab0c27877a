"""libs.metrics: each statistic against an independent implementation on the same features (torchmetrics, prdc,
pytorch-fid's numpy FID), the ADM resize, balanced labels, the ADM sample file, and the one evaluation pass."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from libs import evaluation, fid
from libs.errors import ConfigError, MissingFileError
from libs.metrics import kid, precision_recall
from libs.metrics.sample_file import ShardedSampleWriter, read_rows
from libs.metrics.suite import MetricOptions, parse_names, reference_arrays, reference_file_arrays
from tests.metric_nets import TinyDINOv2, TinyInception, images_of

ALL = ("fid", "is", "sfid", "prc", "kid", "fd_dinov2")


def test_kid_equals_torchmetrics_and_is_zero_mean_for_one_distribution():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((60, 7)), rng.standard_normal((60, 7)) * 1.3 + 0.2
    ours = kid.kernel_inception_distance(a, b, subsets=1, subset_size=60)[0]  # whole sets: no subset randomness
    assert ours == pytest.approx(float(poly_mmd(torch.from_numpy(a), torch.from_numpy(b))), rel=1e-9)
    same = [kid.kernel_inception_distance(rng.standard_normal((50, 4)), rng.standard_normal((50, 4)), subsets=5,
                                          subset_size=40, seed=s)[0] for s in range(20)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-3  # unbiased: mean 0 for P = Q


def test_precision_recall_equals_prdc_in_blocks():
    from prdc import compute_prdc

    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((80, 5)), rng.standard_normal((70, 5)) * 0.7 + 0.3
    p, r = precision_recall.precision_recall(real, fake, k=3, block=17)
    theirs = compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    assert (p, r) == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1


def _adm_precision_recall(real, fake, k=3):
    """ADM's evaluator written out in numpy (guided-diffusion evaluations/evaluator.py, ManifoldEstimator and
    _batch_pairwise_distances): float32 features cast to float16; D = max(|u|^2 - 2 u.v + |v|^2, 0) with
    tf.square, reduce_sum and matmul giving float16 (sums of float16 values accumulated in float32, as its GPU
    kernels), the float32 distances used instead when D holds a non-finite value; radius = the (k+1)-th
    smallest distance of a row within its own set (np.partition), x is inside when D <= some radius."""
    def pairwise(u, v, dtype):
        u, v = u.astype(dtype), v.astype(dtype)
        norm_u = np.square(u).astype(np.float32).sum(1).astype(dtype).reshape(-1, 1)
        norm_v = np.square(v).astype(np.float32).sum(1).astype(dtype).reshape(1, -1)
        uv = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
        return np.maximum(norm_u - 2 * uv + norm_v, dtype(0))

    def distances(u, v):
        with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow: the fallback below
            d = pairwise(u, v, np.float16)
        return (d if np.all(np.isfinite(d)) else pairwise(u, v, np.float32)).astype(np.float32)

    real, fake = np.float32(real), np.float32(fake)
    radii = [np.partition(distances(x, x), k, axis=1)[:, k] for x in (real, fake)]
    precision = np.mean(np.any(distances(fake, real) <= radii[0][None, :], axis=1))
    recall = np.mean(np.any(distances(real, fake) <= radii[1][None, :], axis=1))
    return float(precision), float(recall)


def test_adm_arithmetic_equals_adms_float16_evaluator():
    # Inception-like features (non-negative, norms ~ 10-20: float16 keeps 3 digits of distances ~ 100-400).
    rng = np.random.default_rng(4)
    moved = 0
    for trial in range(4):
        real = np.abs(rng.standard_normal((180, 64))) * 1.5
        fake = np.abs(rng.standard_normal((160, 64))) * 1.5 + 0.05 * rng.standard_normal((160, 64))
        ours = precision_recall.precision_recall(real, fake, k=3, block=50, arithmetic="adm")
        assert ours == _adm_precision_recall(real, fake), trial
        moved += ours != precision_recall.precision_recall(real, fake, k=3, block=50)
    assert moved  # the option changes something: float64 places some near-ties differently
    # Norms beyond float16's range (65504): ADM's fallback to float32 distances.
    real, fake = rng.standard_normal((40, 16)) * 100, rng.standard_normal((30, 16)) * 100
    assert precision_recall.precision_recall(real, fake, arithmetic="adm") == _adm_precision_recall(real, fake)


def test_inception_score_equals_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    logits = torch.randn(100, 10, generator=torch.Generator().manual_seed(2)) * 3
    stats = fid.InceptionStatistics(dims=4, splits=1, num_classes=10)
    stats.update(torch.zeros(100, 4), logits, torch.zeros(100, dtype=torch.long))
    metric = InceptionScore(feature=torch.nn.Identity(), splits=1)  # one split: its shuffling changes nothing
    metric.update(logits.double())
    assert stats.inception_score()[0] == pytest.approx(float(metric.compute()[0]), rel=1e-6)


def test_adm_resize_is_tf1_bilinear():
    from libs.metrics.inception import resize_for_inception, tf1_resize_bilinear

    # TF1 (align_corners=False, no half-pixel centres) samples position o * n / size, clamped at the last pixel:
    # on a ramp x[i] = i the output is exactly min(o n / size, n - 1).
    n = 20
    ramp = torch.arange(n, dtype=torch.float64).view(1, 1, 1, n).expand(1, 1, 3, n)
    out = tf1_resize_bilinear(ramp, 299)[0, 0, 0]
    assert torch.allclose(out, (torch.arange(299, dtype=torch.float64) * n / 299).clamp(max=n - 1), atol=1e-12)
    u = torch.rand(1, 3, 8, 8)
    adm, ours = resize_for_inception(u, "adm"), resize_for_inception(u, "pytorch-fid")
    assert adm.shape == ours.shape == (1, 3, 299, 299) and not torch.allclose(adm, ours, atol=1e-2)


def test_balanced_labels_are_exact_and_uniform_ones_unchanged():
    from configs import imagenet64_uvit_mid
    from libs.family import data_classes, family_of

    config = imagenet64_uvit_mid.get_config()
    family, k = family_of(config), data_classes(config)
    uniform = family.sample_labels(config, 3000)
    assert torch.equal(uniform, torch.randint(0, k, (3000,), generator=torch.Generator().manual_seed(config.seed)))
    config.metrics.labels = "balanced"
    balanced = family.sample_labels(config, 3000)
    assert torch.equal(torch.bincount(balanced, minlength=k), torch.full((k,), 3))
    assert torch.equal(balanced, family.sample_labels(config, 3000))  # deterministic
    assert not torch.equal(balanced[:k], torch.arange(k))  # shuffled, not 0, 1, 2, ...
    counts = torch.bincount(family.sample_labels(config, 2500), minlength=k)
    assert counts.max() - counts.min() == 1 and counts.sum() == 2500


def test_sample_file_joins_the_shards_in_index_order(tmp_path):
    n, world, path = 11, 3, str(tmp_path / "s.npz")
    pixels = np.random.default_rng(4).integers(0, 256, (n, 5, 4, 3), dtype=np.uint8)
    writers = [ShardedSampleWriter(path, n, r, world) for r in range(world)]
    for r, w in enumerate(writers):
        mine = np.arange(r, n, world)
        for part in np.array_split(mine, 2):
            w.write(pixels[part], torch.from_numpy(part))
        w.close()
    writers[0].join(labels=np.arange(n) % 4)
    with np.load(path) as f:
        assert np.array_equal(f["arr_0"], pixels) and np.array_equal(f["arr_1"], np.arange(n) % 4)
    assert np.array_equal(np.concatenate(list(read_rows(path, chunk=4))), pixels)
    assert not (tmp_path / "s.npz.parts").exists()


def test_metric_names_are_checked():
    assert parse_names("fid, sfid,fid") == ("fid", "sfid")
    with pytest.raises(ConfigError, match="unknown 'fd'"):
        parse_names("fid,fd")


def _independent(feats_ref, feats):
    """Every metric from numpy feature arrays with the reference packages / numpy formulas."""
    from prdc import compute_prdc
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.kid import poly_mmd

    def fd(a, b):
        return calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    pr = compute_prdc(real_features=feats_ref["pool"], fake_features=feats["pool"], nearest_k=3)
    n = len(feats["pool"])
    k = float(poly_mmd(torch.from_numpy(feats_ref["pool"][:n]), torch.from_numpy(feats["pool"])))
    return {"fid": fd(feats["pool"], feats_ref["pool"]), "sfid": fd(feats["spatial"], feats_ref["spatial"]),
            "fd_dinov2": fd(feats["dinov2"], feats_ref["dinov2"]), "precision": pr["precision"],
            "recall": pr["recall"], "kid": k}


def _features(nets, images):
    out = {}
    with torch.no_grad():
        for net in nets.values():
            out.update({k: v.double().numpy() for k, v in net(images).items()})
    return out


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_one_pass_scores_every_metric_and_writes_the_scored_images(accelerator, tmp_path):
    nets = {"inception": TinyInception(), "dinov2": TinyDINOv2()}
    n, n_ref = 40, 40  # KID over whole sets (one subset of all): independent of the subset draw
    ref_images = fid.quantize_like_png(images_of(range(1000, 1000 + n_ref)))
    ref = str(tmp_path / "ref.npz")  # an ADM-style reference batch: images only; statistics computed from them
    np.savez(ref, arr_0=ref_images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
             **{k: v for k, v in reference_file_arrays(reference_arrays(
                 [(torch.arange(n_ref), ref_images)], n_ref, ["fid"], nets)).items()})
    options = MetricOptions(names=ALL, kid_subsets=1, kid_subset_size=n, is_splits=4)
    npz = str(tmp_path / "samples.npz")
    labels = torch.arange(n) % 3
    result = evaluation.evaluate(accelerator, images_of, n, 7, ref, seed=0, metrics=options, networks=nets,
                                 npz_path=npz, labels=labels)
    scored = fid.quantize_like_png(images_of(range(n)))
    with np.load(npz) as f:  # exactly the scored images, in index order, with their labels
        assert np.array_equal(f["arr_0"], scored.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        assert np.array_equal(f["arr_1"], labels.numpy())
    expected = _independent(_features(nets, ref_images), _features(nets, scored))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert result["n"] == n and result["inception_score"] > 1

    from tools import evaluator  # the ADM evaluator's interface gives the same numbers from the two files
    again = evaluator.evaluate_files(ref, npz, options, batch_size=9, device="cpu", networks=nets)
    for key in expected:
        assert again[key] == pytest.approx(result[key], rel=1e-6, abs=1e-9), key  # other batches: float32 rounding
    # ADM's float16 precision/recall through the evaluator's option (the same numbers as ADM's formula).
    adm = evaluator.evaluate_files(ref, npz, dataclasses.replace(options, names=("prc",), prc_arithmetic="adm"),
                                   batch_size=9, device="cpu", networks=nets)
    feats_ref, feats = _features(nets, ref_images)["pool"], _features(nets, scored)["pool"]
    assert (adm["precision"], adm["recall"]) == _adm_precision_recall(feats_ref, feats)


def test_reference_without_the_needed_statistics_fails_before_sampling(accelerator, tmp_path):
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(MissingFileError, match="compute_fid_stats.py --metrics"):
        evaluation.evaluate(accelerator, lambda i: pytest.fail("sampled"), 4, 2, ref, seed=0,
                            metrics=MetricOptions(names=("fid", "sfid")), networks={"inception": TinyInception()})


def test_seeds_summary_and_sample_file_names():
    assert evaluation.parse_seeds("", 7) == [7] and evaluation.parse_seeds("1, 2,3", 7) == [1, 2, 3]
    assert [key for key, _ in MetricOptions.problems({"seeds": "1,1"})] == ["seeds"]  # a repeated seed
    assert evaluation.npz_path_for("a/s.npz", 2, 3) == "a/s_seed2.npz" and evaluation.npz_path_for("a.npz", 2, 1) == "a.npz"
    s = evaluation.summarize([{"seed": 0, "fid": 2.0, "n": 5}, {"seed": 1, "fid": 4.0, "n": 5}])
    assert s == {"fid": {"mean": 3.0, "std": pytest.approx(2 ** 0.5), "min": 2.0, "max": 4.0}}
    json.dumps(s)


def test_config_metrics_keys_are_validated(tmp_path):
    from configs import imagenet64_uvit_mid
    from libs.config_utils import parse_and_validate

    config = imagenet64_uvit_mid.get_config()
    parse_and_validate(config, world_size=1)  # the defaults are valid
    assert MetricOptions.from_config(config).prc_arithmetic == "float64"
    config.metrics.prc_arithmetic = "adm"
    parse_and_validate(config, world_size=1)
    assert MetricOptions.from_config(config).prc_arithmetic == "adm"
    config.metrics.update(names="fid,fdd", labels="even", seeds="1,x", npz=str(tmp_path / "s.tar"), resize="tf",
                          kid_subsets=0, prc_arithmetic="float16", reference=str(tmp_path / "absent.npz"))
    with pytest.raises(ConfigError) as e:
        parse_and_validate(config, world_size=1)
    for key in ("names", "labels", "seeds", "npz", "resize", "kid_subsets", "prc_arithmetic", "reference"):
        assert f"config.metrics.{key} =" in str(e.value), key


def test_an_adm_batch_of_images_alone_is_a_reference(tmp_path):
    from libs.metrics.sample_file import images_of_rows
    from libs.metrics.suite import load_reference

    nets = {"inception": TinyInception()}
    pixels = np.random.default_rng(5).integers(0, 256, (9, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=pixels)
    ref = load_reference(str(tmp_path / "ref.npz"), ("fid", "sfid", "prc"), nets, batch_size=4)
    feats = _features(nets, images_of_rows(pixels))
    assert np.allclose(ref["fid"][0], feats["pool"].mean(0)) and np.allclose(ref["fid"][1], np.cov(feats["pool"].T))
    assert np.allclose(ref["sfid"][1], np.cov(feats["spatial"].T)) and np.allclose(ref["pool"], feats["pool"])
