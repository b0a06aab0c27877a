"""Packed feature format, the original per-file layout, and the latent feature datasets."""
import json
import os

import numpy as np
import pytest
import torch

from libs import shards as F
from libs.datasets import get_dataset
from libs.datasets.features import caption_contexts
from libs.errors import CheckpointError, ConfigError, InputError, MissingFileError


def write_packed(folder, moments, labels=None, contexts=None, shard_size=3, dtype="float32", captions=None):
    """Write arrays through ShardWriter; contexts: list of (K_i, 77, D) per sample; captions: their texts
    (list of K_i strings per sample), kept in the shard record as the extraction script keeps them."""
    plan = F.plan_shards(len(moments), shard_size)
    for k, start, stop in plan:
        n_ctx = None if contexts is None else sum(len(c) for c in contexts[start:stop])
        ctx_shape = None if contexts is None else contexts[0].shape[1:]
        with F.ShardWriter(folder, k, stop - start, moments.shape[1:], dtype=dtype, with_labels=labels is not None,
                           num_contexts=n_ctx, context_shape=ctx_shape) as w:
            w.write(0, moments[start:stop], None if labels is None else labels[start:stop])
            if contexts is not None:  # as scripts/extract_mscoco_feature.py writes them
                offsets = w.set_caption_counts([len(c) for c in contexts[start:stop]])
                for i, c in enumerate(contexts[start:stop]):
                    w.write_context_rows(int(offsets[i]), c)
            w.commit(None if captions is None else {"captions": captions[start:stop]})
    return F.write_manifest(folder, len(plan))


def test_plan_shards_covers_every_item_once():
    plan = F.plan_shards(10, 4)
    assert plan == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    with pytest.raises(AssertionError):  # the scripts' --shard_size flag refuses 0 (lower_bound=1)
        F.plan_shards(10, 0)


