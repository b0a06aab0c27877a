"""eval.py with config.metrics: several seeds, the ADM sample file, the JSON record; 1 vs 2 processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from libs import fid
from tests.test_eval_scripts import ROOT, TINY_CONFIG, _free_port, _load_config
from libs.metrics import inception

METRICS = "fid,is,sfid,prc,kid"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmetrics")
    rng = np.random.default_rng(0)
    # An ADM-style reference batch: FID statistics plus images, from which sFID and the pool features are computed.
    np.savez(root / "ref.npz", mu=rng.standard_normal(2048), sigma=np.diag(rng.uniform(0.5, 2, 2048)),
             arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    torch.save(inception.random_state_dict(seed=4), root / "inception.pth")
    (root / "tiny_config.py").write_text(TINY_CONFIG.replace("n_samples=3", "n_samples=5"))
    from libs.nnet import build_nnet

    config = _load_config(str(root / "tiny_config.py"))
    torch.save(build_nnet(config.nnet).state_dict(), root / "nnet.pth")
    return root, config


def _args(root, tag):
    return [f"--config={root / 'tiny_config.py'}", f"--nnet_path={root / 'nnet.pth'}",
            f"--inception_weights={root / 'inception.pth'}", f"--config.metrics.names={METRICS}",
            "--config.metrics.seeds=1,2", f"--config.metrics.npz={root / tag / 'samples.npz'}",
            f"--config.metrics.json={root / tag / 'eval.json'}", f"--config.sample.path={root / tag / 'png'}"]


@pytest.mark.slow
def test_several_seeds_each_reported_with_their_samples(setup):
    from libs.evaluation import run_evaluation
    from libs.family import PIXELS_CONTINUOUS

    root, config = setup
    config = config.copy_and_resolve_references()
    config.metrics.update(names=METRICS, seeds="1,2", npz=str(root / "in" / "samples.npz"),
                          json=str(root / "in" / "eval.json"))
    out = run_evaluation(config, str(root / "nnet.pth"), PIXELS_CONTINUOUS,
                         inception_weights=str(root / "inception.pth"), config_path="tiny_config.py")
    record = json.loads((root / "in" / "eval.json").read_text())
    assert [r["seed"] for r in record["results"]] == [1, 2] and record["checkpoint"].endswith("nnet.pth")
    assert record["protocol"]["n_samples"] == 5 and record["protocol"]["seeds"] == [1, 2]
    for key in ("fid", "inception_score", "sfid", "precision", "recall", "kid"):
        values = [r[key] for r in record["results"]]
        assert record["summary"][key]["mean"] == pytest.approx(np.mean(values))
        assert record["summary"][key]["std"] == pytest.approx(np.std(values, ddof=1))
    a, b = (np.load(root / "in" / f"samples_seed{s}.npz")["arr_0"] for s in (1, 2))
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)  # seeds differ
    # The file holds the scored images: their FID against the reference is the one reported.
    net = inception.load_fid_inception(str(root / "inception.pth"))
    stats = fid.InceptionStatistics(splits=0)
    fid.accumulate(stats, net, torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255)
    ref_mu, ref_sigma = fid.load_statistics(str(root / "ref.npz"))
    assert fid.frechet_distance(*stats.mean_and_covariance(), ref_mu, ref_sigma) == pytest.approx(
        record["results"][1]["fid"], rel=1e-6)
    assert out["per_seed"][0]["fid"] == record["results"][0]["fid"]


@pytest.mark.slow
def test_two_processes_give_the_same_metrics_and_sample_file(setup):
    root, _ = setup
    # --multi_gpu with ACCELERATE_USE_CPU: two CPU processes over gloo (plain --cpu would start one process).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "true"}
    launch2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port())]
    records = {}
    for tag, launcher in (("one", [sys.executable]), ("two", launch2)):
        done = subprocess.run(launcher + [os.path.join(ROOT, "eval.py"), *_args(root, tag)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records[tag] = json.loads((root / tag / "eval.json").read_text())
    assert records["two"]["protocol"]["processes"] == 2
    for r1, r2 in zip(records["one"]["results"], records["two"]["results"]):
        for key in ("fid", "inception_score", "sfid", "precision", "recall", "kid"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
    for seed in (1, 2):
        one, two = (np.load(root / tag / f"samples_seed{seed}.npz")["arr_0"].astype(int) for tag in ("one", "two"))
        assert np.abs(one - two).max() <= 1  # the same images up to one 8-bit level of kernel rounding
    pngs = np.stack([np.asarray(Image.open(root / "two" / "png" / f"{i}.png")) for i in range(5)])
    assert np.array_equal(pngs, np.load(root / "two" / "samples_seed2.npz")["arr_0"])  # the PNGs of the last seed
