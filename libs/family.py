"""What a config trains and samples, decided in one place (`family_of`): a `Family` is three choices.

- data: 'latents' when config.z_shape is set (the scaled latents of config.autoencoder), else 'pixels' ([-1, 1]);
- time: config.diffusion, 'continuous' (VP-SDE, network sees 999 t) or 'discrete' (SD betas, integer n);
- condition: 'text' for uvit_t2i (CLIP context (77, 768)), 'none' with config.train.mode='uncond', else 'label'.

Each entry script serves one family (`SCRIPTS`, the constants at the end) and names the right one for another's.
"""
import dataclasses

import torch

from libs.errors import ConfigError
from sde import Objective

# (train script, eval script) of each (data, time, text?); other combinations have no script.
SCRIPTS = {
    ('pixels', 'continuous', False): ('train.py', 'eval.py'),
    ('latents', 'continuous', False): ('train_ldm.py', 'eval_ldm.py'),
    ('latents', 'discrete', False): ('train_ldm_discrete.py', 'eval_ldm_discrete.py'),
    ('latents', 'discrete', True): ('train_t2i_discrete.py', 'eval_t2i_discrete.py'),
}
# The network's keyword argument of each condition kind.
_COND_KEYS = {'label': 'y', 'text': 'context'}
# Dataset kinds (libs/datasets `data.kind`) each data kind can train on.
_DATASET_KINDS = {'pixels': ('pixels',), 'latents': ('latent_moments', 'images_for_autoencoder')}


def guidance_scale(config) -> float:
    """The guidance scale of config.sample: config.sample.scale when config.sample.cfg, else 0 (unguided)."""
    return float(config.sample.scale) if config.sample.cfg else 0.0


def describe_guidance(config, scale: float) -> str:
    """For the sampling log: 'guidance scale 2 (null label / empty prompt), at every noise level' or '... (guide
    network 'g.pth', autoguidance), for sigma in [0.2, 5]'; 'unguided' for scale 0."""
    if scale <= 0:
        return "unguided"
    s = config.sample
    guide = s.get('guide_path', '')
    lo, hi = float(s.get('guidance_sigma_min', 0.0)), float(s.get('guidance_sigma_max', 0.0))
    against = f"guide network '{guide}', autoguidance" if guide else "null label / empty prompt"
    interval = (f"for sigma in [{lo:g}, {hi:g}]" if hi > 0 else f"for sigma >= {lo:g}") if lo > 0 or hi > 0 \
        else "at every noise level"
    return f"guidance scale {scale:g} ({against}), {interval}"


def data_classes(config) -> int:
    """The classes of a label config: config.nnet.num_classes without the null label of guidance training."""
    return int(config.nnet.get('num_classes', -1)) - (1 if config.dataset.cfg else 0)


def family_of(config, data=None) -> 'Family':
    """The family `config` trains and samples; with the training dataset `data`, also checks that they fit."""
    family = Family('latents' if config.get('z_shape') is not None else 'pixels', config.diffusion,
                    'text' if config.nnet.get('name') == 'uvit_t2i' else
                    'none' if config.train.get('mode', 'cond') == 'uncond' else 'label')
    if family.key not in SCRIPTS:
        raise ConfigError(f"no script trains {family.data[:-1]}-space models with config.diffusion={family.time!r}"
                          f"{' and text' if family.condition == 'text' else ''}: latent configs (config.z_shape) "
                          f"may be 'continuous' or 'discrete', pixel configs only 'continuous', text-to-image ones "
                          f"only 'discrete'")
    if data is not None:
        family.check(config, data)
    return family


