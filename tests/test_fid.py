"""FID math against closed forms, numpy/scipy and pytorch-fid; PNG quantisation; folder == in-process."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torchvision.utils import save_image

import pytorch_fid.fid_score as pf_score
import pytorch_fid.inception as pf_inception
from libs import fid
from libs.errors import ConfigError, InputError, MissingFileError
from libs.metrics import inception
from tools import fid_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fidw") / "random_inception.pth")
    torch.save(inception.random_state_dict(seed=2), path)
    return path


def _random_spd(d, rng, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.linspace(1.0, cond, d)) @ q.T


# -- Frechet distance ---------------------------------------------------------------------------

def test_frechet_distance_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # common eigenvectors: S1 and S2 commute
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)
    # Singular covariances (fewer images than dimensions): one side, then both.
    a[:2] = 0
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, (q * a) @ q.T, mu1, (q * b) @ q.T) == pytest.approx(expected, rel=1e-8)
    b[-2:] = 0  # rounding noise ~1e-16 in the null space enters as its square root, ~1e-8
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, (q * a) @ q.T, mu1, (q * b) @ q.T) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_one_dimensional():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9 + 1.5 ** 2)


def test_frechet_distance_general_equals_scipy_sqrtm_and_pytorch_fid():
    rng = np.random.default_rng(1)
    d = 40
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng, cond=50)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    root = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(pf_score.calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
    # Covariances of 10 samples in 40-d (rank 9) against each other and against a full-rank one.
    low1, low2 = np.cov(rng.standard_normal((10, d)), rowvar=False), np.cov(rng.standard_normal((12, d)), rowvar=False)
    for x, y in ((low1, s2), (s2, low1), (low1, low2)):
        expected = np.trace(x + y - 2 * linalg.sqrtm(x @ y).real)
        assert fid.frechet_distance(mu1, x, mu1, y) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_warns_on_a_covariance_that_is_not_psd(caplog):
    with caplog.at_level("WARNING", logger="libs.fid"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -0.5]), np.zeros(2), np.diag([-1.0, 2.0]))
    assert "negative eigenvalue" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="libs.fid"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, 0.0]))
    assert caplog.text == ""  # a singular (PSD) covariance is normal for few images


def test_frechet_distance_rejects_mismatched_or_nan():
    with pytest.raises(InputError, match="mismatched"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(InputError, match="NaN"):
        fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# -- streaming statistics and Inception Score -----------------------------------------------------

def test_streaming_statistics_equal_numpy_and_merge_across_processes():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((37, 16)) * 3 + 5
    a, b = fid.InceptionStatistics(dims=16, splits=0), fid.InceptionStatistics(dims=16, splits=0)
    for chunk in np.array_split(feats[:20], 3):
        a.update(torch.from_numpy(chunk))
    b.update(torch.from_numpy(feats[20:]))

    class TwoProcesses:  # accelerator.reduce as the sum over two ranks holding `a` and `b`
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, flat, reduction):
            assert reduction == "sum"
            return flat + torch.cat([t.reshape(-1) for t in b._tensors()])

    a.reduce(TwoProcesses())
    mu, sigma = a.mean_and_covariance()
    assert int(a.n) == 37
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


def _inception_score_reference(logits, splits):
    """Salimans et al. 2016, as their reference code (and torch-fidelity's): softmax, split k the rows
    [k N // splits, (k + 1) N // splits), exp(mean KL) per split."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p)
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_formula_and_closed_forms():
    rng = np.random.default_rng(3)
    n, k = 40, 1008
    logits = rng.standard_normal((n, k)) * 4
    stats = fid.InceptionStatistics(dims=4, splits=4, num_classes=k)
    for idx in np.array_split(np.arange(n), 3):  # batches that straddle the split boundaries
        stats.update(torch.zeros(len(idx), 4), torch.from_numpy(logits[idx]), fid.split_ids(idx, n, 4))
    mean, std = stats.inception_score()
    ref_mean, ref_std = _inception_score_reference(logits, 4)
    assert mean == pytest.approx(ref_mean, rel=1e-9) and std == pytest.approx(ref_std, rel=1e-6)
    # Confident predictions spread evenly over m classes give IS = m; identical predictions give 1.
    m = 8
    onehot = torch.full((m * 3, k), -1e4, dtype=torch.float64)
    onehot[torch.arange(m * 3), torch.arange(m * 3) % m] = 0
    s = fid.InceptionStatistics(dims=4, splits=1, num_classes=k)
    s.update(torch.zeros(m * 3, 4), onehot, torch.zeros(m * 3, dtype=torch.long))
    assert s.inception_score()[0] == pytest.approx(m, rel=1e-9)
    s = fid.InceptionStatistics(dims=4, splits=1, num_classes=k)
    s.update(torch.zeros(5, 4), torch.randn(1, k).repeat(5, 1), torch.zeros(5, dtype=torch.long))
    assert s.inception_score()[0] == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("n", [1005, 1000])
def test_inception_score_splits_are_salimans_slices(n):
    # N not a multiple of the splits: the slices [floor(k N / 10), floor((k + 1) N / 10)) give sizes
    # 100, 101, 100, ... for N = 1005 (another rounding, e.g. 101, 100, ..., moves IS by ~1e-4 relative).
    rng = np.random.default_rng(n)
    logits = rng.standard_normal((n, 50)) * 3
    stats = fid.InceptionStatistics(dims=4, splits=10, num_classes=50)
    for idx in np.array_split(np.arange(n), 7):
        stats.update(torch.zeros(len(idx), 4), torch.from_numpy(logits[idx]), fid.split_ids(idx, n, 10))
    ref_mean, ref_std = _inception_score_reference(logits, 10)
    mean, std = stats.inception_score()
    assert mean == pytest.approx(ref_mean, rel=1e-9) and std == pytest.approx(ref_std, rel=1e-6)


# -- PNG quantisation and folder statistics ---------------------------------------------------------

def test_quantize_like_png_equals_save_image_round_trip(tmp_path):
    x = torch.rand(2, 3, 8, 8)
    x[0, 0, 0, :6] = torch.tensor([0.0, 1.0, -0.3, 1.7, 0.5 / 255, 127.5 / 255])  # clamps and exact half steps
    q = fid.quantize_like_png(x)
    for i in range(2):
        save_image(x[i], tmp_path / f"{i}.png")
        back = torch.from_numpy(np.asarray(Image.open(tmp_path / f"{i}.png").convert("RGB")).copy())
        assert torch.equal(q[i], back.permute(2, 0, 1).float() / 255)


def test_quantize_rejects_nan():
    x = torch.rand(3, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"images \[1\]"):
        fid.quantize_like_png(x)


def test_in_process_statistics_equal_png_folder_statistics(tmp_path, weights_file):
    net = inception.load_fid_inception(weights_file)
    x = torch.rand(2, 3, 16, 16)
    in_process = fid.InceptionStatistics(splits=0)
    fid.accumulate(in_process, net, fid.quantize_like_png(x))
    for i in range(2):
        save_image(x[i], tmp_path / f"{i:03d}.png")
    from_folder = fid.dataset_statistics(fid.ImageFolder(str(tmp_path)), net, batch_size=50, splits=0)
    for a, b in zip(in_process.mean_and_covariance(), from_folder.mean_and_covariance()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def _two_folders(tmp_path, n=4):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i in range(n):
        save_image(torch.rand(3, 24, 24), a / f"{i}.png")
        save_image(torch.rand(3, 24, 24) ** 3, b / f"{i}.png")
    return str(a), str(b)


def test_reference_statistics_of_folder_and_config_equal_pytorch_fid(tmp_path, weights_file, monkeypatch):
    """tools/compute_fid_stats.py on a folder equals pytorch-fid's statistics; on a dataset config of the
    same images (their training set read as [-1, 1] tensors) it equals the folder's."""
    from configs.base import get_config
    from tools import compute_fid_stats

    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights_file))
    a, _ = _two_folders(tmp_path, n=2)
    mu_ref, sigma_ref = pf_score.compute_statistics_of_path(a, pf_inception.InceptionV3([3]), 50, 2048, "cpu", 0)

    compute_fid_stats.compute(str(tmp_path / "folder.npz"), path=a, weights_path=weights_file)
    config = get_config()
    config.dataset.update(name="image_folder", path=a, resolution=24, random_flip=True)
    compute_fid_stats.compute(str(tmp_path / "config.npz"), config=config, weights_path=weights_file)
    with np.load(tmp_path / "folder.npz") as f, np.load(tmp_path / "config.npz") as g:
        assert int(f["n"]) == int(g["n"]) == 2 and "image folder" in str(f["source"])
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
        np.testing.assert_allclose(f["mu"], mu_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f["sigma"], sigma_ref, rtol=1e-3, atol=1e-5 * np.abs(sigma_ref).max())
        np.testing.assert_allclose(g["mu"], f["mu"], rtol=1e-5, atol=1e-6)  # flips were turned off
        np.testing.assert_allclose(g["sigma"], f["sigma"], rtol=1e-4, atol=1e-6 * np.abs(sigma_ref).max())


@pytest.mark.slow  # scipy's sqrtm of a 2048 x 2048 matrix inside pytorch-fid takes minutes on 2 cores
def test_fid_of_folders_equals_pytorch_fid(tmp_path, weights_file, monkeypatch):
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights_file))
    a, b = _two_folders(tmp_path)
    expected = pf_score.calculate_fid_given_paths([a, b], batch_size=50, device="cpu", dims=2048, num_workers=0)
    got = fid_score.calculate_fid_given_paths([a, b], weights_path=weights_file, device="cpu", num_workers=0)
    assert got > 0
    assert got == pytest.approx(expected, rel=1e-4)

    # The same comparison with one side stored as statistics.
    stats = tmp_path / "a.npz"
    m, s = pf_score.compute_statistics_of_path(a, pf_inception.InceptionV3([3]), 50, 2048, "cpu", 0)
    np.savez(stats, mu=m, sigma=s)
    got_npz = fid_score.calculate_fid_given_paths([str(stats), b], weights_path=weights_file, num_workers=0)
    assert got_npz == pytest.approx(expected, rel=1e-4)


