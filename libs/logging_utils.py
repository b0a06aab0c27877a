"""Rank-aware logging: a real logger on the main process, silence elsewhere.

Never patches builtins. Every module logs through `logging.getLogger(__name__)`; entry
scripts call `setup_logging` once to attach console and file handlers on rank 0.
"""
import logging
import os
import sys

_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


def setup_logging(is_main_process=True, log_file=None, level=logging.INFO):
    """Configure the root logger. Non-main processes only show warnings and errors."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level if is_main_process else logging.WARNING)
    fmt = logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    # Records logged with extra={'file_only': True} (libs.fatal: the cause of a fatal end, which the script
    # itself prints on stderr) go to the log file alone.
    console.addFilter(lambda record: not getattr(record, 'file_only', False))
    root.addHandler(console)
    if is_main_process and log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    return root


_logged_once = set()


def log_once(logger, msg, level=logging.INFO):
    """Log `msg` the first time it is seen in this process, then never again."""
    if msg in _logged_once:
        return
    _logged_once.add(msg)
    logger.log(level, msg)
