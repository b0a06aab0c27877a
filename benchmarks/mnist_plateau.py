"""What the U-ViT of benchmarks/mnist_reference.py does during its loss plateau (~0.16 for up to thousands of
steps before the loss falls to ~0.05): probes of the weights it kept (`--save_every`) on one fixed batch.

    python benchmarks/mnist_reference.py --steps 4000 --seeds 0,1,2 --save_every 250
    python benchmarks/mnist_plateau.py --steps 4000 --seeds 0,1,2

U-ViT gives the network its time and class only as two extra tokens, so a patch token learns them only by
attending to those tokens. Per kept step this prints, on 512 training digits with fixed t and noise:
- loss: the training loss (LSimple), and its means at t < 0.2 and t >= 0.2;
- +t shuffled: how much the loss rises when the time input is permuted across the batch (0: time unused);
- +y shuffled: the same for the class labels (0: class unused);
- +pos shuffled: the same for the patch tokens' position embeddings, permuted among the patches (0: the
  network is blind to where a patch is);
- +patches alone: the same when no patch token may attend to another (0: each patch is denoised alone);
- attn time / attn label: the attention mass the patch tokens put on the time / label token, averaged over
  heads and queries, the largest over the blocks (1 / 51 ~ 0.02 is uniform attention).
About 10 s per kept step on one core; what the probes found is in benchmarks/README.md.
"""
import argparse
import contextlib
import glob
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import mnist_reference as bench  # noqa: E402
from libs import uvit_layers  # noqa: E402
from libs.uvit_layers import Attention  # noqa: E402

N_PROBE = 512
SMALL_T = 0.2  # below it the noise is faint (sigma_t < 0.6) and the target, eps, hard to see


def kept_weights(run_dir):
    """[(step, state dict path)] of a run: the reference loop's probe/<step>.pth or train.py's checkpoints."""
    found = [(int(m.group(1)), path) for path in glob.glob(os.path.join(run_dir, 'probe', '*.pth'))
             if (m := re.fullmatch(r'(\d+)\.pth', os.path.basename(path)))]
    found += [(int(m.group(1)), os.path.join(path, 'nnet.pth'))
              for path in glob.glob(os.path.join(run_dir, 'train', 'ckpts', '*.ckpt'))
              if (m := re.fullmatch(r'(\d+)\.ckpt', os.path.basename(path)))]
    return sorted(found)


