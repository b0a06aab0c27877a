"""The offline sample score (not FID) of the digits demo and of an own image folder: in the periodic and final
evaluations of training and in eval.py, with nothing downloaded."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import libs.trainer as trainer
from configs.digits_uvit_tiny import get_config
from libs.datasets import get_dataset
from libs.evaluation import run_evaluation
from libs.family import PIXELS_CONTINUOUS

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = 3  # classes of the test folder: bright top rows, bright left columns, bright diagonal


def pattern(c, rng):
    """A 12 x 12 grey uint8 image of class c with noise: the classes are told apart by where the bright pixels
    are, so a linear classifier reads them perfectly."""
    img = rng.integers(0, 60, (12, 12))
    if c == 0:
        img[:4] += 180
    elif c == 1:
        img[:, :4] += 180
    else:
        img[np.arange(12), np.arange(12)] += 180
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for c in range(PATTERNS):
        (root / f"class{c}").mkdir()
        for i in range(40):
            Image.fromarray(pattern(c, rng)).convert("RGB").save(root / f"class{c}" / f"{i}.png")
    return str(root)


def test_the_folder_score_reads_real_images_as_their_class_and_noise_as_far(folder):
    data = get_dataset("image_folder", path=folder, resolution=12)
    rng = np.random.default_rng(1)  # new images of each class, not the folder's
    labels = torch.arange(PATTERNS).repeat_interleave(30)
    real = torch.stack([torch.from_numpy(pattern(int(c), rng)).float().div(255).expand(3, -1, -1) for c in labels])
    score = data.sample_metric(real, labels)
    assert score["folder_accuracy"] == 1.0 and score["pixel_fd"] < 0.3
    wrong = data.sample_metric(real, (labels + 1) % PATTERNS)  # the asked class is never the one drawn
    assert wrong["folder_accuracy"] == 0.0
    noise = data.sample_metric(torch.rand(90, 3, 12, 12), labels)
    assert noise["pixel_fd"] > 10 * max(score["pixel_fd"], 0.05)
    # The Frechet distance of the 8 x 8 grey thumbnails, written out (Gaussians of the two sets, FID's formula).
    from scipy import linalg
    real_ref = data._reference_images()[0]
    def stats(x):
        f = torch.nn.functional.adaptive_avg_pool2d(x.double().mean(1, keepdim=True), 8).flatten(1).numpy()
        return f.mean(0), np.cov(f, rowvar=False)
    (m1, s1), (m2, s2) = stats(real), stats(real_ref)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert score["pixel_fd"] == pytest.approx(expected, rel=1e-4, abs=1e-6)



def test_a_folder_too_small_for_a_classifier_is_scored_by_pixel_fd_alone(tmp_path):
    """One image per class cannot both fit and test a classifier: the score leaves folder_accuracy out (logged)
    instead of ending the run at its evaluation."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        Image.fromarray(pattern(c, rng)).convert("RGB").save(tmp_path / f"class{c}" / "0.png")
    data = get_dataset("image_folder", path=str(tmp_path), resolution=12)
    score = data.sample_metric(torch.rand(4, 3, 12, 12), torch.tensor([0, 1, 0, 1]))
    assert set(score) == {"pixel_fd"} and score["pixel_fd"] > 0

def tiny_digits():
    config = get_config()
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    config.train.update(n_steps=8, batch_size=8, log_interval=8, eval_interval=1000, save_interval=8)
    config.fid.update(n_samples=20, steps=2)
    config.sample.update(n_samples=30, sample_steps=3, mini_batch_size=15)
    return config


def test_eval_scores_the_digits_demo_checkpoint_offline_as_training_did(tmp_path):
    trainer.train(tiny_digits(), str(tmp_path), PIXELS_CONTINUOUS)
    final = json.loads((tmp_path / "final_eval.json").read_text())
    # No --config (the checkpoint carries it), no FID statistics: the digits' own score, as training's final one.
    result = run_evaluation(None, str(tmp_path / "ckpts" / "8.ckpt"), PIXELS_CONTINUOUS)
    assert result["n"] == 30 and "fid" not in result
    assert result["digit_accuracy"] == final["digit_accuracy"] and result["pixel_fd"] == final["pixel_fd"]
    assert result["record"]["protocol"]["metrics"] == ["pixel_fd", "digit_accuracy"]


def test_an_own_folder_run_is_scored_in_training_and_by_eval(folder, tmp_path):
    config = tiny_digits()
    config.dataset.update(name="image_folder", path=folder, resolution=8)
    config.nnet.update(in_chans=3, num_classes=PATTERNS + 1)
    trainer.train(config, str(tmp_path), PIXELS_CONTINUOUS)
    score = json.loads((tmp_path / "score.json").read_text())["score"]["8"]
    assert set(score) == {"folder_accuracy", "pixel_fd"} and 0 <= score["folder_accuracy"] <= 1
    log = (tmp_path / "train.log").read_text()
    assert "held-out ones at 1.000 (the ceiling of folder_accuracy; chance 0.333). Not FID." in log
    result = run_evaluation(None, str(tmp_path / "ckpts" / "8.ckpt"), PIXELS_CONTINUOUS)
    final = json.loads((tmp_path / "final_eval.json").read_text())
    assert result["folder_accuracy"] == final["folder_accuracy"] and result["pixel_fd"] == final["pixel_fd"]


@pytest.mark.slow  # an eval.py process: ~20 s on 2 quiet cores
def test_eval_py_needs_no_config_for_a_checkpoint(tmp_path):
    import subprocess
    import sys

    trainer.train(tiny_digits(), str(tmp_path), PIXELS_CONTINUOUS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "eval.py", f"--nnet_path={tmp_path / 'ckpts' / '8.ckpt'}"], cwd=root,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((tmp_path / "final_eval.json").read_text())
    assert f"digit_accuracy {final['digit_accuracy']:.4f}" in out.stderr.splitlines()[-1]
