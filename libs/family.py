"""What differs between the four training scripts, as data.

A `Family` is three choices:
- data: 'pixels' (the network sees images in [-1, 1]) or 'latents' (it sees scale_factor * z of the
  KL-f8 autoencoder, sampled from stored moments or encoded on the fly from images);
- time: 'continuous' (VP-SDE, the network sees 999 t) or 'discrete' (SD betas, integer n);
- condition: 'none', 'label' (class index y) or 'text' (CLIP context, (77, 768)).

| script                  | data    | time       | condition                     |
|-------------------------|---------|------------|-------------------------------|
| train.py                | pixels  | continuous | label (none when train.mode='uncond') |
| train_ldm.py            | latents | continuous | label                         |
| train_ldm_discrete.py   | latents | discrete   | label                         |
| train_t2i_discrete.py   | latents | discrete   | text                          |

Everything else (the loop, checkpoints, logging) is shared in libs/trainer.py. `generate` is the
one image-producing path used by sample grids, training-time FID and the eval scripts.
"""
import dataclasses
import logging

import torch

from libs.data_loader import mix_seed
from libs.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

DATA_KINDS = ('pixels', 'latents')
TIME_KINDS = ('continuous', 'discrete')
CONDITION_KINDS = ('none', 'label', 'text')

# Dataset kinds (libs/datasets `data.kind`) each data kind can train on.
_DATASET_KINDS = {'pixels': ('pixels',), 'latents': ('latent_moments', 'images_for_autoencoder')}


def per_index_noise(indices, seed: int, shape, device=None) -> torch.Tensor:
    """(len(indices), *shape) standard normal noise; row k depends only on (seed, indices[k]).

    Drawn on the CPU so the same image comes out on any device and any number of processes.
    """
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(mix_seed(seed, int(i))))
            for i in indices]
    return torch.stack(rows).to(device)