def probe_batch(data, seed=0):
    """Fixed (x0 (N, 3, 14, 14) in [-1, 1], labels (N,), t (N,), noise) from the training digits."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data['train'][1]), generator=gen)[:N_PROBE].numpy()
    x0 = torch.from_numpy(bench.halve(data['train'][0][idx])).float()[:, None].expand(-1, 3, -1, -1) / 127.5 - 1
    return x0, torch.from_numpy(data['train'][1][idx]), torch.rand(N_PROBE, generator=gen), \
        torch.randn(x0.shape, generator=gen)


class AttentionMass:
    """Forward hooks on every block's qkv projection: the softmax attention of the patch queries (tokens 2..)
    on keys 0 (label) and 1 (time), mean over batch, heads and queries, per block."""

    def __init__(self, nnet):
        self.mass, self.hooks = {}, []
        for name, module in nnet.named_modules():
            if isinstance(module, Attention):
                self.hooks.append(module.qkv.register_forward_hook(self._hook(name, module)))

    def _hook(self, name, attn):
        def hook(_, __, out):
            B, T, _ = out.shape
            q, k, _v = out.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            weights = (q[:, :, 2:] @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (B, h, T - 2, T)
            self.mass.setdefault(name, []).append(weights[..., :2].mean(dim=(0, 1, 2)))
        return hook

    def largest(self):
        """(largest mass on the label token, on the time token) over the blocks, then cleared."""
        per_block = torch.stack([torch.stack(v).mean(0) for v in self.mass.values()])  # (blocks, 2)
        self.mass.clear()
        return per_block[:, 0].max().item(), per_block[:, 1].max().item()


@torch.no_grad()
def probe(nnet, x0, y, t, noise):
    """{loss, loss_small_t, loss_large_t, t_shuffled, y_shuffled, pos_shuffled, patches_alone, attn_label,
    attn_time} of `nnet`
    on the fixed batch; the network is left as it was."""
    log_alpha = -0.25 * t ** 2 * (bench.BETA_1 - bench.BETA_0) - 0.5 * t * bench.BETA_0
    alpha = log_alpha.exp()[:, None, None, None]
    xt = alpha * x0 + (1.0 - alpha ** 2).sqrt() * noise
    perm = torch.roll(torch.arange(len(t)), 1)  # every item gets another item's time / label

    def per_item(t_in, labels):  # (N,) the loss of each item
        return torch.cat([(nnet(xt[i:i + 128], 999.0 * t_in[i:i + 128], y=labels[i:i + 128]) - noise[i:i + 128])
                          .pow(2).flatten(1).mean(1) for i in range(0, len(t), 128)])

    def loss(t_in, labels):
        return per_item(t_in, labels).mean().item()

    mass = AttentionMass(nnet)
    items = per_item(t, y)
    base = items.mean().item()
    attn_label, attn_time = mass.largest()
    for h in mass.hooks:
        h.remove()
    r = {'loss': base, 'loss_small_t': items[t < SMALL_T].mean().item(), 'loss_large_t': items[t >= SMALL_T].mean().item(),
         't_shuffled': loss(t[perm], y) - base, 'y_shuffled': loss(t, y[perm]) - base,
         'attn_label': attn_label, 'attn_time': attn_time}
    pos = nnet.get_parameter(next(n for n, _ in nnet.named_parameters() if n.endswith('pos_embed')))
    kept = pos.detach().clone()
    patches = torch.arange(2, pos.shape[1])
    pos[:, 2:] = kept[:, patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))]]
    r['pos_shuffled'] = loss(t, y) - base  # the patch tokens' position embeddings permuted among them
    pos.copy_(kept)
    with patches_alone():
        r['patches_alone'] = loss(t, y) - base
    return r


def alone_attention(q, k, v, scale):
    """Attention in which a patch token sees only itself and the two condition tokens (label, time), and
    those only each other: q, k, v (B, h, T, Dh) -> (B, h, T, Dh)."""
    idx = torch.arange(q.shape[-2])
    allowed = (idx[:, None] == idx[None, :]) | (idx[None, :] < 2)  # (T, T): key j visible to query i
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float('-inf'))
    return scores.softmax(-1) @ v


@contextlib.contextmanager
def patches_alone():
    """The U-ViT's attention replaced by `alone_attention` inside the block: no patch reads another
    (they meet again only in the final 3 x 3 convolution)."""
    kept = uvit_layers.attention
    uvit_layers.attention = alone_attention
    try:
        yield
    finally:
        uvit_layers.attention = kept


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                epilog='The arguments name the runs as benchmarks/mnist_reference.py does.')
    p.add_argument('--steps', type=int, default=4000)
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--sides', default='project,reference')
    p.add_argument('--project_flips', choices=['', 'on', 'off'], default='')
    p.add_argument('--embed_dim', type=int, default=bench.NET['embed_dim'])
    p.add_argument('--depth', type=int, default=bench.NET['depth'])
    p.add_argument('--cache', default=os.path.join(ROOT, 'workdir', 'mnist_reference'))
    p.add_argument('--pickle', default=None)
    a = p.parse_args()
    a.reference_flips = False
    bench.NET.update(embed_dim=a.embed_dim, depth=a.depth)
    torch.set_num_threads(1)
    batch = probe_batch(bench.load_mnist(bench.find_pickle(a.pickle)))
    for seed in map(int, a.seeds.split(',')):
        for side in a.sides.split(','):
            run_dir = os.path.join(a.cache, 'runs', f"{side}_{bench.run_tag(a)}_seed{seed}")
            kept = kept_weights(run_dir)
            print(f"\n{side} seed {seed}: {len(kept)} kept steps in {run_dir}")
            if kept:
                print(f"{'step':>6} {'loss':>7} {'t < 0.2':>7} {'t >= 0.2':>8} {'+t shuffled':>11} {'+y shuffled':>11} {'+pos shuffled':>13} {'+patches alone':>14} "
                      f"{'attn time':>9} {'attn label':>10}")
            for step, path in kept:
                nnet = bench.UViT(**bench.NET).eval()
                nnet.load_state_dict(torch.load(path, map_location='cpu'))
                r = probe(nnet, *batch)
                print(f"{step:>6} {r['loss']:>7.4f} {r['loss_small_t']:>7.4f} {r['loss_large_t']:>8.4f} {r['t_shuffled']:>11.4f} {r['y_shuffled']:>11.4f} "
                      f"{r['pos_shuffled']:>13.4f} {r['patches_alone']:>14.4f} "
                      f"{r['attn_time']:>9.3f} {r['attn_label']:>10.3f}", flush=True)


if __name__ == '__main__':
    main()
