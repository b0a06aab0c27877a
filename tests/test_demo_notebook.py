"""UViT_demo.ipynb runs end to end (nbclient) on a tiny random model, so the demo cannot rot."""
import os

import numpy as np
import pytest
import torch

from tests.test_sample_scripts import CLASS_CONFIG, T2I_CONFIG, load_config
from benchmarks.tiny_models import write_tiny_autoencoder, write_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


def run_notebook(tmp_path, monkeypatch, kind):
    from libs.nnet import build_nnet

    ae = write_tiny_autoencoder(str(tmp_path / "ae.pth"))
    (tmp_path / "config.py").write_text((CLASS_CONFIG if kind == "class" else T2I_CONFIG).format(ae=ae))
    torch.manual_seed(0)
    torch.save(build_nnet(load_config(str(tmp_path / "config.py")).nnet).state_dict(), tmp_path / "nnet.pth")
    env = {"UVIT_DEMO_ROOT": ROOT, "UVIT_DEMO_CONFIG": str(tmp_path / "config.py"),
           "UVIT_DEMO_NNET": str(tmp_path / "nnet.pth"), "UVIT_DEMO_STEPS": "2", "UVIT_DEMO_N_PER_ROW": "2",
           "UVIT_DEMO_DEVICE": "cpu", "UVIT_DEMO_OUTPUT": str(tmp_path / "grid.png"),
           "UVIT_DEMO_CLASS_IDS": "0,2",
           "UVIT_DEMO_PROMPTS": "the cat|a dog|the dog"}
    if kind == "text":
        env["UVIT_DEMO_CLIP"] = write_tiny_clip(str(tmp_path / "clip"), hidden_size=32)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(ROOT, "UViT_demo.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    return nb


def outputs_of(nb):
    text, images = [], 0
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                raise AssertionError(f"{o['ename']}: {o['evalue']}")
            text.append(o.get("text", ""))
            images += "image/png" in o.get("data", {})
    return "".join(text), images


@pytest.mark.parametrize("kind", ["class", pytest.param("text", marks=pytest.mark.slow)])
def test_demo_notebook_runs_and_shows_the_grid(tmp_path, monkeypatch, kind):
    from PIL import Image

    nb = run_notebook(tmp_path, monkeypatch, kind)
    text, images = outputs_of(nb)
    assert images == 1  # the grid is displayed
    rows = 2 if kind == "class" else 3
    assert f"{rows * 2} images (3, 16, 16)" in text
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (rows * 16 + (rows + 1) * 2, 2 * 16 + 3 * 2, 3)
    assert grid.std() > 0  # not a blank image
