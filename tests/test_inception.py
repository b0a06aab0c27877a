"""The FID Inception network against pytorch-fid's (same random weights file, same images)."""
import os
import urllib.error

import pytest
import torch

import pytorch_fid.inception as pf_inception
from libs.errors import CheckpointError, InputError, MissingFileError
from libs.metrics import inception


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fidw") / "random_inception.pth")
    torch.save(inception.random_state_dict(seed=1), path)
    return path


@pytest.fixture
def pytorch_fid_net(weights_file, monkeypatch):
    """pytorch-fid's InceptionV3 reading our file instead of downloading (it loads strictly)."""
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights_file))
    return pf_inception.InceptionV3([0, 1, 2, 3]).eval()


def test_random_weights_have_pytorch_fid_layout(weights_file, monkeypatch):
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights_file))
    reference = pf_inception.fid_inception_v3()  # load_state_dict(strict=True) inside
    ours = inception.load_fid_inception(weights_file)
    assert set(reference.state_dict()) == set(ours.state_dict())
    for k, v in reference.state_dict().items():
        assert v.shape == ours.state_dict()[k].shape, k


def test_features_equal_pytorch_fid(weights_file, pytorch_fid_net):
    x = torch.rand(2, 3, 40, 24)
    ours = inception.load_fid_inception(weights_file)
    with torch.no_grad():
        ref = pytorch_fid_net(x)  # blocks 0..3 (64, 192, 768, 2048 channels), unpooled except pool3
        for dims, r in zip(inception.FEATURE_DIMS, ref):
            got = ours(x, dims=dims)
            want = r.mean((2, 3))
            assert got.shape == (2, dims)
            assert want.abs().mean() > 1e-3  # the random weights keep the activations alive
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_logits_are_the_unbiased_tf_softmax_layer(weights_file, monkeypatch):
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights_file))
    reference = pf_inception.fid_inception_v3().eval()  # torchvision Inception3 with the 1008-way fc
    ours = inception.load_fid_inception(weights_file)
    x = torch.rand(1, 3, 299, 299)
    with torch.no_grad():
        features, logits = ours(x, with_logits=True)  # [0, 1] input
        ref_biased = reference(2 * x - 1)  # torchvision's forward: pool3 -> dropout(eval) -> fc, input in [-1, 1]
    assert logits.shape == (1, inception.NUM_TF_CLASSES)
    torch.testing.assert_close(logits + reference.fc.bias, ref_biased, rtol=1e-4, atol=1e-4)


def test_missing_default_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    calls = []

    def offline(*a, **k):
        calls.append(a)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    with pytest.raises(MissingFileError) as e:
        inception.load_fid_inception()
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "checkpoints", inception.WEIGHTS_FILENAME) in msg
    assert inception.WEIGHTS_URL in msg
    assert len(calls) == 1  # one download attempt, then the error
    assert os.listdir(os.path.join(str(tmp_path), "checkpoints")) == []  # nothing half-written left


def test_explicit_missing_path_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(inception.urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(MissingFileError, match="not found at"):
        inception.load_fid_inception(str(tmp_path / "nope.pth"))


def test_corrupt_or_foreign_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        inception.load_fid_inception(str(bad))
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not the FID Inception weights"):
        inception.load_fid_inception(str(other))


def test_bad_input_shape(weights_file):
    net = inception.load_fid_inception(weights_file)
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(2, 1, 32, 32))
