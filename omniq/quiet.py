"""Silencing the libraries omniq drives, for the length of one call, and restoring them after.

transformers, datasets and the ONNX exporter log lines and progress bars about things omniq reports itself
in one line (or expects, like an Omni checkpoint's tower tensors being "unexpected" to the language model).
`quiet` sets their levels for a block and puts back exactly what was there, so a caller's own logging
configuration survives. Heavy libraries are imported only when asked for (`transformers=True`).
"""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet(*loggers: str, level: int = logging.CRITICAL, transformers: bool = False, progress_bar: bool = False):
    """Raise the named standard loggers to `level`; with `transformers`, its verbosity to errors only; with
    `progress_bar`, transformers' / huggingface_hub's progress bars off."""
    saved = [(log, log.level) for log in map(logging.getLogger, loggers)]
    for log, _ in saved:
        log.setLevel(level)
    hf_logging = verbosity = None
    bar_was_enabled = False
    if transformers or progress_bar:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        if transformers:
            hf_logging.set_verbosity_error()
        if progress_bar:
            hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hf_logging is not None:
            hf_logging.set_verbosity(verbosity)
            if progress_bar and bar_was_enabled:
                hf_logging.enable_progress_bar()
        for log, was in saved:
            log.setLevel(was)
