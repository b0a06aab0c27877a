"""The CPU own-data template (configs/own_data_cpu.py): what a user sets and what follows from it, and the line
a paper config trained on one's own folder logs about the paper hyperparameters it carries."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import libs.trainer as trainer
from configs.imagenet64_uvit_mid import get_config as paper_config
from configs.own_data_cpu import get_config
from libs.family import PIXELS_CONTINUOUS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("resolution,patch", [(8, 2), (14, 2), (16, 2), (28, 4), (32, 4), (64, 8)])
def test_the_network_follows_the_resolution(resolution, patch):
    config = get_config()
    config.dataset.resolution = resolution  # what --config.dataset.resolution=<r> does
    assert config.nnet.img_size == resolution and config.nnet.patch_size == patch
    assert (resolution // patch) ** 2 <= 64  # at most 8 x 8 tokens: the same cost at every size
    resolved = config.to_dict()
    assert resolved["nnet"]["img_size"] == resolved["dataset"]["resolution"] == resolution


def test_the_documented_command_checks_out_and_the_class_count_is_named(folder, tmp_path):
    base = [sys.executable, "train.py", "--config=configs/own_data_cpu.py", f"--config.dataset.path={folder}",
            "--config.dataset.resolution=14", "--dry_run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wrong = subprocess.run([*base, f"--workdir={tmp_path / 'a'}"], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=300)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1] == (
        "ConfigError: config.nnet.num_classes=11 but dataset 'image_folder' has 3 classes: set it to 4 (the "
        "classes plus the null label of guidance training)")
    right = subprocess.run([*base, "--config.nnet.num_classes=4", f"--workdir={tmp_path / 'b'}"], cwd=ROOT,
                           capture_output=True, text=True, env=env, timeout=300)
    assert right.returncode == 0, right.stderr[-2000:]
    assert "paper's ImageNet-scale values" not in right.stderr


def tiny(config, folder):
    config.dataset.update(name="image_folder", path=folder, resolution=8, cfg=True, p_uncond=0.1)
    config.nnet.update(img_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    config.train.update(n_steps=1, batch_size=4, log_interval=1, eval_interval=1000, save_interval=1000)
    config.fid.n_samples = 0
    config.sample.update(n_samples=2, sample_steps=1, mini_batch_size=2)
    return config


def test_a_paper_config_on_own_data_says_once_which_paper_values_it_carries(folder, tmp_path):
    trainer.train(tiny(paper_config(), folder), str(tmp_path / "paper"), PIXELS_CONTINUOUS)
    log = (tmp_path / "paper" / "train.log").read_text()
    assert log.count("this config trains your image folder with the paper's ImageNet-scale values of:") == 1
    assert "optimizer.betas=(0.99, 0.99) (beta1 0.99" in log and "lr_scheduler.warmup_steps=5000" in log
    assert "ema_rate=0.9999" in log and "start from configs/own_data_cpu.py" in log
    trainer.train(tiny(get_config(), folder), str(tmp_path / "own"), PIXELS_CONTINUOUS)
    assert "paper's ImageNet-scale values" not in (tmp_path / "own" / "train.log").read_text()