def test_packed_roundtrip_labels(tmp_path):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((7, 8, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 5, 7)
    m = write_packed(str(tmp_path), moments, labels)
    assert m["num_samples"] == 7 and len(m["shards"]) == 3 and m["has_labels"] and not m["has_contexts"]
    r = F.open_features(str(tmp_path))
    assert isinstance(r, F.PackedFeatures) and len(r) == 7
    for i in range(7):  # crosses both shard boundaries
        np.testing.assert_array_equal(r.moments(i), moments[i])
        assert r.label(i) == labels[i]
    np.testing.assert_array_equal(r.labels(), labels)
    with pytest.raises(AssertionError):  # the datasets index within len()
        r.moments(7)
    # A memory map is opened once per shard and re-opened after pickling (DataLoader workers).
    import pickle
    clone = pickle.loads(pickle.dumps(r))
    assert clone._maps == {} and np.array_equal(clone.moments(4), moments[4])


def test_float16_storage_error_is_half_precision_rounding(tmp_path):
    moments = np.random.default_rng(1).standard_normal((4, 8, 2, 2)).astype(np.float32) * 10
    write_packed(str(tmp_path), moments, np.zeros(4, int), dtype="float16")
    r = F.open_features(str(tmp_path))
    got = np.stack([r.moments(i) for i in range(4)])
    assert got.dtype == np.float32
    # Round-to-nearest in binary16: relative error at most 2^-11 (normal range).
    assert (np.abs(got - moments) <= np.abs(moments) * 2.0 ** -11 + 1e-7).all()


def test_packed_contexts(tmp_path):
    rng = np.random.default_rng(2)
    moments = rng.standard_normal((5, 8, 2, 2)).astype(np.float32)
    contexts = [rng.standard_normal((k, 77, 6)).astype(np.float32) for k in (1, 5, 3, 2, 4)]
    write_packed(str(tmp_path), moments, contexts=contexts, shard_size=2)
    r = F.open_features(str(tmp_path))
    assert r.has_contexts and not r.has_labels
    for i, c in enumerate(contexts):
        assert r.num_contexts(i) == len(c)
        for k in range(len(c)):
            np.testing.assert_array_equal(r.context(i, k), c[k])
    with pytest.raises(AssertionError):
        r.context(0, 1)


def test_interrupted_shard_leaves_nothing_and_manifest_refuses(tmp_path):
    folder = str(tmp_path)
    with pytest.raises(RuntimeError):
        with F.ShardWriter(folder, 0, 2, (8, 2, 2), with_labels=True) as w:
            w.write(0, np.zeros((1, 8, 2, 2)), [0])
            raise RuntimeError("killed")
    assert os.listdir(folder) == []
    assert not F.shard_is_complete(folder, 0)
    with F.ShardWriter(folder, 0, 2, (8, 2, 2), with_labels=True) as w:
        w.write(0, np.zeros((1, 8, 2, 2)), [0])
        with pytest.raises(AssertionError, match="never written"):
            w.commit()
    with pytest.raises(MissingFileError, match="not finished"):
        F.write_manifest(folder, 1)
    with pytest.raises(MissingFileError, match="did not finish"):
        with F.ShardWriter(folder, 0, 1, (8, 2, 2)) as w:
            w.write(0, np.zeros((1, 8, 2, 2)))
            w.commit()
        F.open_features(folder)


def test_killed_run_temporaries_are_removed_when_the_shard_is_redone(tmp_path):
    stale = tmp_path / ".shard_00001.moments.npy.tmp-999-abc"
    stale.write_bytes(b"x" * 100)
    other = tmp_path / ".shard_00002.moments.npy.tmp-999-abc"
    other.write_bytes(b"x")
    with F.ShardWriter(str(tmp_path), 1, 1, (8, 2, 2)) as w:
        assert not stale.exists() and other.exists()
        w.write(0, np.zeros((1, 8, 2, 2)))
        w.commit()
    assert F.shard_is_complete(str(tmp_path), 1)


def test_nan_moments_rejected(tmp_path):
    with F.ShardWriter(str(tmp_path), 0, 1, (8, 2, 2)) as w:
        with pytest.raises(InputError, match="NaN"):
            w.write(0, np.full((1, 8, 2, 2), np.nan))


def write_original_imagenet(folder, moments, labels):
    """The original extraction's files: np.save of a (moments, label) tuple -> a pickled object array."""
    os.makedirs(folder, exist_ok=True)
    for i, (m, y) in enumerate(zip(moments, labels)):
        np.save(os.path.join(folder, f"{i}.npy"), np.array((m, np.int64(y)), dtype=object), allow_pickle=True)


def write_original_coco(folder, moments, contexts):
    os.makedirs(folder, exist_ok=True)
    for i, m in enumerate(moments):
        np.save(os.path.join(folder, f"{i}.npy"), m)
        for k, c in enumerate(contexts[i]):
            np.save(os.path.join(folder, f"{i}_{k}.npy"), c)


def test_per_file_layouts(tmp_path):
    rng = np.random.default_rng(3)
    moments = rng.standard_normal((4, 8, 4, 4)).astype(np.float32)
    write_original_imagenet(str(tmp_path / "in"), moments, [3, 1, 4, 1])
    r = F.open_features(str(tmp_path / "in"))
    assert isinstance(r, F.PerFileFeatures) and len(r) == 4 and r.has_labels and r.moments_shape == (8, 4, 4)
    np.testing.assert_array_equal(r.moments(2), moments[2])
    assert [r.label(i) for i in range(4)] == [3, 1, 4, 1]
    contexts = [rng.standard_normal((k, 77, 6)).astype(np.float32) for k in (2, 1, 3, 5)]
    write_original_coco(str(tmp_path / "coco"), moments, contexts)
    r = F.open_features(str(tmp_path / "coco"))
    assert r.has_contexts and not r.has_labels
    assert [r.num_contexts(i) for i in range(4)] == [2, 1, 3, 5]
    np.testing.assert_array_equal(r.context(3, 4), contexts[3][4])
    np.testing.assert_array_equal(r.moments(1), moments[1])


def test_corrupt_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest"):
        F.open_features(str(tmp_path))


# -- datasets ---------------------------------------------------------------------------------------


def test_imagenet_features_dataset_packed_and_per_file(tmp_path):
    rng = np.random.default_rng(4)
    moments = rng.standard_normal((6, 8, 32, 32)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    write_packed(str(tmp_path / "packed"), moments, labels)
    write_original_imagenet(str(tmp_path / "orig"), moments, labels)
    for folder in ("packed", "orig"):
        data = get_dataset("imagenet256_features", path=str(tmp_path / folder))
        assert data.kind == "latent_moments" and data.data_shape == (4, 32, 32) and data.num_classes == 1000
        item = data.train[5]
        assert item["moments"].dtype == torch.float32 and item["y"].dtype == torch.int64
        assert torch.equal(item["moments"], torch.from_numpy(moments[5])) and int(item["y"]) == 2
        # Batched access (DataLoader's __getitems__) gives the per-item results, across shard boundaries.
        idx = [5, 0, 3, 3, 1]
        batch = data.train.__getitems__(idx)
        for i, item in zip(idx, batch):
            assert torch.equal(item["moments"], data.train[i]["moments"]) and int(item["y"]) == labels[i]
    loader = torch.utils.data.DataLoader(get_dataset("imagenet256_features", path=str(tmp_path / "packed")).train,
                                         batch_size=3, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b["moments"] for b in batches]), torch.from_numpy(moments))


def test_imagenet_features_errors(tmp_path):
    with pytest.raises(MissingFileError, match="extract_imagenet_feature.py"):
        get_dataset("imagenet256_features", path=str(tmp_path / "missing"))
    write_packed(str(tmp_path / "f"), np.zeros((2, 8, 32, 32), np.float32), np.array([0, 7]))
    with pytest.raises(ConfigError, match="needs \\(8, 64, 64\\)"):
        get_dataset("imagenet512_features", path=str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="num_classes=8"):
        get_dataset("imagenet256_features", path=str(tmp_path / "f"), num_classes=5)


def which_caption(context, candidates):
    return next(k for k in range(len(candidates)) if torch.equal(context, torch.from_numpy(candidates[k])))


