"""Latent feature datasets: ImageNet 256/512 moments with labels, MS-COCO 256 moments with CLIP contexts.

Items carry the autoencoder moments (mean, logvar), not latents: the engine draws z = scale_factor * (mean + std *
noise) afresh every step (libs/family.py prepare_batch), as the original did. Both the packed format and the
original one-file-per-sample layout are read (libs/shards.py describes them).

Folder layouts (config.dataset.path):
- imagenet{256,512}_features: the features (packed: manifest.json + shards; original: 0.npy, 1.npy, ... each
  (moments, label)). Written by scripts/extract_imagenet_feature.py.
- mscoco256_features: `train/` and `val/` feature folders (packed, or the original {i}.npy + {i}_{k}.npy),
  `empty_context.npy` (77, 768), and the visualisation prompts: `vis_prompts.json` + `vis_contexts.npy` (K, 77, 768),
  or the original `run_vis/{i}.npy` (prompt, context) pairs. Written by scripts/extract_mscoco_feature.py,
  extract_empty_feature.py, extract_test_prompt_feature.py.
"""
import json
import logging
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from libs.datasets.base import DatasetBase
from libs.errors import CheckpointError, ConfigError, require_path
from libs.shards import open_features

logger = logging.getLogger(__name__)

LATENT_KIND = "latent_moments"
IMAGENET_CLASSES = 1000
EMPTY_CONTEXT_FILE = "empty_context.npy"
FID_CONTEXT_SEED = 1234  # the configs' seed; fixes which val captions FID images are drawn with
VIS_PROMPTS_FILE, VIS_CONTEXTS_FILE = "vis_prompts.json", "vis_contexts.npy"


