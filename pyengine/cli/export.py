"""``pyengine export --format compressed-tensors|gptq DIR OUT``."""

from __future__ import annotations

import argparse

from .checks import UsageError, check_output_dir


def cmd_export(args: argparse.Namespace) -> int:
    """Writes checkpoint ``args.checkpoint`` to ``args.out`` in ``args.format``
    (pyengine.io.export) and prints what changed."""
    from ..io.checks import CheckpointError
    from ..io.export import ExportError, export_checkpoint
    source = args.checkpoint.expanduser()
    if not source.is_dir():
        raise UsageError(f"{source}: not a directory (give a checkpoint of 'pyengine compress')")
    out = check_output_dir(args.out, "OUT")
    try:
        report = export_checkpoint(source, out, args.format,
                                   progress=not getattr(args, "no_progress", False))
    except (ExportError, CheckpointError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    print(report.summary())
    return 0