def test_mscoco_features_dataset(tmp_path):
    rng = np.random.default_rng(5)
    moments = rng.standard_normal((3, 8, 32, 32)).astype(np.float32)
    contexts = [rng.standard_normal((k, 77, 16)).astype(np.float32) for k in (3, 1, 2)]
    root = tmp_path / "coco"
    write_packed(str(root / "train"), moments, contexts=contexts)
    write_original_coco(str(root / "val"), moments[:2], contexts[:2])
    empty = rng.standard_normal((77, 16)).astype(np.float32)
    np.save(root / "empty_context.npy", empty)
    vis = rng.standard_normal((2, 77, 16)).astype(np.float32)
    (root / "vis_prompts.json").write_text(json.dumps(["a cat", "a dog"]))
    np.save(root / "vis_contexts.npy", vis)
    data = get_dataset("mscoco256_features", path=str(root))
    assert data.kind == "latent_moments" and data.data_shape == (4, 32, 32) and data.num_classes == 0
    np.testing.assert_array_equal(data.empty_context, empty)
    assert data.vis_prompts == ["a cat", "a dog"] and np.array_equal(data.vis_contexts, vis)
    assert len(data.test) == 2
    # FID contexts: a fixed table over val images (val = moments[:2], contexts[:2]), same for any split.
    table = data.fid_contexts[torch.arange(4)]
    assert table.shape == (4, 77, 16)
    for i in range(4):
        assert any(torch.equal(table[i], torch.from_numpy(c)) for cs in contexts[:2] for c in cs)
        assert torch.equal(data.fid_contexts[torch.tensor([i])][0], table[i])
    assert torch.equal(table[0], table[2]) and not torch.equal(table[0], table[1])  # wraps after the 2 images
    # Caption drawn uniformly per access from torch's default generator: all 3 appear, seeded = reproducible.
    torch.manual_seed(0)
    seen = [which_caption(data.train[0]["context"], contexts[0]) for _ in range(60)]
    assert set(seen) == {0, 1, 2} and max(seen.count(k) for k in range(3)) < 40
    torch.manual_seed(0)
    again = [which_caption(data.train[0]["context"], contexts[0]) for _ in range(60)]
    assert seen == again
    assert torch.equal(data.train[2]["moments"], torch.from_numpy(moments[2]))
    torch.manual_seed(3)
    single = [data.train[i] for i in (2, 0, 1, 0)]
    torch.manual_seed(3)
    batch = data.train.__getitems__([2, 0, 1, 0])
    for a, b in zip(single, batch):
        assert torch.equal(a["moments"], b["moments"]) and torch.equal(a["context"], b["context"])


def test_fid_prompts_are_the_captions_of_the_contexts_sampled_with(tmp_path):
    # CLIP score compares image i with the caption whose context generated it: the texts and the table agree.
    rng = np.random.default_rng(6)
    contexts = [rng.standard_normal((k, 77, 16)).astype(np.float32) for k in (3, 1, 2, 2)]
    captions = [[f"image {i} caption {k}" for k in range(len(c))] for i, c in enumerate(contexts)]
    root = tmp_path / "coco"
    write_packed(str(root / "val"), rng.standard_normal((4, 8, 4, 4)).astype(np.float32), contexts=contexts,
                 captions=captions)
    table, _ = caption_contexts(str(root))
    prompts = table.prompts()
    for i in range(9):  # past the 4 images: the table wraps, and so do the prompts
        image, k = (int(x) for x in prompts[i].removeprefix("image ").split(" caption "))
        assert torch.equal(table[i], torch.from_numpy(contexts[image][k]))
    # Features without caption text (the original's per-file layout, or older extractions): no prompts.
    write_packed(str(tmp_path / "bare" / "val"), rng.standard_normal((2, 8, 4, 4)).astype(np.float32),
                 contexts=contexts[:2])
    assert caption_contexts(str(tmp_path / "bare"))[0].prompts() is None


def test_mscoco_original_run_vis(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "coco"
    write_original_coco(str(root / "train"), rng.standard_normal((2, 8, 32, 32)).astype(np.float32),
                        [rng.standard_normal((1, 77, 8)).astype(np.float32)] * 2)
    os.makedirs(root / "run_vis")
    ctx = rng.standard_normal((3, 77, 8)).astype(np.float32)
    for i in range(3):  # the original wrote (prompt, context) pairs, numbered 0..K-1
        np.save(root / "run_vis" / f"{i}.npy", np.array((f"prompt {i}", ctx[i]), dtype=object), allow_pickle=True)
    data = get_dataset("mscoco256_features", path=str(root))
    assert data.vis_prompts == ["prompt 0", "prompt 1", "prompt 2"] and np.array_equal(data.vis_contexts, ctx)
    assert data.empty_context is None and data.test is None


def test_mscoco_missing(tmp_path):
    with pytest.raises(MissingFileError, match="extract_mscoco_feature.py"):
        get_dataset("mscoco256_features", path=str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MissingFileError, match="extract_mscoco_feature.py"):
        get_dataset("mscoco256_features", path=str(tmp_path / "empty"))
