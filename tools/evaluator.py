"""Score a sample batch against a reference batch, printing every metric: the ADM evaluator's interface
(guided-diffusion's evaluations/evaluator.py), without TensorFlow.

    python tools/evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz
    python tools/evaluator.py ref.npz samples/ --metrics=fid,is,sfid,prc,kid,fd_dinov2 --json=scores.json
    python tools/evaluator.py ref.npz samples.npz --metrics=fid,clip_score --prompts=captions.json

The reference is an ADM reference batch ('arr_0' uint8 images, with or without ADM's 'mu', 'sigma',
'mu_s', 'sigma_s') or statistics written by tools/compute_fid_stats.py. The samples are an ADM sample
file ('arr_0' uint8 (N, H, W, 3), as eval*.py write with --config.metrics.npz) or a folder of images.
--prompts: a JSON list with the caption of every sample (for the CLIP score). Networks, protocols and
their differences from ADM's TensorFlow graph: docs/evaluation.md. The math lives in libs/metrics/.
"""
import json
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from absl import flags

from libs import fid
from libs.errors import ConfigError, MissingFileError, exit_on_user_error
from libs.evaluation import format_metrics
from libs.io_utils import atomic_write_bytes
from libs.metrics import precision_recall
from libs.metrics.sample_file import array_shape, images_of_rows, npz_keys, read_rows
from libs.metrics.suite import MetricOptions, MetricSuite, check_reference_dims, load_networks, load_reference, \
    parse_names
from tools.cli import parse_flags

logger = logging.getLogger(__name__)

ADM_METRICS = "fid,is,sfid,prc,kid"  # what the ADM evaluator prints (and KID)


def sample_batches(path, batch_size):
    """(n, iterator of (indices, images (b, 3, H, W) in [0, 1])) of an .npz 'arr_0' or an image folder."""
    if path.endswith(".npz"):
        if "arr_0" not in npz_keys(path):
            raise ConfigError(f"'{path}' has no 'arr_0' images; a sample batch is an .npz of uint8 (N, H, W, 3)")
        n = int(array_shape(path)[0])

        def batches():
            start = 0
            for rows in read_rows(path, "arr_0", batch_size):
                yield torch.arange(start, start + len(rows)), images_of_rows(rows)
                start += len(rows)
        return n, batches()
    folder = fid.ImageFolder(path)  # not a folder either: its one-line error

    def folder_batches():
        for start in range(0, len(folder), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(folder)))
            yield idx, fid._collate_same_size([folder[int(i)] for i in idx])
    return len(folder), folder_batches()


def evaluate_files(reference, samples, options, batch_size=50, device=None, prompts=None, networks=None):
    """Every metric of `options` of the sample batch `samples` against `reference` (paths); a results dict."""
    for p in (reference, samples):
        if not os.path.exists(p):
            raise MissingFileError(f"'{p}' does not exist")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n, batches = sample_batches(samples, batch_size)
    if prompts is not None and len(prompts) != n:
        raise ConfigError(f"--prompts has {len(prompts)} captions for {n} samples; give one per sample, in order")
    networks = networks or load_networks(options, device)
    ref = check_reference_dims(load_reference(reference, options.names, networks, None, batch_size), networks)
    suite = MetricSuite(options, n, networks, device, prompts)
    for idx, images in batches:
        suite.update(fid.quantize_like_png(images.to(device)), idx)
    return suite.finish(None, ref)


def define_flags(fv):
    flags.DEFINE_string("metrics", ADM_METRICS, "comma-separated subset of fid,is,sfid,prc,kid,fd_dinov2,clip_score",
                        flag_values=fv)
    flags.DEFINE_enum("resize", "pytorch-fid", ["pytorch-fid", "adm"], "the Inception network's resize "
                      "(docs/evaluation.md)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 50, "images per forward", flag_values=fv)
    flags.DEFINE_string("device", None, "cuda, cuda:0 or cpu (default: cuda if available)", flag_values=fv)
    flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth (default: torch hub cache)",
                        flag_values=fv)
    flags.DEFINE_string("dinov2_weights", None, "dinov2_vitl14_pretrain.pth (default: torch hub cache)", flag_values=fv)
    flags.DEFINE_string("dinov2_repo", None, "the facebookresearch/dinov2 hub code (default: torch hub cache)",
                        flag_values=fv)
    flags.DEFINE_string("clip", None, "CLIP folder or hub id in the local cache (default: ViT-L/14)", flag_values=fv)
    flags.DEFINE_string("prompts", None, "JSON list of the caption of every sample (CLIP score)", flag_values=fv)
    flags.DEFINE_enum("prc_arithmetic", "float64", list(precision_recall.ARITHMETICS), "precision/recall distances: "
                      "'float64' (the formula) or 'adm' (ADM's float16 evaluator; docs/evaluation.md)", flag_values=fv)
    flags.DEFINE_integer("kid_subsets", 100, "KID subsets", flag_values=fv)
    flags.DEFINE_integer("kid_subset_size", 1000, "KID features per subset", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the metrics to this JSON file", flag_values=fv)


def main(argv=None):
    """argv: the reference and the sample batch, and the flags; None: sys.argv[1:]. Returns the metrics."""
    fv, (reference, samples) = parse_flags(define_flags, argv, __doc__, positional=("reference", "samples"))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    options = MetricOptions(names=parse_names(fv.metrics), resize=fv.resize, kid_subsets=fv.kid_subsets,
                            kid_subset_size=fv.kid_subset_size, prc_arithmetic=fv.prc_arithmetic,
                            inception_weights=fv.inception_weights,
                            dinov2_weights=fv.dinov2_weights, dinov2_repo=fv.dinov2_repo,
                            **({"clip": fv.clip} if fv.clip else {}))
    prompts = None
    if fv.prompts:
        with open(fv.prompts) as f:
            prompts = json.load(f)
    result = evaluate_files(reference, samples, options, fv.batch_size, fv.device, prompts)
    for key, value in result.items():
        print(f"{key}: {value}")
    if fv.json:
        record = {"reference": reference, "samples": samples, "metrics": list(options.names),
                  "inception_resize": options.resize,
                  "prc_arithmetic": options.prc_arithmetic, "results": result}
        atomic_write_bytes((json.dumps(record, indent=1) + "\n").encode(), fv.json)
    logger.info("%s", format_metrics(result))
    return result


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
