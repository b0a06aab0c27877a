"""Every enabled metric, fed from each batch of samples of the one evaluation pass (libs/evaluation.py).

    options = MetricOptions.from_config(config)              # which metrics, the reference, the networks
    networks = load_networks(options, device)                # only the feature networks those metrics need
    reference = load_reference(options.reference, options.names, networks, accelerator)
    suite = MetricSuite(options, n, networks, device)
    suite.update(images, indices)                            # per batch, on the process that made it
    results = suite.finish(accelerator, reference)           # a few all-reduces, then the same dict on every rank

Metric -> features -> statistic (published definition in each module):
- fid:        Inception pool3 (2048)       -> Frechet distance (libs.fid; pytorch-fid's protocol by default)
- is:         Inception unbiased logits    -> Inception Score, `is_splits` contiguous splits (libs.fid)
- sfid:       Inception mixed_6/conv[:7]   -> Frechet distance of the 2023-d spatial features (ADM)
- prc:        Inception pool3              -> precision and recall, k = 3 (precision_recall)
- kid:        Inception pool3              -> KID, cubic polynomial kernel, subsets (kid)
- fd_dinov2:  DINOv2 ViT-L/14 (1024)       -> Frechet distance (dinov2)
- clip_score: CLIP ViT-L/14 image + prompt -> mean 100 max(cos, 0) (clip_score)
Moments are float64 sums merged by addition; precision/recall and KID need the features themselves,
kept as an (n, 2048) float32 table filled at each image's index and summed over processes, so every
metric is a function of the image set alone, whatever the number of processes.
"""
import dataclasses
import logging
import os

import numpy as np
import torch

from libs import fid
from libs.clip import CLIP_VERSION
from libs.errors import ConfigError, MissingFileError
from libs.metrics import kid, precision_recall
from libs.metrics.clip_score import load_clip_scorer
from libs.metrics.dinov2 import load_dinov2
from libs.metrics.sample_file import array_shape, images_of_rows, npz_keys, read_rows
from libs.metrics.inception import RESIZES, SPATIAL_DIMS, load_fid_inception

logger = logging.getLogger(__name__)

METRICS = ("fid", "is", "sfid", "prc", "kid", "fd_dinov2", "clip_score")
NETWORK_OF = {"fid": "inception", "is": "inception", "sfid": "inception", "prc": "inception", "kid": "inception",
              "fd_dinov2": "dinov2", "clip_score": "clip"}
# Reference arrays of each metric in a reference file (ADM's names for FID and sFID).
MOMENTS = {"fid": ("pool", "mu", "sigma"), "sfid": ("spatial", "mu_s", "sigma_s"),
           "fd_dinov2": ("dinov2", "mu_dinov2", "sigma_dinov2")}
FEATURE_TABLES = {"prc": "pool", "kid": "pool"}


