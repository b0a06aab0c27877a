"""REPA and post-hoc EMA on the digits demo (configs/digits_uvit_tiny.py), at equal steps.

Stages (run in order; each prints what it made):
  encoder  trains a small CNN on the digits' class labels and saves its feature extractor, (B, 1, 8, 8) in
           [-1, 1] -> (B, 64, 4, 4) (a 4 x 4 patch grid, the U-ViT's), as TorchScript: the stand-in for
           DINOv2 (no download; a supervised encoder of the same data, not a self-supervised one).
  train    the demo twice, in parallel, with the same seed and steps: without and with alignment
           (config.repa, encoder 'torchscript', the middle block); both keep post-hoc EMA profiles
           (sigma_rel 0.05 and 0.10, a snapshot every --snapshot_interval steps).
  score    the digit score (final evaluation's protocol: DPM-Solver 25 steps, guidance 1, 1,000 samples) of
           each run's fixed-rate EMA (config.ema_rate 0.99) and of post-hoc EMAs of several widths
           reconstructed by tools/posthoc_ema.py (of the run without alignment; --repa_widths: both).

    nice -n 5 python benchmarks/bench_repa_posthoc.py --stage encoder,train,score --out workdir/bench_repa
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.machine import describe_machine  # noqa: E402
from configs.digits_uvit_tiny import get_config  # noqa: E402
from libs.datasets import dataset_kwargs, get_dataset  # noqa: E402
from libs.evaluation import generate_all, load_models  # noqa: E402
from libs.family import PIXELS_CONTINUOUS  # noqa: E402
from libs.sampling import Sampler  # noqa: E402

WIDTHS = (0.03, 0.05, 0.08, 0.12, 0.18, 0.25)


class DigitEncoder(nn.Module):
    """(B, 1, 8, 8) -> (B, 64, 4, 4) features; `head` classifies their mean (used for training only)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2,
                                      padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train_encoder(path, steps=200):
    from sklearn.datasets import load_digits  # heavy

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1  # the dataset's [-1, 1]
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = DigitEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    torch.jit.save(torch.jit.trace(model.features.eval(), x[:2]), path)
    print(f"encoder: {steps} steps, train accuracy {accuracy:.3f}, saved to {path}")


def run_args(out, name, n_steps, snapshot_interval):
    args = [sys.executable, os.path.join(ROOT, 'train.py'), '--config=configs/digits_uvit_tiny.py',
            f'--workdir={os.path.join(out, name)}', f'--config.train.n_steps={n_steps}',
            f'--config.train.save_interval={n_steps}', f'--config.train.eval_interval={n_steps}',
            f'--config.posthoc_ema.snapshot_interval={snapshot_interval}', '--config.log_with=',
            '--config.fid.n_samples=0']  # the final evaluation only (the scores below)
    if name == 'repa':
        args += ['--config.repa.enabled=True', '--config.repa.encoder=torchscript',
                 f'--config.repa.weights={os.path.join(out, "encoder.pt")}', '--config.repa.resolution=8',
                 '--config.repa.projector_dim=256']
    return args


def train_runs(out, n_steps, snapshot_interval):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'TQDM_DISABLE': '1',
           'PYTHONPATH': ROOT}
    start = time.time()
    procs = {name: subprocess.Popen(run_args(out, name, n_steps, snapshot_interval), cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(out, f'{name}.log'), 'w'))
             for name in ('plain', 'repa')}
    for name, p in procs.items():
        if p.wait() != 0:
            sys.exit(f"the {name} run failed: see {os.path.join(out, name + '.log')}")
    print(f"train: 2 runs of {n_steps} steps in parallel, one thread each, {time.time() - start:.0f} s")


def score(out, repa_widths, widths=WIDTHS):
    from accelerate import Accelerator  # heavy

    config = get_config()
    family, accelerator = PIXELS_CONTINUOUS.for_config(config), Accelerator(cpu=True)
    data = get_dataset(config.dataset.name, **dataset_kwargs(config))
    labels = family.sample_labels(config, config.sample.n_samples)

    def digit_score(path):
        nnet, _ = load_models(config, family, path, 'cpu')
        gen = Sampler.for_config(config, family, nnet, 'cpu', None, family.null_condition(config)).generate_fn(
            *family.protocol(config, 'sample'), labels=labels)
        return data.sample_metric(generate_all(accelerator, gen, config.sample.n_samples,
                                               config.sample.mini_batch_size), labels)

    rows = []
    for name in ('plain', 'repa'):
        workdir = os.path.join(out, name)
        with open(os.path.join(workdir, 'final_eval.json')) as f:
            final = json.load(f)
        log = open(os.path.join(out, f'{name}.log')).read()
        align = [line.split('align_loss ')[1].split(',')[0] for line in log.splitlines() if 'align_loss' in line]
        rows.append((name, f'fixed rate {config.ema_rate}', final['digit_accuracy'], final['pixel_fd'],
                     align[-1] if align else ''))
        for width in widths if name == 'plain' or repa_widths else ():
            target = os.path.join(workdir, f'posthoc_{width}.pth')
            done = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'posthoc_ema.py'),
                                   f'--workdir={workdir}', f'--sigma_rel={width}', f'--output={target}'],
                                  capture_output=True, text=True)
            if done.returncode:
                rows.append((name, f'post-hoc sigma_rel {width}', 'refused', done.stderr.strip()[-160:], ''))
                continue
            s = digit_score(target)
            rows.append((name, f'post-hoc sigma_rel {width}', s['digit_accuracy'], s['pixel_fd'], ''))
    print(describe_machine())
    print(f"\n| run | EMA | digit_accuracy | pixel_fd | last align_loss |\n|---|---|---|---|---|")
    for r in rows:
        print('| ' + ' | '.join(f'{v:.3f}' if isinstance(v, float) else str(v) for v in r) + ' |')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--stage', default='encoder,train,score')
    p.add_argument('--out', default='workdir/bench_repa')
    p.add_argument('--n_steps', type=int, default=1500)
    p.add_argument('--snapshot_interval', type=int, default=50)
    p.add_argument('--repa_widths', action='store_true', help="also score the post-hoc widths of the REPA run")
    p.add_argument('--widths', default=','.join(map(str, WIDTHS)), help="the post-hoc widths to score")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    stages = args.stage.split(',')
    if 'encoder' in stages:
        train_encoder(os.path.join(args.out, 'encoder.pt'))
    if 'train' in stages:
        train_runs(args.out, args.n_steps, args.snapshot_interval)
    if 'score' in stages:
        score(args.out, args.repa_widths, [float(w) for w in args.widths.split(',')])


if __name__ == '__main__':
    main()
