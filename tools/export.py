"""Export a training checkpoint's EMA network as a self-describing folder (safetensors + config.json + card).

    python tools/export.py workdir/cifar10_uvit_small/default/ckpts/500000.ckpt exports/cifar10_uvit_small
    python tools/export.py assets/imagenet256_uvit_large.pth exports/in256_l2 \\
        --config=configs/imagenet256_uvit_large.py --step=300000
    python tools/export.py <checkpoint> <out_dir> --push_to_hub --hub_model_id=<user>/<name>

The network is described by --config (a config file, --config.a.b=value overrides allowed) or, by
default, by the config the weights carry (a checkpoint's own, or the <stem>.config.json beside a .pth that
tools/posthoc_ema.py writes); a --config contradicting it is refused. The folder is
written atomically; an existing one is replaced only with --overwrite. --push_to_hub uploads it to
the Hugging Face Hub (needs the network and a token); nothing is uploaded otherwise.
"""
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from libs.config_utils import define_config_flag
from libs.errors import ConfigError, exit_on_user_error, require_path
from libs.export import config_of_weights, export_model, push_to_hub
from libs.logging_utils import setup_logging

logger = logging.getLogger(__name__)


def define_flags():
    define_config_flag("config", None, "training config file (configs/X.py); default: the config saved with the "
                       "checkpoint")
    flags.DEFINE_integer("step", None, "training step recorded in config.json; default: from the checkpoint directory")
    flags.DEFINE_bool("overwrite", False, "replace an existing export in <out_dir>")
    flags.DEFINE_bool("push_to_hub", False, "upload the folder to the Hugging Face Hub (needs --hub_model_id)")
    flags.DEFINE_string("hub_model_id", None, "Hub repository, <user or org>/<name>")
    flags.DEFINE_bool("hub_private", False, "create the Hub repository as private")


@exit_on_user_error
def main(argv):
    setup_logging(True)
    if len(argv) != 3:
        raise ConfigError("usage: python tools/export.py <checkpoint (ckpts/<step>.ckpt or .pth)> <out_dir> [flags]")
    checkpoint, out_dir = argv[1:]
    require_path(checkpoint, "checkpoint", "Give a ckpts/<step>.ckpt directory or a .pth state dict.")
    f = flags.FLAGS
    if f.push_to_hub and not f.hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id=<user or org>/<name>")
    config = f.config if f.config is not None else config_of_weights(checkpoint, "checkpoint")
    folder = export_model(checkpoint, out_dir, config, step=f.step, overwrite=f.overwrite)
    if f.push_to_hub:
        push_to_hub(folder, f.hub_model_id, private=f.hub_private)


if __name__ == "__main__":
    define_flags()
    app.run(main)
