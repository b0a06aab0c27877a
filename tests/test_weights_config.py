"""Weights carry the objective and network they were trained with: a checkpoint (emergency ones included, even
moved away from its run), a post-hoc EMA reconstruction (its <stem>.config.json) and an export. The scripts read
that config when no --config is given and refuse, in one line naming both, a --config that contradicts it."""
import json
import os
import shutil

import pytest

import libs.trainer as trainer
import sample_class_cond
from configs.digits_uvit_tiny import get_config
from libs.errors import ConfigError, MissingFileError
from libs.export import config_of_weights, export_model, read_export_meta, saved_config, sidecar_path
from libs.family import PIXELS_CONTINUOUS
from tools import posthoc_ema as posthoc_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = ["--config.nnet.embed_dim=32", "--config.nnet.depth=2", "--config.nnet.num_heads=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny epsilon (vp/noise) digits run with post-hoc EMA snapshots: its workdir."""
    workdir = tmp_path_factory.mktemp("run")
    config = get_config()
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    config.train.update(n_steps=16, batch_size=8, log_interval=8, eval_interval=1000, save_interval=16)
    config.fid.n_samples = 0
    config.sample.update(n_samples=4, sample_steps=2, mini_batch_size=4)
    config.posthoc_ema.snapshot_interval = 2
    trainer.train(config, str(workdir), PIXELS_CONTINUOUS)
    return workdir


def _one_line(e):
    message = str(e.value)
    assert "\n" not in message
    return message


def _sample(tmp_path, nnet_path, *config):
    return sample_class_cond.main([*config, f"--nnet_path={nnet_path}", "--class_ids=0,1", "--n_per_class=1",
                                   "--steps=2", "--device=cpu", f"--output_dir={tmp_path / 'out'}"])


def test_a_posthoc_reconstruction_carries_its_objective(run, tmp_path):
    pth = posthoc_tool.main([f"--workdir={run}", "--sigma_rel=0.1", f"--output={tmp_path / 'ema.pth'}"])
    assert os.path.isfile(sidecar_path(pth)) and sidecar_path(pth).endswith("ema.config.json")
    saved = saved_config(pth)
    assert saved["objective"]["path"] == "vp" and saved["objective"]["prediction"] == "noise"
    assert saved["nnet"]["embed_dim"] == 32 and saved["step"] == 16

    # An export without a config is labelled with the run's objective ...
    folder = export_model(pth, tmp_path / "export", config_of_weights(pth, "checkpoint"))
    assert read_export_meta(folder)["objective"]["path"] == "vp"
    # ... and a contradicting config is refused in one line naming both objectives.
    flow = get_config()
    flow.objective.update(path="linear", prediction="velocity")
    with pytest.raises(ConfigError) as e:
        export_model(pth, tmp_path / "export2", flow)
    message = _one_line(e)
    assert f"'{pth}' was trained with objective vp/noise" in message and "this config says linear/velocity" in message
    assert not (tmp_path / "export2").exists()

    # The sampling script reads the config beside the .pth when --config is absent, and refuses another one.
    assert len(_sample(tmp_path, pth)) == 2
    with pytest.raises(ConfigError) as e:
        _sample(tmp_path, pth, f"--config={ROOT}/configs/digits_uvit_tiny_flow.py", *NET)
    assert "was trained with objective vp/noise" in _one_line(e) and "linear/velocity" in str(e.value)


def test_an_export_or_a_moved_checkpoint_needs_no_config_and_refuses_another_network(run, tmp_path):
    moved = tmp_path / "16.ckpt"  # an (emergency) checkpoint copied away from its run's config.json
    shutil.copytree(run / "ckpts" / "16.ckpt", moved)
    assert saved_config(str(moved))["nnet"]["embed_dim"] == 32
    folder = export_model(str(moved), tmp_path / "export", config_of_weights(str(moved)))
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["config"]["nnet"]["depth"] == 2  # the whole config

    for weights in (str(moved), folder):
        assert len(_sample(tmp_path, weights)) == 2
        with pytest.raises(ConfigError) as e:  # the demo's own network (width 96, depth 6): not these weights
            _sample(tmp_path, weights, f"--config={ROOT}/configs/digits_uvit_tiny.py")
        message = _one_line(e)
        assert "was trained with network nnet.embed_dim=32, nnet.depth=2" in message
        assert "this config says nnet.embed_dim=96, nnet.depth=6" in message


def test_weights_that_carry_no_config_need_one(tmp_path):
    bare = tmp_path / "released.pth"
    bare.write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        _sample(tmp_path, bare)
    assert _one_line(e) == (f"no --config given and --nnet_path '{bare}' carries no training config (a bare .pth): "
                            "pass the config it was trained with, --config=configs/<name>.py")
    with pytest.raises(MissingFileError) as e:  # said before any network is built
        _sample(tmp_path, tmp_path / "missing.pth", f"--config={ROOT}/configs/imagenet512_uvit_huge.py")
    assert _one_line(e).startswith(f"--nnet_path not found at '{tmp_path / 'missing.pth'}'")
