"""Where a command may write: the one rule for output paths, checked before any work (no torch import).

Every writer (``quantize``, ``export``, ``import-awq``, ``eval --output``, ``GraceTrainer``'s ``output_dir``) calls
:func:`check_output`, so an output that would replace, sit inside or contain its own source is refused the same
way everywhere, and so is a missing parent folder or one we cannot write in.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that must not be written (the CLI prints it as one line, exit code 2)."""


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def source_problem(out: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """Why writing ``out`` would damage ``source`` (equal, inside it, or containing it), or None."""
    target, src = _real(out), _real(source)
    if target == src:
        return f"the output {out} is the source {source} itself; writing it would replace the source"
    if src in target.parents:
        return f"the output {out} lies inside the source {source}; the source would then hold its own output"
    if target in src.parents:
        return f"the output {out} contains the source {source}; replacing it would delete the source"
    return None


def check_output(
    out: str | os.PathLike,
    *,
    sources: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    kind: str = "folder",
) -> Path:
    """Refuse an output path that cannot be written safely; returns it as a ``Path``.

    ``kind="folder"``: an existing ``out`` needs ``overwrite``; ``kind="file"``: ``out`` must not be a folder (files
    are replaced atomically). Always: not equal to, inside or around a source, and a parent folder we can write in.
    """
    out = Path(out)
    for source in sources:
        if source is not None and (problem := source_problem(out, source)) is not None:
            raise OutputPathError(f"{problem}; choose an output outside {source}")
    if kind == "folder" and out.exists() and not overwrite:
        raise OutputPathError(
            f"{out} already exists; choose another output folder or pass overwrite=True (--overwrite)"
        )
    if kind == "folder" and out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} exists and is not a folder")
    if kind == "file" and out.is_dir():
        raise OutputPathError(f"{out} is a folder; give the path of a file to write")
    parent = _real(out).parent
    if not parent.is_dir():
        raise OutputPathError(f"the parent folder of {out} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write in {parent} (permission denied); choose another output")
    return out


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder ``parent/prefix<random>`` with the permissions the umask gives (``mkdtemp`` gives 0700,
    so a folder renamed into place from it would be unreadable by other users and services)."""
    while True:
        path = Path(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


__all__ = ["OutputPathError", "check_output", "make_temp_dir", "source_problem"]
