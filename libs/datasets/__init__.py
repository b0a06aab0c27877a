"""Dataset registry: `data = get_dataset(name, **kwargs)`.

Each name maps to 'module:Class'; the module is imported only when the dataset is asked for,
so a dataset whose optional dependency is missing never breaks the others.
See docs/datasets.md for the on-disk formats and how to add a dataset.
"""
import importlib
import inspect

from libs.errors import ConfigError

DATASETS = {
    'digits': 'libs.datasets.digits:Digits',
    'cifar10': 'libs.datasets.cifar10:CIFAR10',
    'celeba': 'libs.datasets.celeba:CelebA',
    'imagenet': 'libs.datasets.imagenet:ImageNet',
    'image_folder': 'libs.datasets.image_folder:ImageFolder',
    # Precomputed autoencoder moments (and CLIP contexts), written by scripts/extract_*.py.
    'imagenet256_features': 'libs.datasets.features:ImageNetFeatures',
    'imagenet512_features': 'libs.datasets.features:ImageNetFeatures',
    'mscoco256_features': 'libs.datasets.features:MSCOCOFeatures',
}

# Fixed arguments implied by the name (the two ImageNet feature sets share one class).
_IMPLIED_KWARGS = {
    'imagenet256_features': {'resolution': 256},
    'imagenet512_features': {'resolution': 512},
}


def get_dataset_class(name):
    """The class registered under `name`; ConfigError for an unknown name."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}.")
    module_name, class_name = DATASETS[name].split(':')
    return getattr(importlib.import_module(module_name), class_name)


def dataset_kwargs(config) -> dict:
    """The keyword arguments of config.dataset's dataset: config.dataset without the keys the engine
    itself reads (name, cfg, p_uncond)."""
    return {k: v for k, v in config.dataset.to_dict().items() if k not in ('name', 'cfg', 'p_uncond')}


def get_dataset(name, **kwargs):
    """Build the dataset `name` (see DATASETS) with its keyword arguments.

    Unknown or misspelled keyword arguments raise ConfigError listing the accepted ones.
    Returns a DatasetBase: .train, .data_shape, .kind, .num_classes (libs/datasets/base.py).
    """
    cls = get_dataset_class(name)
    implied = _IMPLIED_KWARGS.get(name, {})
    problems = [f"implies {key}={value!r}, but config.dataset.{key}={kwargs[key]!r} (remove it or pick the dataset "
                "name that matches)" for key, value in implied.items() if key in kwargs and kwargs[key] != value]
    kwargs = {**implied, **kwargs}
    params = inspect.signature(cls.__init__).parameters
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [p for p in params if p != 'self' and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not takes_var_kwargs:
        problems.append(f"does not take {', '.join(map(repr, unknown))}; it accepts: "
                        f"{', '.join(accepted) or 'no arguments'}"
                        + (" (the FID statistics are config.fid.stat)" if 'fid_stat' in unknown else ""))
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty
               and params[p].kind is not inspect.Parameter.VAR_POSITIONAL and p not in kwargs]
    if missing:
        problems.append(f"needs {', '.join(map(repr, missing))} (set config.dataset.{missing[0]})")
    if problems:
        raise ConfigError(f"dataset {name!r} {'; '.join(problems)}.")
    return cls(**kwargs)


__all__ = ['DATASETS', 'dataset_kwargs', 'get_dataset', 'get_dataset_class']
