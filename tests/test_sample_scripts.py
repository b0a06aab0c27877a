"""sample_t2i_discrete.py and sample_class_cond.py on tiny random networks, autoencoder and CLIP."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample_class_cond
import sample_t2i_discrete
from libs.errors import ConfigError, MissingFileError
from benchmarks.tiny_models import write_tiny_autoencoder, write_tiny_clip

T2I_CONFIG = """
from configs.mscoco_uvit_small import get_config as paper_config


def get_config():
    config = paper_config()
    config.z_shape = (4, 2, 2)
    config.autoencoder.pretrained_path = {ae!r}
    config.nnet.update(img_size=2, patch_size=1, embed_dim=32, depth=2, num_heads=2, clip_dim=32)
    return config
"""

CLASS_CONFIG = """
from configs.imagenet256_uvit_large import get_config as paper_config


def get_config():
    config = paper_config()
    config.z_shape = (4, 2, 2)
    config.autoencoder.pretrained_path = {ae!r}
    config.nnet.update(img_size=2, patch_size=1, embed_dim=32, depth=2, num_heads=2, num_classes=4,
                       use_checkpoint=False)
    return config
"""


def load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.get_config()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from libs.nnet import build_nnet

    tmp = tmp_path_factory.mktemp("sample")
    ae = write_tiny_autoencoder(str(tmp / "ae.pth"))
    clip = write_tiny_clip(str(tmp / "clip"), hidden_size=32)
    out = {"tmp": tmp, "ae": ae, "clip": clip}
    for name, text in (("t2i", T2I_CONFIG), ("cls", CLASS_CONFIG)):
        (tmp / f"{name}_config.py").write_text(text.format(ae=ae))
        torch.manual_seed(1)
        nnet = build_nnet(load_config(str(tmp / f"{name}_config.py")).nnet)
        torch.save(nnet.state_dict(), tmp / f"{name}_nnet.pth")
        out[name] = (str(tmp / f"{name}_config.py"), str(tmp / f"{name}_nnet.pth"))
    return out


def t2i_args(tiny, out, *extra):
    config, nnet = tiny["t2i"]
    return [f"--config={config}", f"--nnet_path={nnet}", f"--clip={tiny['clip']}", "--steps=3", "--device=cpu",
            f"--output_dir={out}", *extra]


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_t2i_two_prompts_write_images_grid_and_prompt_list(tiny):
    out = tiny["tmp"] / "t2i"
    paths = sample_t2i_discrete.main(t2i_args(tiny, out, "the cat", "a dog on the grass"))
    assert [os.path.basename(p) for p in paths] == ["000_00.png", "001_00.png"]
    for p in paths:
        assert read_png(p).shape == (16, 16, 3)
    grid = read_png(out / "grid.png")
    # torchvision make_grid, padding 2; libs.sample_grid enlarges images under 32 px by pixel repetition (16 -> 32)
    assert grid.shape == (32 + 4, 2 * 32 + 6, 3)
    assert json.loads((out / "prompts.json").read_text()) == {"000_00": "the cat", "001_00": "a dog on the grass"}
    assert not np.array_equal(read_png(paths[0]), read_png(paths[1]))


def test_t2i_matches_manual_pipeline_with_config_scale_factor(tiny):
    """The script's image equals: CLIP contexts -> DPM-Solver with guidance -> decode with the config's 0.23010."""
    from libs.autoencoder import get_model
    from libs.clip import FrozenCLIPEmbedder
    from libs.sampling import per_index_noise
    from libs.nnet import build_nnet, load_nnet_state_dict
    from libs.sampling import sample
    from sde import build_diffusion

    out = tiny["tmp"] / "manual"
    seed = 7
    (path,) = sample_t2i_discrete.main(t2i_args(tiny, out, "the dog", f"--seed={seed}", "--scale=1.0"))
    config_path, nnet_path = tiny["t2i"]
    config = load_config(config_path)
    assert config.autoencoder.scale_factor == 0.23010
    nnet = build_nnet(config.nnet)
    load_nnet_state_dict(nnet, torch.load(nnet_path))
    nnet.eval()
    clip = FrozenCLIPEmbedder(tiny["clip"])
    c, u = clip(["the dog"]), clip([""])
    with torch.no_grad():
        z = sample(nnet, build_diffusion("discrete"), per_index_noise([0], seed, (4, 2, 2)), algorithm="dpm_solver",
                   steps=3, cond={"context": c}, uncond={"context": u}, scale=1.0)
        images = {}
        for sf in (0.23010, 0.18215):
            x = get_model(tiny["ae"], scale_factor=sf).decode(z)
            images[sf] = ((x + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    got = read_png(path)
    assert np.abs(got.astype(int) - images[0.23010].numpy().astype(int)).max() <= 1
    assert not np.array_equal(images[0.23010].numpy(), images[0.18215].numpy())


def test_t2i_reproducible_across_batch_sizes_and_prompt_file(tiny):
    prompts = tiny["tmp"] / "prompts.txt"
    prompts.write_text("the cat\n\na dog\n")
    a = sample_t2i_discrete.main(t2i_args(tiny, tiny["tmp"] / "a", f"--prompts_file={prompts}", "--n_per_prompt=2",
                                          "--batch_size=1"))
    b = sample_t2i_discrete.main(t2i_args(tiny, tiny["tmp"] / "b", "the cat", "a dog", "--n_per_prompt=2",
                                          "--batch_size=3"))
    assert len(a) == len(b) == 4
    for p, q in zip(a, b):
        np.testing.assert_array_equal(read_png(p), read_png(q))


def test_t2i_errors(tiny):
    out = tiny["tmp"] / "err"
    with pytest.raises(ConfigError, match="no prompts"):
        sample_t2i_discrete.main(t2i_args(tiny, out))
    config, _ = tiny["t2i"]
    with pytest.raises(MissingFileError, match="nnet_path"):
        sample_t2i_discrete.main([f"--config={config}", "--nnet_path=/nonexistent.pth", f"--clip={tiny['clip']}",
                                  "--device=cpu", "a cat"])
    with pytest.raises(ConfigError, match="--nnet_path is required"):
        sample_t2i_discrete.main([f"--config={config}", "a cat"])
    cls_config, cls_nnet = tiny["cls"]
    with pytest.raises(ConfigError, match="uvit_t2i"):
        sample_t2i_discrete.main([f"--config={cls_config}", f"--nnet_path={cls_nnet}", "a cat"])
    with pytest.raises(MissingFileError, match="empty_context"):
        sample_t2i_discrete.main(t2i_args(tiny, out, "a cat", "--empty_context=/nonexistent.npy"))


def cls_args(tiny, out, *extra):
    config, nnet = tiny["cls"]
    return [f"--config={config}", f"--nnet_path={nnet}", "--steps=3", "--device=cpu", f"--output_dir={out}",
            *extra]


def test_class_cond_writes_rows_per_class(tiny):
    out = tiny["tmp"] / "cls"
    paths = sample_class_cond.main(cls_args(tiny, out, "--class_ids=0,2", "--n_per_class=2"))
    assert [os.path.basename(p) for p in paths] == ["0000_class0.png", "0001_class0.png", "0002_class2.png",
                                                    "0003_class2.png"]
    assert read_png(out / "grid.png").shape == (2 * 32 + 6, 2 * 32 + 6, 3)  # 16 px images enlarged to 32
    # Same class, different seeds-per-index: different images; rerun: identical.
    assert not np.array_equal(read_png(paths[0]), read_png(paths[1]))
    again = sample_class_cond.main(cls_args(tiny, tiny["tmp"] / "cls2", "--class_ids=0,2", "--n_per_class=2",
                                            "--batch_size=3"))
    for p, q in zip(paths, again):
        np.testing.assert_array_equal(read_png(p), read_png(q))


def test_class_cond_errors(tiny):
    out = tiny["tmp"] / "cls_err"
    with pytest.raises(ConfigError, match="outside 0..2"):
        sample_class_cond.main(cls_args(tiny, out, "--class_ids=3"))
    with pytest.raises(ConfigError, match="--class_ids"):
        sample_class_cond.main(cls_args(tiny, out))
    t2i_config, t2i_nnet = tiny["t2i"]
    with pytest.raises(ConfigError, match="use sample_t2i_discrete.py"):
        sample_class_cond.main([f"--config={t2i_config}", f"--nnet_path={t2i_nnet}", "--class_ids=0", "--device=cpu"])
    # Counts below 1 are refused as the flags are parsed, before the config or any weights are read.
    for flag in ("--n_per_class=0", "--batch_size=0"):
        with pytest.raises(ConfigError, match=f"^flag {flag}: 0 is not a positive integer"):
            sample_class_cond.main(cls_args(tiny, out, "--class_ids=0", flag))
    with pytest.raises(ConfigError, match="^flag --n_per_prompt=0: 0 is not a positive integer"):
        sample_t2i_discrete.main(t2i_args(tiny, out, "a cat", "--n_per_prompt=0"))


def test_class_cond_samples_with_the_config_diffusion(tiny):
    """The time kind comes from config.diffusion: the same weights sampled as a discrete-time model differ."""
    continuous = sample_class_cond.main(cls_args(tiny, tiny["tmp"] / "c", "--class_ids=1", "--n_per_class=1"))
    discrete = sample_class_cond.main(cls_args(tiny, tiny["tmp"] / "d", "--class_ids=1", "--n_per_class=1",
                                               "--config.diffusion=discrete"))
    assert not np.array_equal(read_png(continuous[0]), read_png(discrete[0]))
