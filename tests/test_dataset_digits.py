"""The 'digits' dataset and the CPU demo's digits score (libs/digits_metrics.py)."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from libs.datasets import get_dataset
from libs.digits_metrics import digits_score, frechet_distance, gaussian_stats
from libs.errors import ConfigError, InputError


@pytest.fixture(scope='module')
def sk():
    return load_digits()


@pytest.fixture(scope='module')
def data():
    return get_dataset('digits')


def _all(data):
    items = [data.train[i] for i in range(len(data.train))]
    return torch.stack([it['x'] for it in items]), torch.stack([it['y'] for it in items])


def test_digits_match_sklearn_arrays(data, sk):
    x, y = _all(data)
    assert data.data_shape == (1, 8, 8) and data.kind == 'pixels'
    assert data.num_classes == 10
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    # Linear map 0 -> -1, 16 -> 1 of scikit-learn's own arrays.
    np.testing.assert_allclose(x[:, 0].numpy(), sk.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), sk.target)
    assert x.min() == -1.0 and x.max() == 1.0


def test_digits_are_never_flipped(data, sk):
    torch.manual_seed(3)
    for i in range(50):
        np.testing.assert_allclose(data.train[i]['x'][0].numpy(), sk.images[i] / 8.0 - 1.0, atol=1e-6)


def test_digits_upsampled_nearest_blocks(sk):
    d = get_dataset('digits', resolution=16)
    assert d.data_shape == (1, 16, 16)
    x = d.train[7]['x'][0].numpy()
    expected = np.kron(sk.images[7] / 8.0 - 1.0, np.ones((2, 2)))  # each pixel -> 2x2 block
    np.testing.assert_allclose(x, expected, atol=1e-6)
    b = get_dataset('digits', resolution=16, interpolation='bilinear').train[7]['x']
    assert b.shape == (1, 16, 16) and b.min() >= -1 and b.max() <= 1
    assert not torch.allclose(b[0], torch.from_numpy(expected).float())


@pytest.mark.parametrize('kwargs', [{'resolution': 12}, {'resolution': 4}, {'resolution': '16'},
                                    {'interpolation': 'cubic'}, {'resolutoin': 16}])
def test_digits_bad_config(kwargs):
    with pytest.raises(ConfigError):
        get_dataset('digits', **kwargs)


# ---- the Frechet distance against independent computations ----

def _random_psd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_distance_closed_form_diagonal_and_singular():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a = np.array([1.0, 4.0, 0.0, 9.0])
    b = np.array([4.0, 1.0, 0.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Same Gaussian -> 0, even with a rank-deficient covariance. The zero eigenvalues carry
    # rounding noise ~1e-16 whose square roots are ~1e-8, hence the tolerance.
    s = _random_psd(np.random.default_rng(1), 8, rank=3)
    assert abs(frechet_distance(np.ones(8), s, np.ones(8), s)) < 1e-6


def test_frechet_distance_shape_mismatch():
    with pytest.raises(InputError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---- the digits score separates real digits from noise and from wrong labels ----

def test_digits_classifier_generalises(sk):
    # Justifies trusting the metric's classifier (trained on all digits): the same model
    # trained on one half recognises the other half's real digits > 95% of the time.
    from sklearn.svm import SVC
    half = len(sk.target) // 2
    clf = SVC(gamma=0.001).fit(sk.data[:half], sk.target[:half])
    assert (clf.predict(sk.data[half:]) == sk.target[half:]).mean() > 0.95


def test_digits_score_separates_real_noise_and_shuffled(data, sk):
    x, y = _all(data)
    real = (x + 1) / 2
    total_var = np.trace(gaussian_stats(sk.data / 16.0)[1])  # the real digits' spread (about 4.7)

    full = data.sample_metric(real, y)
    # Identical sets: same Gaussian, FD 0 up to rounding; the classifier saw these digits.
    assert full['pixel_fd'] < 1e-6
    assert full['digit_accuracy'] > 0.98

    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(1797, generator=gen)[:500]
    subset = data.sample_metric(real[idx], y[idx])
    # 500 real digits: only the sampling error of mean and covariance (~0.05, about 1% of the
    # total variance; the bound leaves a factor ~10).
    assert subset['pixel_fd'] < 0.1 * total_var
    assert subset['digit_accuracy'] > 0.95

    noise = data.sample_metric(torch.rand(500, 1, 8, 8, generator=gen), y[idx])
    # Uniform noise: chance accuracy (10 classes -> 0.1; 0.3 leaves room for a classifier that
    # maps all noise to one class, which then scores that class's frequency, ~0.1) and an FD
    # larger than the whole spread of the real digits (measured ~9.9, twice the bound).
    assert noise['digit_accuracy'] < 0.3
    assert noise['pixel_fd'] > total_var

    shuffled = data.sample_metric(real[idx], y[torch.randperm(1797, generator=gen)[:500]])
    # Right images, wrong labels: accuracy ~ sum_k p_k^2 ~ 0.1 (binomial std 0.013 at n=500).
    assert shuffled['digit_accuracy'] < 0.2
    assert shuffled['pixel_fd'] < 0.1 * total_var
    assert noise['pixel_fd'] > 10 * subset['pixel_fd']


def test_digits_score_accepts_upsampled_rgb_and_no_labels(data, sk):
    x, y = _all(data)
    real = ((x + 1) / 2)[:300]
    base = digits_score(real, y[:300])
    up_rgb = F.interpolate(real, scale_factor=2, mode='nearest').repeat(1, 3, 1, 1)
    other = digits_score(up_rgb, y[:300].numpy())
    assert other['digit_accuracy'] == base['digit_accuracy']
    assert other['pixel_fd'] == pytest.approx(base['pixel_fd'], rel=1e-9, abs=1e-12)
    assert set(digits_score(real)) == {'pixel_fd'}


@pytest.mark.parametrize('images,labels', [
    (torch.rand(10, 1, 8, 8) * 2 - 1, None),   # [-1, 1] instead of [0, 1]
    (torch.rand(10, 8, 8), None),              # missing channel axis
    (torch.rand(10, 2, 8, 8), None),           # neither grey nor RGB
    (torch.rand(1, 1, 8, 8), None),            # one image has no covariance
    (torch.rand(10, 1, 8, 8), torch.zeros(9)),  # label count mismatch
])
def test_digits_score_rejects_bad_input(images, labels):
    with pytest.raises(InputError):
        digits_score(images, labels)
