"""eval.py end to end on a tiny model: 1 process vs 2 CPU processes over gloo.

Two processes for real: `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true (accelerate
1.x's `--cpu --num_processes 2` starts ONE process unless MPI is set up); the run's JSON record says how many
processes it had, and the test asserts it."""
import json
import importlib.util
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from libs.errors import CheckpointError
from libs.metrics import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SAMPLES = 3  # odd: the two ranks get 2 and 1 images

TINY_CONFIG = '''
import os
from configs.base import d, get_config as base_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    config = base_config()
    config.train.update(mode='uncond', batch_size=2)
    config.nnet = d(name='uvit', img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                    mlp_ratio=2, qkv_bias=False, mlp_time_embed=False, num_classes=-1)
    # The training images are absent: evaluation needs only the weights and the FID statistics.
    config.dataset.update(name='image_folder', path=os.path.join(HERE, 'no_training_images'), resolution=16)
    config.fid.stat = os.path.join(HERE, 'ref.npz')
    config.sample.update(sample_steps=3, n_samples=%d, mini_batch_size=2, algorithm='dpm_solver', cfg=False, scale=0)
    return config
''' % N_SAMPLES


def _load_config(path):
    spec = importlib.util.spec_from_file_location("tiny_eval_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalscript")
    rng = np.random.default_rng(0)
    np.savez(root / "ref.npz", mu=rng.standard_normal(2048), sigma=np.diag(rng.uniform(0.5, 2, 2048)))
    torch.save(inception.random_state_dict(seed=4), root / "inception.pth")
    (root / "tiny_config.py").write_text(TINY_CONFIG)
    from libs.nnet import build_nnet

    config = _load_config(str(root / "tiny_config.py"))
    torch.save(build_nnet(config.nnet).state_dict(), root / "nnet.pth")
    return root, config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(root, tag, launcher, env=()):
    """(n_samples, FID, images, file names, processes of the run's JSON record) of eval.py started by `launcher`."""
    log = root / f"{tag}.log"
    cmd = launcher + [os.path.join(ROOT, "eval.py"), f"--config={root / 'tiny_config.py'}",
                      f"--nnet_path={root / 'nnet.pth'}", f"--inception_weights={root / 'inception.pth'}",
                      f"--output_path={log}", f"--config.sample.path={root / tag}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **dict(env)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    final = log.read_text().strip().splitlines()[-1]
    m = re.search(r"n_samples=(\d+) FID=([\d.]+) IS=([\d.]+)", final)
    assert m, final
    assert "sampler=dpm_solver steps=3 scale=0" in final and "tiny_config.py" in final and "nnet.pth" in final
    images = np.stack([np.asarray(Image.open(root / tag / f"{i}.png")) for i in range(N_SAMPLES)]).astype(int)
    processes = json.loads((root / f"{tag}.log.json").read_text())["protocol"]["processes"]
    return int(m.group(1)), float(m.group(2)), images, sorted(os.listdir(root / tag)), processes


def test_two_processes_score_the_same_images_as_one(setup):
    root, _ = setup
    n1, fid1, images1, names1, world1 = _run(root, "one", [sys.executable])
    n2, fid2, images2, names2, world2 = _run(
        root, "two", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      "--main_process_port", str(_free_port())], env={"ACCELERATE_USE_CPU": "true"})
    assert (world1, world2) == (1, 2)
    expected_names = sorted(f"{i}.png" for i in range(N_SAMPLES))
    assert n1 == n2 == N_SAMPLES and names1 == names2 == expected_names
    # N distinct samples, and the same ones whatever the process count (up to one 8-bit level of rounding).
    assert len({im.tobytes() for im in images1}) == N_SAMPLES
    assert np.abs(images1 - images2).max() <= 1
    assert fid2 == pytest.approx(fid1, rel=1e-4)


def test_corrupt_or_mismatched_checkpoint_is_a_checkpoint_error(setup, tmp_path):
    from libs.evaluation import run_evaluation
    from libs.family import PIXELS_CONTINUOUS
    from libs.nnet import build_nnet

    root, config = setup
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        run_evaluation(config, str(bad), PIXELS_CONTINUOUS, inception_weights=str(root / "inception.pth"))
    other = config.nnet.to_dict()
    other["depth"] = 4
    torch.save(build_nnet(other).state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError):
        run_evaluation(config, str(tmp_path / "deeper.pth"), PIXELS_CONTINUOUS,
                       inception_weights=str(root / "inception.pth"))
