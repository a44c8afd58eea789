"""Checks of the ``pyengine`` command line's inputs and outputs, made before any work starts.

Output paths (``compress --out``, ``--json``, ``inspect --plot``, ``demo --save``) are checked
for writability up front, so that a mistake costs one line on stderr rather than the result of
minutes of planning and compression. Everything here raises :class:`UsageError`, which
``pyengine.cli.main`` prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional


class UsageError(Exception):
    """A mistake of the user: reported as one line on stderr, exit code 2."""


# ---- argparse types --------------------------------------------------------------------------

def int_at_least(minimum: int, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got "
                                             f"{text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    return parse


def positive_int_list(text: str) -> List[int]:
    """An argparse type: comma-separated positive integers (e.g. ``--m 1,16``)."""
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got "
                                             f"{text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers, got {value}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one positive integer")
    return values


# ---- output paths ------------------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(directory: Path, flag: str, target: Path) -> None:
    """UsageError unless a file can be created in the existing ``directory``: tried for real
    (a temporary file, removed at once), so read-only file systems and ACLs count as well as
    permission bits."""
    if not directory.is_dir():
        raise UsageError(f"{flag} {target}: {directory} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pyengine-write-test-", dir=directory)
    except OSError as exc:
        raise UsageError(f"{flag} {target}: cannot write in {directory} "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Optional[Path], flag: str) -> Optional[Path]:
    """Checks that the file ``path`` (given with option ``flag``) can be written: an existing
    file must be writable, a new one must be creatable in its nearest existing ancestor
    (missing directories are created when it is written). Returns the path; None passes."""
    if path is None:
        return None
    path = path.expanduser()
    if path.exists():
        if path.is_dir():
            raise UsageError(f"{flag} {path}: is a directory; give a file name")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: the file exists and is not writable")
        return path
    _check_writable_dir(_nearest_existing(path.parent), flag, path)
    return path


def check_output_dir(path: Optional[Path], flag: str) -> Optional[Path]:
    """Checks that directory ``path`` (option ``flag``) can be written into: an existing one
    directly, a new one in its nearest existing ancestor (it is not created here, so a run that
    fails or is interrupted leaves nothing behind). Returns the path; None passes."""
    if path is None:
        return None
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    _check_writable_dir(path if path.exists() else _nearest_existing(path), flag, path)
    return path


def check_plot_file(path: Optional[Path], flag: str = "--plot") -> Optional[Path]:
    """check_output_file, plus: matplotlib is installed and can write the file's format (its
    suffix, e.g. .png, .pdf, .svg)."""
    if path is None:
        return None
    try:
        import matplotlib  # noqa: F401  (first: plot_layers imports it by this name)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise UsageError(f"{flag} {path}: needs matplotlib (pip install matplotlib, or "
                         f"pip install 'pyengine[demo]')") from None
    formats = sorted(FigureCanvasAgg.get_supported_filetypes())
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise UsageError(f"{flag} {path}: the file name must end in one of "
                         f"{', '.join('.' + f for f in formats)} (the plot's format)")
    return check_output_file(path, flag)


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path``, creating missing parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