def _latent_shape(reader):
    """(C, h, w) of the latents of a feature reader: what the extraction recorded (any autoencoder), else the KL
    layout's (mean, logvar) halves."""
    recorded = getattr(reader, "manifest", {}).get("info", {}).get("latent_shape")
    if recorded:
        return tuple(int(v) for v in recorded)
    c, h, w = reader.moments_shape
    return (c // 2, h, w)


class LabelledMoments(Dataset):
    """Items {'moments': (2C, h, w) float32, 'y': int64 scalar} from a feature reader, plus 'repa': (N, E)
    float32 stored encoder features when `with_repa` (set by libs.repa for representation alignment)."""

    with_repa = False

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        item = {"moments": torch.from_numpy(self.reader.moments(i)),
                "y": torch.tensor(self.reader.label(i), dtype=torch.int64)}
        if self.with_repa:
            item["repa"] = torch.from_numpy(self.reader.repa_many([i])[0])
        return item

    def __getitems__(self, indices):
        """A whole batch at once (torch's DataLoader calls this when present): one read per shard."""
        moments = torch.from_numpy(self.reader.moments_many(indices))
        labels = torch.from_numpy(self.reader.labels_many(indices))
        items = [{"moments": m, "y": y} for m, y in zip(moments, labels)]
        if self.with_repa:
            for item, f in zip(items, torch.from_numpy(self.reader.repa_many(indices))):
                item["repa"] = f
        return items


class CaptionedMoments(Dataset):
    """Items {'moments': (2C, h, w) float32, 'context': (77, D) float32}: one of the sample's captions,
    drawn uniformly with torch's default generator on every access (the engine seeds it per worker); plus
    'repa': (N, E) float32 stored encoder features when `with_repa` (set by libs.repa)."""

    with_repa = False

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        k = int(torch.randint(self.reader.num_contexts(i), ()).item())
        item = {"moments": torch.from_numpy(self.reader.moments(i)),
                "context": torch.from_numpy(self.reader.context(i, k))}
        if self.with_repa:
            item["repa"] = torch.from_numpy(self.reader.repa_many([i])[0])
        return item

    def __getitems__(self, indices):
        """A whole batch at once; captions drawn in index order, as per-item access would."""
        moments = torch.from_numpy(self.reader.moments_many(indices))
        items = []
        for m, i in zip(moments, indices):
            k = int(torch.randint(self.reader.num_contexts(int(i)), ()).item())
            items.append({"moments": m, "context": torch.from_numpy(self.reader.context(int(i), k))})
        if self.with_repa:
            for item, f in zip(items, torch.from_numpy(self.reader.repa_many(indices))):
                item["repa"] = f
        return items


class FIDContexts:
    """Contexts for FID sampling: image index i -> one caption context of a val2014 image.

    The original drew them from a shuffled val loader (one random caption per image); here image i gets val image
    perm[i mod N] and one of its captions, drawn from a generator seeded with FID_CONTEXT_SEED, so every process, run
    and batch split uses the same table. contexts[indices] -> (b, 77, D) float32 for a LongTensor / sequence.
    """

    def __init__(self, reader, seed=None):
        self.reader = reader
        g = torch.Generator().manual_seed(FID_CONTEXT_SEED if seed is None else seed)
        self.perm = torch.randperm(len(reader), generator=g)
        self.choice = torch.rand(len(reader), generator=g, dtype=torch.float64)

    def __len__(self):
        return len(self.reader)

    def _pick(self, i):
        """(val image, caption) of sample image i."""
        j = int(self.perm[int(i) % len(self.reader)])
        return j, min(int(self.choice[j] * self.reader.num_contexts(j)), self.reader.num_contexts(j) - 1)

    def _one(self, i):
        return torch.from_numpy(self.reader.context(*self._pick(i)))

    def prompts(self):
        """The caption text of each image index (prompts[i]: the caption whose context image i is sampled
        with), for the CLIP score; None when the features record no caption text (the original's layout)."""
        if getattr(self.reader, "caption", None) is None or self.reader.caption(0, 0) is None:
            return None
        return _Prompts(self)

    def __getitem__(self, indices):
        if isinstance(indices, (int, np.integer)) or (torch.is_tensor(indices) and indices.dim() == 0):
            return self._one(indices)
        return torch.stack([self._one(i) for i in torch.as_tensor(indices).reshape(-1).tolist()])


class _Prompts:
    """prompts[i] of FIDContexts.prompts: looked up when asked, never a list of every caption."""

    def __init__(self, contexts):
        self.contexts = contexts

    def __getitem__(self, i):
        return self.contexts.reader.caption(*self.contexts._pick(i))


class ImageNetFeatures(DatasetBase):
    """ImageNet 256 or 512 autoencoder moments (each image and its horizontal flip) with class labels.

    path: the feature folder. resolution: 256 or 512 (implied by the registry name). num_classes: data classes (1000;
    fewer for toy sets); guidance's null class is appended by the config (nnet.num_classes = num_classes + 1).
    """

    def __init__(self, path, resolution=256, num_classes=IMAGENET_CLASSES):
        how = (f"extract them with `python scripts/extract_imagenet_feature.py --resolution {resolution} "
               f"--imagenet_train <ImageNet train folder> --output {path}` (accelerate launch for several GPUs)")
        reader = open_features(path, how)
        info = getattr(reader, "manifest", {}).get("info", {})
        folder = f"point config.dataset.path at the imagenet{resolution}_features folder"
        problems = []
        if info.get("latent_shape"):  # any autoencoder: the extraction recorded its resolution
            if info.get("resolution") != resolution:
                problems.append(f"were extracted at resolution {info.get('resolution')}, not {resolution} ({folder})")
        elif tuple(reader.moments_shape) != (8, resolution // 8, resolution // 8):
            problems.append(f"have moments of shape {tuple(reader.moments_shape)}, but resolution {resolution} needs "
                            f"{(8, resolution // 8, resolution // 8)} ({folder})")
        if not reader.has_labels:
            problems.append("carry no class labels: they are not ImageNet features")
        elif reader.layout == "packed":  # cheap here; 2.5M pickled files would take minutes, so not checked
            top = int(reader.labels().max())
            if top >= num_classes:
                problems.append(f"have label {top} but num_classes={num_classes} (set "
                                f"--config.dataset.num_classes={top + 1})")
        if problems:
            raise ConfigError(f"features in '{path}' {'; '.join(problems)}.")
        super().__init__(LabelledMoments(reader), _latent_shape(reader), kind=LATENT_KIND,
                         num_classes=num_classes)
        self.resolution = resolution
        logger.info("ImageNet %d features: %d entries (%s layout) in %s", resolution, len(reader), reader.layout, path)


class MSCOCOFeatures(DatasetBase):
    """MS-COCO 256 autoencoder moments with the CLIP contexts of every caption.

    path: the folder with train/, val/, empty_context.npy and the visualisation prompts. Attributes beyond
    DatasetBase: test (val2014 items), fid_contexts (the val2014 caption contexts to sample FID images with, by image
    index), empty_context (77, D) float32 numpy (each None when absent), vis_prompts (list of K str), vis_contexts
    (K, 77, D) float32 numpy.
    """

    def __init__(self, path, resolution=256):
        require_path(path, "MS-COCO features folder", f"Extract them with `python scripts/extract_mscoco_feature.py "
                     f"--coco_root <COCO folder> --output {path}`, then scripts/extract_empty_feature.py and "
                     f"scripts/extract_test_prompt_feature.py with --output {path}.", kind='folder')
        train = open_features(os.path.join(path, "train"),
                              f"run `python scripts/extract_mscoco_feature.py --split train --output {path}`")
        if not train.has_contexts:
            raise CheckpointError(f"features in '{path}/train' carry no caption contexts; they are not MS-COCO features.")
        val_dir = os.path.join(path, "val")
        test = open_features(val_dir) if os.path.isdir(val_dir) else None
        if test is None:
            logger.warning("no val/ features in %s: FID contexts are unavailable (extract --split val)", path)
        super().__init__(CaptionedMoments(train), _latent_shape(train), kind=LATENT_KIND)
        self.test = None if test is None else CaptionedMoments(test)
        self.fid_contexts = None if test is None else FIDContexts(test)
        self.empty_context = _load_empty_context(path)
        self.vis_prompts, self.vis_contexts = _load_vis(path)
        if self.vis_contexts is None:
            self.vis_contexts = np.zeros((0, *train.context(0, 0).shape), dtype=np.float32)
        logger.info("MS-COCO features: %d train images (%s layout), %s val, %d visualisation prompts in %s",
                    len(train), train.layout, "no" if test is None else len(test), len(self.vis_prompts), path)


def caption_contexts(path):
    """(FIDContexts of <path>/val, the empty prompt's context (77, D) float32 or None): what text-to-image
    evaluation samples with. Opens neither the training features nor anything else."""
    how = (f"text-to-image evaluation samples with the MS-COCO val2014 caption features: extract them with `python "
           f"scripts/extract_mscoco_feature.py --split val --output {path}` (or download them into that folder)")
    return FIDContexts(open_features(os.path.join(path, "val"), how)), _load_empty_context(path)


def _load_empty_context(path):
    f = os.path.join(path, EMPTY_CONTEXT_FILE)
    if not os.path.isfile(f):
        logger.warning("%s not found: guidance needs it (run scripts/extract_empty_feature.py --output %s)", f, path)
        return None
    return np.asarray(np.load(f), dtype=np.float32)


def _load_vis(path):
    """(prompts, contexts (K, 77, D)) from vis_prompts.json + vis_contexts.npy, or the original run_vis/."""
    pj, cj = os.path.join(path, VIS_PROMPTS_FILE), os.path.join(path, VIS_CONTEXTS_FILE)
    if os.path.isfile(pj) and os.path.isfile(cj):
        with open(pj) as f:
            prompts = json.load(f)
        contexts = np.asarray(np.load(cj), dtype=np.float32)
        if len(prompts) != len(contexts):
            raise CheckpointError(f"{pj} lists {len(prompts)} prompts but {cj} holds {len(contexts)} contexts; "
                                  "run scripts/extract_test_prompt_feature.py again.")
        return list(prompts), contexts
    run_vis = os.path.join(path, "run_vis")
    if os.path.isdir(run_vis):
        files = sorted((f for f in os.listdir(run_vis) if f.endswith(".npy") and f[:-4].isdigit()),
                       key=lambda f: int(f[:-4]))
        pairs = [np.load(os.path.join(run_vis, f), allow_pickle=True) for f in files]
        return [str(p[0]) for p in pairs], np.stack([np.asarray(p[1], dtype=np.float32) for p in pairs])
    logger.warning("no visualisation prompts in %s (run scripts/extract_test_prompt_feature.py --output %s)", path, path)
    return [], None