def test_cli_compares_two_npz_files_without_weights(tmp_path):
    rng = np.random.default_rng(4)
    s1, s2 = _random_spd(5, rng), _random_spd(5, rng)
    np.savez(tmp_path / "1.npz", mu=np.zeros(5), sigma=s1)
    np.savez(tmp_path / "2.npz", mu=np.ones(5), sigma=s2)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fid_score.py"), str(tmp_path / "1.npz"),
                          str(tmp_path / "2.npz"), f"--weights={tmp_path / 'absent.pth'}"],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    value = float(out.stdout.split("FID:")[1])
    assert value == pytest.approx(fid.frechet_distance(np.zeros(5), s1, np.ones(5), s2), abs=1e-6)


def test_cli_flags_are_absl_with_underscores(tmp_path):
    rng = np.random.default_rng(5)
    s1, s2 = _random_spd(4, rng), _random_spd(4, rng)
    np.savez(tmp_path / "1.npz", mu=np.zeros(4), sigma=s1)
    np.savez(tmp_path / "2.npz", mu=np.full(4, 2.0), sigma=s2)
    paths = [str(tmp_path / "1.npz"), str(tmp_path / "2.npz")]
    got = fid_score.main([*paths, "--batch_size=8", "--num_workers=0", "--device=cpu"])
    assert got == pytest.approx(fid.frechet_distance(np.zeros(4), s1, np.full(4, 2.0), s2), abs=1e-9)
    with pytest.raises(ConfigError, match="batch-size"):  # the old argparse spelling
        fid_score.main([*paths, "--batch-size=8"])
    with pytest.raises(ConfigError, match="expected 2 .path_1, path_2"):
        fid_score.main(paths[:1])
    with pytest.raises(ConfigError, match="dims"):
        fid_score.main([*paths, "--dims=100"])


