"""Command-line flags of the tools and feature scripts: absl flags with underscores, as the entry
scripts, parsed into a fresh FlagValues per call so that `main(argv)` also runs from Python (tests)."""
import sys

from absl import flags

from libs.errors import ConfigError


def define_resolution(fv, help_string):
    """--resolution in pixels, a multiple of 8 (the autoencoder's downsampling), checked as it is parsed."""
    flags.DEFINE_integer("resolution", 256, help_string, flag_values=fv)
    flags.register_validator("resolution", lambda r: r % 8 == 0, "--resolution must be a multiple of 8",
                             flag_values=fv)


def define_repa_encoder(fv):
    """--repa_encoder, --repa_weights, --repa_resolution, --repa_dtype of the feature extraction scripts: also
    store a frozen encoder's patch features for representation alignment (libs/repa.py)."""
    flags.DEFINE_string("repa_encoder", "", "also store this encoder's patch features (config.repa.encoder: "
                        "dinov2_vitb14, 'timm:<name>', ...); '' = none", flag_values=fv)
    flags.DEFINE_string("repa_weights", "", "its weights file (config.repa.weights; '' = the torch hub cache)",
                        flag_values=fv)
    flags.DEFINE_integer("repa_resolution", 224, "its input size (config.repa.resolution)", flag_values=fv)
    flags.DEFINE_enum("repa_dtype", "float16", ("float32", "float16"), "storage precision of its features",
                      flag_values=fv)


def parse_flags(define, argv, doc, positional=()):
    """Declare the flags with `define(fv)` and parse `argv` (the arguments after the program name;
    None: sys.argv[1:]). Returns (fv, the positional arguments, as many as `positional` names;
    positional=None: any number).

    --help prints `doc` and the flags, then exits with status 0; an unknown, malformed or missing
    required flag, or a wrong number of positional arguments, raises ConfigError.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    fv = flags.FlagValues()
    define(fv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        own = "\n".join(fv.module_help(m) for m in fv.flags_by_module_dict() if not m.startswith("absl."))
        sys.stdout.write(f"{doc}\nflags:\n{own}\n")
        raise SystemExit(0)
    try:
        rest = fv([sys.argv[0], *argv])
    except flags.Error as e:
        raise ConfigError(f"{e} Run with --help for the flags.") from e
    rest = rest[1:]
    if positional is not None and len(rest) != len(positional):
        wanted = f"{len(positional)} ({', '.join(positional)})" if positional else "no"
        raise ConfigError(f"expected {wanted} arguments besides the flags, got {len(rest)}: {' '.join(rest)}. "
                          f"Flags are written --name=value; run with --help for them.")
    return fv, rest
