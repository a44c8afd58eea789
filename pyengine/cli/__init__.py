"""The ``pyengine`` command line: ``compress``, ``eval``, ``inspect``, ``bench`` and ``demo``.

Every command has ``--help``. Mistakes of the user (a missing model path, recipe values out of
range, ``--device cuda`` without a GPU, matplotlib missing for a plot, an output path that
cannot be written, a corrupt checkpoint, ...) end with one line on stderr and exit code 2; output
paths are checked before any work starts (pyengine.cli.checks). Set ``PYENGINE_DEBUG=1`` to see
the traceback instead. Long steps show progress bars on stderr (``--no-progress`` or
``PYENGINE_NO_PROGRESS=1`` turns them off).

One module per command (compress, eval, inspect, bench, demo: each a ``cmd_*`` function), the
parser (parser.py) and its shared option groups (args.py), what the commands share
(common.py) and the input and output checks (checks.py). Loading a model spec is library code:
pyengine.model.sources.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import torch

from .args import EXIT_USAGE
from .checks import UsageError
from .parser import build_parser

__all__ = ["build_parser", "main", "UsageError"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``pyengine`` with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_progress:
        os.environ["PYENGINE_NO_PROGRESS"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        if os.environ.get("PYENGINE_NO_PROGRESS"):
            transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        if os.environ.get("PYENGINE_DEBUG"):
            raise
        print(f"pyengine {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"pyengine {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