def parse_names(text):
    """'fid,is,sfid' -> ('fid', 'is', 'sfid'); ConfigError naming an unknown metric."""
    names = tuple(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    unknown = [t for t in names if t not in METRICS]
    if unknown or not names:
        raise ConfigError(f"config.metrics.names = {text!r}: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; "
                          f"give a comma-separated subset of {','.join(METRICS)}")
    return names


@dataclasses.dataclass
class MetricOptions:
    """What one evaluation computes and from which files (config.metrics; docs/evaluation.md)."""
    names: tuple = ("fid", "is")
    reference: str = ""  # reference batch / statistics .npz ('' = config.fid.stat)
    resize: str = "pytorch-fid"  # how the Inception network resizes: 'pytorch-fid' | 'adm' (libs/metrics/inception.py)
    is_splits: int = fid.DEFAULT_IS_SPLITS
    kid_subsets: int = kid.DEFAULT_SUBSETS
    kid_subset_size: int = kid.DEFAULT_SUBSET_SIZE
    prc_k: int = precision_recall.DEFAULT_K
    prc_arithmetic: str = "float64"  # 'float64' | 'adm' (ADM's float16 distances; precision_recall)
    inception_weights: str = None
    dinov2_weights: str = None
    dinov2_repo: str = None
    clip: str = CLIP_VERSION

    @classmethod
    def from_config(cls, config, inception_weights=None, always=()):
        """The options of config.metrics (defaults where a config lacks the section); `always`: names added."""
        m = config.get("metrics", {})
        get = lambda k, default: m.get(k, default) if hasattr(m, "get") else default  # noqa: E731
        names = tuple(dict.fromkeys((*always, *parse_names(get("names", "fid,is")))))
        return cls(names=names, reference=get("reference", "") or config.fid.stat,
                   resize=get("resize", "pytorch-fid"), kid_subsets=int(get("kid_subsets", kid.DEFAULT_SUBSETS)),
                   kid_subset_size=int(get("kid_subset_size", kid.DEFAULT_SUBSET_SIZE)),
                   prc_k=int(get("prc_k", precision_recall.DEFAULT_K)),
                   prc_arithmetic=get("prc_arithmetic", "float64"),
                   inception_weights=inception_weights or config.fid.inception_weights,
                   dinov2_weights=get("dinov2_weights", "") or None, dinov2_repo=get("dinov2_repo", "") or None,
                   clip=get("clip", "") or CLIP_VERSION)

    @staticmethod
    def problems(section):
        """(key in config.metrics, message) of each bad value: metric names, integer seeds, an .npz sample file,
        existing network files (types and choices are checked by libs.config_utils)."""
        out = []
        if isinstance(section.get("names"), str):
            try:
                parse_names(section["names"])
            except ConfigError as e:
                out.append(("names", str(e).split(": ", 1)[-1]))
        seeds = section.get("seeds")
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = str(seeds)  # --config.metrics.seeds=3 parses as an integer
        if isinstance(seeds, str):
            seeds = [t.strip() for t in seeds.split(",") if t.strip()]
            if not all(t.lstrip("-").isdigit() for t in seeds) or len({int(t) for t in seeds}) != len(seeds):
                out.append(("seeds", "must be distinct comma-separated integers, e.g. 0,1,2 ('' = config.seed)"))
        npz = section.get("npz")
        if isinstance(npz, str) and npz and not npz.endswith(".npz"):
            out.append(("npz", "must end in .npz (the ADM sample file)"))
        for key in ("reference", "dinov2_weights"):
            value = section.get(key)
            if isinstance(value, str) and value and not os.path.isfile(value):
                out.append((key, "does not exist: give the path of an existing file ('' = the default)"))
        return out

    def networks(self):
        return {NETWORK_OF[n] for n in self.names}


class InceptionFeatures(torch.nn.Module):
    """images (B, 3, H, W) in [0, 1] -> {'pool', 'logits', 'spatial'} of the FID Inception network."""

    def __init__(self, net, resize="pytorch-fid"):
        super().__init__()
        assert resize in RESIZES, resize  # config.metrics.resize is checked where the config enters
        self.net, self.resize = net, resize
        self.dims = {"pool": 2048, "logits": net.fc.weight.shape[0], "spatial": SPATIAL_DIMS}

    def forward(self, images):
        return self.net.all_features(images, self.resize)


def load_networks(options, device):
    """{'inception' | 'dinov2' | 'clip': network} for the enabled metrics, each from its local file."""
    out, needed = {}, options.networks()
    if "inception" in needed:
        out["inception"] = InceptionFeatures(load_fid_inception(options.inception_weights, device=device),
                                             options.resize)
    if "dinov2" in needed:
        out["dinov2"] = load_dinov2(options.dinov2_weights, options.dinov2_repo, device)
    if "clip" in needed:
        out["clip"] = load_clip_scorer(options.clip, device)
    return out


@torch.no_grad()
def image_features(networks, images):
    """All features of a batch (b, 3, H, W) in [0, 1] from the image-only networks, in float32 with autocast
    off (fp16 features would shift the distances)."""
    feats = {}
    for name in ("inception", "dinov2"):
        if name in networks:
            net = networks[name]
            device = next(net.parameters()).device
            with torch.autocast(device_type=device.type, enabled=False):
                feats.update(net(images.to(device)))
    return feats


def _dims(networks):
    dims = {}
    for name in ("inception", "dinov2"):
        if name in networks:
            dims.update(getattr(networks[name], "dims", None) or {})
    if "dinov2" in networks and "dinov2" not in dims:
        dims["dinov2"] = int(networks["dinov2"].model.embed_dim)
    return dims


class FeatureAccumulator:
    """Streaming moments of the moment metrics and index-addressed feature tables, mergeable over processes."""

    def __init__(self, names, n, dims, device, is_splits=0):
        self.n, self.names = n, names
        self.moments = {}
        if "fid" in names or "is" in names:
            self.moments["pool"] = fid.InceptionStatistics(dims=dims["pool"], splits=is_splits,
                                                          num_classes=dims.get("logits", 1008), device=device)
        for name in ("sfid", "fd_dinov2"):
            if name in names:
                feature = MOMENTS[name][0]
                self.moments[feature] = fid.InceptionStatistics(dims=dims[feature], splits=0, device=device)
        self.tables = {FEATURE_TABLES[m]: torch.zeros(n, dims[FEATURE_TABLES[m]], device=device)
                       for m in names if m in FEATURE_TABLES}
        self.is_splits = is_splits

    def update(self, feats, indices):
        for feature, stats in self.moments.items():
            split = fid.split_ids(indices, self.n, stats.splits) if stats.splits else None
            stats.update(feats[feature], feats.get("logits") if stats.splits else None, split)
        for feature, table in self.tables.items():
            table[torch.as_tensor(indices, device=table.device)] = feats[feature].to(table)

    def reduce(self, accelerator):
        for stats in self.moments.values():
            stats.reduce(accelerator)
        if accelerator is not None and accelerator.num_processes > 1:
            for feature, table in self.tables.items():
                self.tables[feature] = accelerator.reduce(table, reduction="sum")
        return self


def check_reference(path, names):
    """Fail at once (before loading networks or sampling) on a missing or unreadable reference file."""
    if not any(m in MOMENTS or m in FEATURE_TABLES for m in names):
        return
    if not os.path.isfile(path) or "arr_0" not in npz_keys(path) or "mu" in npz_keys(path):
        fid.load_statistics(path)  # its own checks and messages (missing file, unreadable, NaN)


def load_reference(path, names, networks, accelerator=None, batch_size=50):
    """{'fid' | 'sfid' | 'fd_dinov2': (mu, sigma), 'pool': (N, 2048) features} of the reference file `path`.

    The file is a statistics .npz (tools/compute_fid_stats.py: 'mu', 'sigma', and with --metrics also
    'mu_s', 'sigma_s', 'mu_dinov2', 'sigma_dinov2', 'pool') or an ADM reference batch ('arr_0' uint8 images
    and ADM's 'mu', 'sigma', 'mu_s', 'sigma_s'); what it lacks is computed from its 'arr_0' images with
    `networks`, sharded over the processes. Raises before any sampling when neither is there.
    """
    needed = [m for m in names if m in MOMENTS or m in FEATURE_TABLES]
    if not needed:
        return {}
    check_reference(path, names)
    keys = set(npz_keys(path))
    out, missing = {}, []
    with np.load(path) as f:
        for m in needed:
            if m in MOMENTS and {MOMENTS[m][1], MOMENTS[m][2]} <= keys:
                out[m] = (f[MOMENTS[m][1]].astype(np.float64), f[MOMENTS[m][2]].astype(np.float64))
            elif m in FEATURE_TABLES and FEATURE_TABLES[m] in keys:
                out[FEATURE_TABLES[m]] = f[FEATURE_TABLES[m]].astype(np.float32)
            else:
                missing.append(m)
    if not missing:
        return out
    if "arr_0" not in keys:
        raise MissingFileError(
            f"the reference '{path}' has no statistics for {', '.join(missing)} and no 'arr_0' images to compute "
            f"them from: recompute it with tools/compute_fid_stats.py --metrics={','.join(names)}, or give an ADM "
            f"reference batch (--config.metrics.reference=<file.npz>)")
    logger.info("computing the reference's %s from its images", ", ".join(missing))
    computed = reference_arrays(_npz_batches(path, accelerator, batch_size), int(array_shape(path)[0]), missing, networks,
                                accelerator)
    for m in missing:
        out[FEATURE_TABLES[m] if m in FEATURE_TABLES else m] = computed[m if m in MOMENTS else FEATURE_TABLES[m]]
    return out


def _npz_batches(path, accelerator, batch_size):
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    start = 0
    for rows in read_rows(path, "arr_0", chunk=batch_size * world):
        idx = torch.arange(start, start + len(rows))
        start += len(rows)
        mine = idx % world == rank
        if mine.any():
            yield idx[mine], images_of_rows(rows[mine.numpy()])


def dataset_batches(dataset, accelerator=None, batch_size=50, num_workers=0):
    """(indices, images) of this process's share (rank::world) of a dataset of (3, H, W) images in [0, 1]."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    order = torch.arange(rank, len(dataset), world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=batch_size,
                                         num_workers=num_workers)
    start = 0
    for images in loader:
        yield order[start:start + len(images)], images
        start += len(images)


def reference_file_arrays(arrays):
    """The arrays of `reference_arrays` under their reference-file names ('mu_s', 'sigma_s', ..., 'pool')."""
    out = {}
    for key, value in arrays.items():
        if key in MOMENTS:
            out[MOMENTS[key][1]], out[MOMENTS[key][2]] = value
        else:
            out[key] = value
    return out


def reference_arrays(batches, n, names, networks, accelerator=None):
    """{metric in MOMENTS: (mu, sigma), 'pool': (n, D) float32 numpy} of the images yielded by `batches`
    ((indices, images (b, 3, H, W) in [0, 1]) of this process; every process calls it)."""
    device = next(next(iter(networks.values())).parameters()).device
    acc = FeatureAccumulator(names, n, _dims(networks), device)
    for indices, images in batches:
        acc.update(image_features(networks, fid.quantize_like_png(images)), indices)
    acc.reduce(accelerator)
    out = {m: acc.moments[MOMENTS[m][0]].mean_and_covariance() for m in names if m in MOMENTS}
    out.update({k: t.cpu().numpy() for k, t in acc.tables.items()})
    return out


class MetricSuite:
    """The accumulators of one evaluation of n images (see the module docstring).

    prompts: for 'clip_score', prompts[i] is the caption image i was generated from (a sequence of str).
    """

    def __init__(self, options, n, networks, device, prompts=None):
        self.options, self.n, self.networks = options, n, networks
        if "clip_score" in options.names and prompts is None:
            raise ConfigError("clip_score needs the prompt of every image: it is for text-to-image evaluations "
                              "whose caption features keep the caption text (scripts/extract_mscoco_feature.py "
                              "writes it), or tools/evaluator.py --prompts=<file.json>")
        self.prompts = prompts
        self.splits = min(options.is_splits, n) if "is" in options.names else 0
        self.acc = FeatureAccumulator(options.names, n, _dims(networks), device, self.splits)
        self.clip_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of scores, count)

    def update(self, images, indices):
        """images: (b, 3, H, W) in [0, 1], PNG-quantised; indices: their global indices (b,)."""
        self.acc.update(image_features(self.networks, images), indices)
        if "clip_score" in self.options.names:
            scores = self.networks["clip"](images, [self.prompts[int(i)] for i in indices])
            self.clip_sum += torch.stack([scores.sum(), torch.tensor(float(len(scores)), dtype=torch.float64,
                                                                      device=scores.device)]).to(self.clip_sum)

    def finish(self, accelerator, reference):
        """The metrics as floats (the same on every rank), each under its name(s) in the results dict."""
        self.acc.reduce(accelerator)
        if accelerator is not None and accelerator.num_processes > 1 and "clip_score" in self.options.names:
            self.clip_sum = accelerator.reduce(self.clip_sum, reduction="sum")
        names, out = self.options.names, {}
        device = self.clip_sum.device
        gpu = device if device.type == "cuda" else None
        pool = self.acc.moments.get("pool")
        if pool is not None:
            n = int(pool.n)
            assert n == self.n, f"scored {n} images instead of {self.n}"  # an invariant of the sharding
        for m in ("fid", "sfid", "fd_dinov2"):
            if m in names:
                mu, sigma = self.acc.moments[MOMENTS[m][0]].mean_and_covariance()
                ref_mu, ref_sigma = reference[m]
                assert ref_mu.shape == mu.shape, (m, ref_mu.shape, mu.shape)  # check_reference_dims, before sampling
                out[m] = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma, device=gpu)
        if "is" in names:
            out["inception_score"], out["inception_score_std"] = pool.inception_score()
        if "prc" in names:
            out["precision"], out["recall"] = precision_recall.precision_recall(
                reference["pool"], self.acc.tables["pool"], k=self.options.prc_k, device=device,
                arithmetic=self.options.prc_arithmetic)
        if "kid" in names:
            out["kid"], out["kid_std"] = kid.kernel_inception_distance(
                reference["pool"], self.acc.tables["pool"], self.options.kid_subsets, self.options.kid_subset_size,
                device=device)
        if "clip_score" in names:
            out["clip_score"] = float(self.clip_sum[0] / self.clip_sum[1])
        out["n"] = self.n
        return out


def check_reference_dims(reference, networks):
    """ConfigError before sampling when a reference's statistics do not fit the feature networks."""
    dims = _dims(networks)
    for m, value in reference.items():
        feature = MOMENTS[m][0] if m in MOMENTS else m
        got = value[0].shape[-1] if isinstance(value, tuple) else value.shape[-1]
        if feature in dims and got != dims[feature]:
            what = "FID uses the 2048-d pool3 features" if m == "fid" else f"{m} uses {dims[feature]}-d features"
            raise ConfigError(f"the reference's {m} statistics are {got}-d; {what}. Recompute them with "
                              f"tools/compute_fid_stats.py")
    return reference

