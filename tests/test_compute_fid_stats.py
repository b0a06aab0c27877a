"""tools/compute_fid_stats.py --path on the README's own-data layout (one subfolder per class): the statistics
equal those of the same images in one flat folder (read by fid.ImageFolder, pytorch-fid's way)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from libs.errors import MissingFileError
from libs.metrics import inception
from tools import compute_fid_stats


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fidw") / "random_inception.pth")
    torch.save(inception.random_state_dict(seed=2), path)
    return path


def _layouts(tmp_path):
    """The same four images as class subfolders (deeper folders, a hidden one) and as one flat folder."""
    rng = np.random.default_rng(0)
    classes, flat = tmp_path / "pets", tmp_path / "flat"
    flat.mkdir()
    for c in ("cat", "dog"):
        (classes / c / "more").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(classes / c / "more" / f"{i}.png")
            shutil.copy(classes / c / "more" / f"{i}.png", flat / f"{c}{i}.png")
    (classes / ".hidden").mkdir()  # skipped, as image_folder skips it
    shutil.copy(flat / "cat0.png", classes / ".hidden" / "x.png")
    return classes, flat


def test_class_subfolders_are_read_as_their_images(tmp_path):
    from libs import fid
    classes, flat = _layouts(tmp_path)
    nested, plain = compute_fid_stats.NestedImageFolder(str(classes)), fid.ImageFolder(str(flat))
    assert len(nested) == len(plain) == 4
    for i in range(4):  # cat/more/0.png ... dog/more/1.png and cat0.png ... dog1.png: the same order
        assert torch.equal(nested[i], plain[i])


@pytest.mark.slow  # four Inception forwards at 299 x 299 on the CPU: ~40 s on 2 shared cores
def test_class_subfolders_give_the_statistics_of_their_images(tmp_path, weights_file):
    classes, flat = _layouts(tmp_path)
    a = compute_fid_stats.compute(str(tmp_path / "a.npz"), path=str(classes), weights_path=weights_file)
    b = compute_fid_stats.compute(str(tmp_path / "b.npz"), path=str(flat), weights_path=weights_file)
    with np.load(tmp_path / "a.npz") as f, np.load(tmp_path / "b.npz") as g:
        assert int(f["n"]) == int(g["n"]) == 4
        np.testing.assert_allclose(f["mu"], g["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["sigma"], g["sigma"], rtol=1e-4, atol=1e-6 * np.abs(g["sigma"]).max())
    assert a is not None and b is not None


def test_a_folder_without_images_names_itself(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(MissingFileError, match="or its subfolders"):
        compute_fid_stats.NestedImageFolder(str(tmp_path / "empty"))
    assert os.path.isdir(tmp_path / "empty")


def test_the_script_ends_a_missing_folder_in_one_line(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "compute_fid_stats.py")
    done = subprocess.run([sys.executable, script, f"--path={tmp_path / 'nope'}", f"--output={tmp_path / 'x.npz'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"MissingFileError: image folder '{tmp_path / 'nope'}' does not "
                                                f"exist (or is not a folder)"]
    assert not os.path.exists(tmp_path / "x.npz")