def to_unit_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, H, W) float32 in [0, 1] (grey images repeated to RGB)."""
    x = ((x.float() + 1) / 2).clamp_(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


@dataclasses.dataclass(frozen=True)
class Family:
    data: str
    time: str
    condition: str

    def __post_init__(self):
        for field, kinds in (('data', DATA_KINDS), ('time', TIME_KINDS), ('condition', CONDITION_KINDS)):
            if getattr(self, field) not in kinds:
                raise ValueError(f"Family.{field} must be one of {kinds}, got {getattr(self, field)!r}")

    # -- configuration ----------------------------------------------------------------------------

    def for_config(self, config) -> 'Family':
        """The family a config trains: class families become 'none' with config.train.mode='uncond'."""
        mode = config.train.get('mode', 'cond')
        if mode not in ('cond', 'uncond'):
            raise ConfigError(f"config.train.mode={mode!r} must be 'cond' or 'uncond'")
        if self.condition == 'label' and mode == 'uncond':
            return dataclasses.replace(self, condition='none')
        return self

    def check(self, config, data):
        """ConfigError when the dataset, network and this family do not fit together."""
        if data.kind not in _DATASET_KINDS[self.data]:
            script = 'train.py' if data.kind == 'pixels' else 'train_ldm.py / train_ldm_discrete.py / ' \
                                                               'train_t2i_discrete.py'
            raise ConfigError(f"dataset {config.dataset.name!r} gives {data.kind!r} data, which this script "
                              f"({self.data} family) cannot train on; use {script}")
        num_classes = config.nnet.get('num_classes', -1)
        if self.condition == 'label':
            if data.num_classes <= 0:
                raise ConfigError(f"config.train.mode='cond' but dataset {config.dataset.name!r} has no labels; "
                                  f"set --config.train.mode=uncond and --config.nnet.num_classes=-1")
            expected = data.num_classes + (1 if config.dataset.cfg else 0)
            if num_classes != expected:
                why = " (the classes plus the null label of guidance training)" if config.dataset.cfg else ""
                raise ConfigError(f"config.nnet.num_classes={num_classes} but dataset {config.dataset.name!r} has "
                                  f"{data.num_classes} classes: set it to {expected}{why}")
        elif self.condition == 'none':
            if num_classes not in (None, -1, 0):
                raise ConfigError(f"config.train.mode='uncond' but config.nnet.num_classes={num_classes}; set "
                                  f"--config.nnet.num_classes=-1 (an unconditional network)")
            if config.dataset.cfg:
                raise ConfigError("config.dataset.cfg=True needs a condition; set it False for unconditional training")
        elif self.condition == 'text' and getattr(data, 'empty_context', None) is None and config.dataset.cfg:
            raise ConfigError(f"dataset {config.dataset.name!r} provides no empty_context, needed for guidance "
                              f"training (config.dataset.cfg=True)")
        shape = tuple(config.z_shape) if self.data == 'latents' else tuple(data.data_shape)
        if self.data == 'latents' and config.z_shape is None:
            raise ConfigError("config.z_shape is not set; latent configs need it, e.g. (4, 32, 32)")
        if self.data == 'latents' and tuple(data.data_shape) != shape:
            raise ConfigError(f"config.z_shape={shape} but the dataset's latents have shape {tuple(data.data_shape)}")
        nnet_shape = (config.nnet.get('in_chans', 3), config.nnet.img_size, config.nnet.img_size)
        if nnet_shape != shape:
            raise ConfigError(f"the network takes {nnet_shape} (config.nnet.in_chans, img_size) but the data is "
                              f"{shape}: set --config.nnet.in_chans={shape[0]} --config.nnet.img_size={shape[1]}")

    def null_condition(self, config, data):
        """What replaces the condition for guidance: the null label num_classes - 1, or the empty
        prompt's context (77, 768); None for unconditional families."""
        if self.condition == 'label':
            return int(config.nnet.num_classes) - 1
        if self.condition == 'text':
            return torch.as_tensor(data.empty_context, dtype=torch.float32)
        return None

    # -- training ---------------------------------------------------------------------------------

    def prepare_batch(self, batch: dict, autoencoder=None):
        """A loader batch (on the device) -> (x0 (B, C, H, W) for the loss, cond kwargs of the network).

        Latents are drawn afresh every step: from stored moments, z = scale_factor * (mean + std * noise),
        or by encoding raw images; both draw from torch's default generator on the device.
        """
        if self.data == 'pixels':
            x0 = batch['x']
        elif 'moments' in batch:
            if autoencoder is None:
                raise InputError("latent moments need the autoencoder (config.autoencoder.pretrained_path)")
            x0 = autoencoder.sample(batch['moments'])
        else:
            if autoencoder is None:
                raise InputError("images must be encoded by the autoencoder (config.autoencoder.pretrained_path)")
            with torch.no_grad():
                x0 = autoencoder.encode(batch['x'])
        if self.condition == 'label':
            return x0, {'y': batch['y']}
        if self.condition == 'text':
            return x0, {'context': batch['context']}
        return x0, {}

    def drop_condition(self, cond: dict, p_uncond: float, null) -> dict:
        """Classifier-free guidance training: each sample's condition becomes `null` with probability
        p_uncond (one uniform draw per sample from torch's default generator on the condition's device)."""
        if p_uncond <= 0 or self.condition == 'none':
            return cond
        if self.condition == 'label':
            y = cond['y']
            drop = torch.rand(y.shape[0], device=y.device) < p_uncond
            return {**cond, 'y': torch.where(drop, torch.full_like(y, null), y)}
        context = cond['context']
        drop = torch.rand(context.shape[0], device=context.device) < p_uncond
        empty = null.to(device=context.device, dtype=context.dtype)
        return {**cond, 'context': torch.where(drop[:, None, None], empty, context)}

    # -- sampling ---------------------------------------------------------------------------------

    def conditions(self, labels=None, contexts=None, null=None, device=None):
        """(cond, uncond) kwargs for `generate`: labels (B,) or contexts (B, 77, 768); uncond uses
        `null` (the null label or the empty context) and is None when null is None."""
        if self.condition == 'none':
            return None, None
        if self.condition == 'label':
            y = torch.as_tensor(labels, dtype=torch.int64, device=device)
            return {'y': y}, (None if null is None else {'y': torch.full_like(y, int(null))})
        c = torch.as_tensor(contexts, dtype=torch.float32, device=device)
        return {'context': c}, (None if null is None else {'context': null.to(c).expand_as(c)})

    def generate(self, nnet, diffusion, noise, *, cond=None, uncond=None, algorithm='dpm_solver', steps=50,
                 scale=0.0, autoencoder=None, decode_chunk=50, generator=None) -> torch.Tensor:
        """Run the sampler from `noise` (B, *shape) and return images (B, 3, H, W) float32 in [0, 1].

        scale: guidance scale s of eps_c + s (eps_c - eps_u) (the original's convention); 0 = no guidance.
        generator: noise source of the SDE sampler (one torch.Generator per image for exact sharding).
        Latents are decoded `decode_chunk` at a time.
        """
        from libs.sampling import sample

        if scale > 0 and uncond is None:
            raise InputError("guided sampling (scale > 0) needs the unconditional inputs (null label / empty context)")
        with torch.no_grad():
            x0 = sample(nnet, diffusion, noise, algorithm=algorithm, steps=steps, cond=cond,
                        uncond=uncond if scale > 0 else None, scale=scale, generator=generator)
            if self.data == 'latents':
                if autoencoder is None:
                    raise InputError("decoding latents needs the autoencoder (config.autoencoder.pretrained_path)")
                x0 = autoencoder.decode_in_chunks(x0.to(next(autoencoder.parameters()).dtype), decode_chunk)
        return to_unit_images(x0)

    def default_grid_algorithm(self) -> str:
        """The original's train-time grid sampler: the probability-flow ODE (continuous), DPM-Solver (discrete)."""
        return 'euler_maruyama_ode' if self.time == 'continuous' else 'dpm_solver'

    def grid_conditions(self, data, n_rows: int, n_cols: int):
        """Conditions of a sample grid, row-major: class models one row per class (at most n_rows
        classes, evenly spaced), text models one row per fixed prompt. Returns (labels, contexts, n)."""
        if self.condition == 'label':
            k = min(n_rows, data.num_classes)
            classes = torch.linspace(0, data.num_classes - 1, k).round().long()
            return classes.repeat_interleave(n_cols), None, k * n_cols
        if self.condition == 'text':
            contexts = torch.as_tensor(data.vis_contexts, dtype=torch.float32)[:n_rows]
            return None, contexts.repeat_interleave(n_cols, dim=0), contexts.shape[0] * n_cols
        return None, None, n_rows * n_cols

    def make_generate_fn(self, nnet, diffusion, *, shape, seed, device, algorithm='dpm_solver', steps=50, scale=0.0,
                         null=None, labels=None, contexts=None, autoencoder=None, decode_chunk=50):
        """generate_fn(indices: LongTensor) -> images (b, 3, H, W) in [0, 1], for libs.evaluation.

        Image i uses noise seeded by (seed, i) and condition labels[i] / contexts[i] (tables indexed by
        the global image index), so any split of the indices over processes gives the same images.
        """
        from libs.evaluation import index_generators

        def generate_fn(indices):
            indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
            generator = index_generators(seed, indices, device) if algorithm == 'euler_maruyama_sde' else None
            noise = per_index_noise(indices, seed, shape, device)
            cond, uncond = self.conditions(labels=None if labels is None else labels[indices],
                                           contexts=None if contexts is None else contexts[indices],
                                           null=null, device=device)
            return self.generate(nnet, diffusion, noise, cond=cond, uncond=uncond, algorithm=algorithm, steps=steps,
                                 scale=scale, autoencoder=autoencoder, decode_chunk=decode_chunk, generator=generator)
        return generate_fn


PIXELS_CONTINUOUS = Family('pixels', 'continuous', 'label')  # train.py
LATENTS_CONTINUOUS = Family('latents', 'continuous', 'label')  # train_ldm.py
LATENTS_DISCRETE = Family('latents', 'discrete', 'label')  # train_ldm_discrete.py
TEXT_LATENTS_DISCRETE = Family('latents', 'discrete', 'text')  # train_t2i_discrete.py
