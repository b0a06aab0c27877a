"""Sample-quality metrics beside FID, all fed by the one evaluation pass of libs/evaluation.py.

The statistics math lives in modules named for the metric (`kid`, `precision_recall`; FID, sFID and
FD-DINOv2 are Frechet distances of libs/fid.py); the feature networks in `dinov2` and `clip_score`
(Inception: libs/metrics/inception.py); `suite` feeds every enabled metric from each batch of samples,
`reference` reads the reference batch, `sample_file` writes the ADM-suite `.npz` of the samples.
"""
