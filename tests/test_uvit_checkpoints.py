"""The published checkpoints' layout (tests/data/uvit_checkpoints.json), the network
registry and the strict state-dict loader."""
import json
import os

import ml_collections
import pytest
import torch

from benchmarks.bench_uvit import SIZES
from libs import uvit, uvit_t2i
from libs.errors import CheckpointError, ConfigError
from libs.nnet import NNETS, build_nnet, load_nnet_state_dict

CONFIGS = ["cifar10_uvit_small", "celeba64_uvit_small", "imagenet64_uvit_mid", "imagenet64_uvit_large",
           "imagenet256_uvit_large", "imagenet256_uvit_huge", "imagenet512_uvit_large", "imagenet512_uvit_huge",
           "mscoco_uvit_small", "mscoco_uvit_small_deep"]

# Which of the paper's sizes (benchmarks/bench_uvit.py) each published config is.
PRESETS = {
    "cifar10_uvit_small": "U-ViT-S/2", "celeba64_uvit_small": "U-ViT-S/4", "imagenet64_uvit_mid": "U-ViT-M/4",
    "imagenet64_uvit_large": "U-ViT-L/4", "imagenet256_uvit_large": "U-ViT-L/2",
    "imagenet256_uvit_huge": "U-ViT-H/2", "imagenet512_uvit_large": "U-ViT-L/4",
    "imagenet512_uvit_huge": "U-ViT-H/4", "mscoco_uvit_small": "U-ViT-S/2", "mscoco_uvit_small_deep": "U-ViT-S-deep/2",
}
SIZE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "name")


@pytest.fixture(scope="module")
def reference(reference_dir):
    with open(os.path.join(reference_dir, "uvit_checkpoints.json")) as f:
        return json.load(f)


def _build_meta(kwargs):
    with torch.device("meta"):  # no memory, no init cost: ~0.5 G parameters for the H models
        return build_nnet(kwargs)


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_matches_reference(reference, name):
    ref = reference["configs"][name]
    model = _build_meta(ref["nnet_kwargs"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    want = [(e["key"], e["shape"]) for e in ref["state_dict"]]
    assert sorted(got) == sorted(want)
    assert got == want  # also the original's order, handy when diffing checkpoints
    assert all(e["dtype"] == "float32" for e in ref["state_dict"]) and all(
        v.dtype == torch.float32 for v in model.state_dict().values())
    assert len(got) == ref["num_state_dict_entries"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert (len(model.in_blocks), 1, len(model.out_blocks)) == (
        ref["blocks"]["in_blocks"], ref["blocks"]["mid_block"], ref["blocks"]["out_blocks"])
    assert (model.extras, model.num_patches, model.patch_dim) == (ref["extras"], ref["num_patches"], ref["patch_dim"])
    assert model.pos_embed.shape[1] == ref["sequence_length"]
    assert ref["model_class"].endswith(":UViT") and type(model).__module__.replace(".", "/") + ".py" == ref["model_class"].split(":")[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_presets_build_the_published_sizes(reference, name):
    kwargs = {k: v for k, v in reference["configs"][name]["nnet_kwargs"].items() if k not in SIZE_KEYS}
    network = uvit_t2i.UViT if name.startswith("mscoco") else uvit.UViT
    with torch.device("meta"):
        model = network(**SIZES[PRESETS[name]], **kwargs)
    want = [(e["key"], e["shape"]) for e in reference["configs"][name]["state_dict"]]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == want


def test_registry():
    assert NNETS == {"uvit": uvit.UViT, "uvit_t2i": uvit_t2i.UViT}


def test_build_from_config_dict():
    cfg = ml_collections.ConfigDict(dict(name="uvit", img_size=8, patch_size=2, embed_dim=16, depth=2,
                                         num_heads=2, num_classes=3))
    model = build_nnet(cfg)
    assert isinstance(model, uvit.UViT) and model.num_classes == 3 and model.embed_dim == 16
    assert cfg.name == "uvit"  # the config is not modified


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="'dit'.*uvit, uvit_t2i"):
        build_nnet({"name": "dit"})
    with pytest.raises(ConfigError, match="None"):
        build_nnet({"img_size": 8})


def test_unknown_keyword_is_named():
    with pytest.raises(ConfigError, match="num_clases"):
        build_nnet({"name": "uvit", "num_clases": 10})
    with pytest.raises(ConfigError, match="clip_dim"):
        build_nnet({"name": "uvit", "clip_dim": 768})


TINY = dict(name="uvit", img_size=8, patch_size=2, embed_dim=16, depth=4, num_heads=2)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_roundtrip_and_wrappers():
    src, dst = build_nnet(TINY), build_nnet(TINY)
    assert not _same_weights(src, dst)
    sd = src.state_dict()
    for wrapped in (sd,
                    {"state_dict": sd},
                    {"module." + k: v for k, v in sd.items()},
                    {"_orig_mod." + k: v for k, v in sd.items()},
                    {"module._orig_mod." + k: v for k, v in sd.items()}):
        dst = build_nnet(TINY)
        load_nnet_state_dict(dst, wrapped)
        assert _same_weights(src, dst)


def test_load_into_wrapped_model():
    src = build_nnet(TINY)
    holder = torch.nn.Module()
    holder.module = build_nnet(TINY)  # what DistributedDataParallel looks like from outside
    load_nnet_state_dict(holder, src.state_dict())
    assert _same_weights(src, holder.module)


def test_mismatch_lists_the_differing_keys():
    model = build_nnet({**TINY, "num_classes": 10})
    other = build_nnet({**TINY, "depth": 6, "patch_size": 4})
    with pytest.raises(CheckpointError) as e:
        load_nnet_state_dict(model, other.state_dict())
    msg = str(e.value)
    assert "missing keys: label_emb.weight" in msg
    assert "unexpected keys: in_blocks.2.norm1.weight" in msg
    assert "patch_embed.proj.weight checkpoint (16, 3, 4, 4) vs model (16, 3, 2, 2)" in msg
    assert "pos_embed checkpoint (1, 5, 16) vs model (1, 18, 16)" in msg
    assert "in all)" in msg  # long lists are cut, with a count
    assert len(msg) < 2000


def test_nan_checkpoint_is_refused_and_model_untouched():
    model = build_nnet(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = build_nnet(TINY).state_dict()
    sd["mid_block.attn.qkv.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="mid_block.attn.qkv.weight"):
        load_nnet_state_dict(model, sd)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_not_a_state_dict():
    with pytest.raises(CheckpointError, match="list"):
        load_nnet_state_dict(build_nnet(TINY), [1, 2])