def test_cli_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        fid_score.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(fid_score.__doc__) and "--batch_size" in out and "--num_workers" in out
    assert "--undefok" not in out  # absl's own flags are not the tool's


def test_missing_paths_and_bad_statistics(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        fid_score.calculate_fid_given_paths([str(tmp_path / "x"), str(tmp_path / "y")])
    with pytest.raises(MissingFileError, match="compute_fid_stats"):
        fid.load_statistics(str(tmp_path / "absent.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        fid.load_statistics(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="expected"):  # a user's file: one line, not a traceback
        fid.load_statistics(str(tmp_path / "shape.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="no images"):
        fid.ImageFolder(str(tmp_path / "empty"))


@pytest.mark.cuda
def test_statistics_on_cuda_equal_cpu(weights_file):
    net = inception.load_fid_inception(weights_file)
    x = fid.quantize_like_png(torch.rand(2, 3, 32, 32))
    cpu, gpu = fid.InceptionStatistics(splits=0), fid.InceptionStatistics(splits=0, device="cuda")
    fid.accumulate(cpu, net, x)
    fid.accumulate(gpu, net.to("cuda"), x.cuda())
    for a, b in zip(cpu.mean_and_covariance(), gpu.mean_and_covariance()):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3 * np.abs(a).max())  # cuDNN may use TF32