@dataclasses.dataclass(frozen=True)
class Family:
    data: str  # 'pixels' | 'latents'
    time: str  # 'continuous' | 'discrete'
    condition: str  # 'none' | 'label' | 'text'

    @property
    def key(self):
        return self.data, self.time, self.condition == 'text'

    # -- configuration ----------------------------------------------------------------------------

    def for_config(self, config, stage='train') -> 'Family':
        """family_of(config) when this family's `stage` ('train' / 'eval') script serves it, else a ConfigError
        naming the script that does."""
        family = family_of(config)
        if family.key == self.key:
            return family
        what = []
        if family.time != self.time:
            what.append(f"{family.time}-time (config.diffusion={family.time!r})")
        if family.data != self.data:
            what.append('latent-space (config.z_shape is set)' if family.data == 'latents' else
                        'pixel-space (config.z_shape is None)')
        if (family.condition == 'text') != (self.condition == 'text'):
            what.append('text-to-image' if family.condition == 'text' else 'class-conditional or unconditional')
        script = SCRIPTS[family.key][stage == 'eval']
        raise ConfigError(f"this config is {', '.join(what)}: use {script}")

    def check(self, config, data, autoencoder=None):
        """ConfigError when the dataset, network and this family do not fit together. autoencoder: the latent
        model that encodes 'images_for_autoencoder' data (their latent shape is its, not the dataset's KL-f8 guess)."""
        if data.kind not in _DATASET_KINDS[self.data]:
            raise ConfigError(f"dataset {config.dataset.name!r} gives {data.kind!r} data, which a "
                              f"{self.data[:-1]}-space config cannot train on; "
                              + ('set config.z_shape=None' if data.kind == 'pixels' else
                                 'set config.z_shape and config.autoencoder'))
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
        elif getattr(data, 'empty_context', None) is None and (config.dataset.cfg or config.sample.cfg):
            raise ConfigError(f"dataset {config.dataset.name!r} provides no empty_context, needed for guidance "
                              f"(config.dataset.cfg / config.sample.cfg)")
        # The network's geometry against z_shape is a config rule (libs.config_utils); against the data, here.
        data_shape = tuple(data.data_shape)
        if autoencoder is not None and data.kind == 'images_for_autoencoder':
            data_shape = tuple(autoencoder.latent_shape(data.image_shape))
        if self.shape(config) != data_shape:
            keys = 'config.z_shape' if self.data == 'latents' else 'config.nnet.in_chans, img_size'
            raise ConfigError(f"the network takes {self.shape(config)} ({keys}) but dataset "
                              f"{config.dataset.name!r} gives {data_shape}: make them equal")

    def shape(self, config) -> tuple:
        """(C, H, W) of x0 the network sees: config.z_shape for latents, (in_chans, img_size, img_size) for pixels."""
        n = config.nnet
        return tuple(config.z_shape) if self.data == 'latents' else (n.get('in_chans', 3), n.img_size, n.img_size)

    def null_condition(self, config, empty_context=None):
        """Guidance's unconditional condition: null label num_classes - 1 or the empty prompt's context (77, 768)."""
        if self.condition == 'label':
            return int(config.nnet.num_classes) - 1
        if self.condition == 'text' and empty_context is not None:
            return torch.as_tensor(empty_context, dtype=torch.float32)
        return None

    # -- training ---------------------------------------------------------------------------------

    def prepare_batch(self, batch: dict, autoencoder=None):
        """A loader batch (on the device) -> (x0 (B, C, H, W), the network's cond kwargs). Latents are drawn afresh
        every step (torch's default generator): scale_factor * (mean + std * noise) of stored moments, or encoded."""
        assert self.data == 'pixels' or autoencoder is not None, "latent configs load the autoencoder"
        if self.data == 'pixels':
            x0 = batch['x']
        elif 'moments' in batch:
            x0 = autoencoder.sample(batch['moments'])
        else:
            with torch.no_grad():
                x0 = autoencoder.encode(batch['x'])
        key = _COND_KEYS.get(self.condition)
        return x0, ({key: batch[key]} if key else {})

    def drop_condition(self, cond: dict, p_uncond: float, null) -> dict:
        """Guidance training: each condition becomes `null` with probability p_uncond (one torch.rand per sample)."""
        if p_uncond <= 0 or self.condition == 'none':
            return cond
        key = _COND_KEYS[self.condition]
        c = cond[key]
        drop = (torch.rand(c.shape[0], device=c.device) < p_uncond).view(-1, *[1] * (c.ndim - 1))
        return {**cond, key: torch.where(drop, torch.as_tensor(null).to(c), c)}

    # -- sampling ---------------------------------------------------------------------------------

    def protocol(self, config, use: str):
        """(algorithm, steps, guidance scale) of each use of sampling; which numbers are guided:
        - 'sample' (eval*.py, final_eval.json): config.sample, guided with config.sample.scale when config.sample.cfg;
        - 'fid' (FID of every checkpoint in training): DPM-Solver with config.fid.steps; guided as 'sample' for
          text models (the original's train_t2i_discrete.py), unguided for class models (its train*.py);
        - 'grid' (training sample grids): config.grid; scale < 0 means the 'sample' scale.
        Flow-matching objectives (config.objective.path='linear') have no paper protocol: their 'fid' and default
        'grid' sampler is config.sample.algorithm.
        """
        vp = Objective.of(config).path == 'vp'
        if use == 'sample':
            return config.sample.algorithm, int(config.sample.sample_steps), guidance_scale(config)
        if use == 'fid':
            return ('dpm_solver' if vp else config.sample.algorithm, int(config.fid.steps),
                    guidance_scale(config) if self.condition == 'text' else 0.0)
        g = config.grid
        default = ('euler_maruyama_ode' if self.time == 'continuous' else 'dpm_solver') if vp else config.sample.algorithm
        return g.algorithm or default, int(g.steps), float(g.scale) if g.scale >= 0 else guidance_scale(config)

    def sample_labels(self, config, n: int):
        """(n,) int64 labels seeded by config.seed; None for other families. config.metrics.labels 'uniform' (the
        default, the original's): independent uniform draws over the data classes; 'balanced': i mod K in a seeded
        random order, so exactly n / K images per class (when K divides n; else the first n mod K classes get one
        more)."""
        if self.condition != 'label':
            return None
        k, g = data_classes(config), torch.Generator().manual_seed(config.seed)
        if config.get('metrics', {}).get('labels', 'uniform') == 'balanced':
            return (torch.arange(int(n)) % k)[torch.randperm(int(n), generator=g)]
        return torch.randint(0, k, (int(n),), generator=g)

    def grid_conditions(self, config, vis_contexts, n_rows: int, n_cols: int):
        """Conditions of a sample grid, row-major: class models one row per class (at most n_rows
        classes, evenly spaced), text models one row per fixed prompt. Returns (labels, contexts, n)."""
        if self.condition == 'label':
            k = data_classes(config)
            classes = torch.linspace(0, k - 1, min(n_rows, k)).round().long()
            return classes.repeat_interleave(n_cols), None, len(classes) * n_cols
        if self.condition == 'text':
            contexts = torch.as_tensor(vis_contexts, dtype=torch.float32)[:n_rows]
            return None, contexts.repeat_interleave(n_cols, dim=0), contexts.shape[0] * n_cols
        return None, None, n_rows * n_cols


PIXELS_CONTINUOUS = Family('pixels', 'continuous', 'label')  # train.py, eval.py
LATENTS_CONTINUOUS = Family('latents', 'continuous', 'label')  # train_ldm.py, eval_ldm.py
LATENTS_DISCRETE = Family('latents', 'discrete', 'label')  # train_ldm_discrete.py, eval_ldm_discrete.py
TEXT_LATENTS_DISCRETE = Family('latents', 'discrete', 'text')  # train_t2i_discrete.py, eval_t2i_discrete.py
