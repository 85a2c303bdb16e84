"""Output folders that a command writes whole: created, or replaced only when they are its own.

``graphgen build --out`` and ``runtimes export --hf`` both write a folder in a
temporary sibling and swap it into place, so a failed write never leaves half a
folder behind. The target is replaced only when it is empty, or when it is a
folder of the same kind (a marker file of ours says so and lists every file it
holds) holding nothing else (``force`` also accepts unknown extra files there).
Anything else is a user's folder and is refused untouched, checked once before
writing and again just before the swap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError


class OutputFolderError(OutputError):
    """The output folder cannot be (re)placed: a user's folder, a file, or not writable. Nothing was touched."""


@dataclass(frozen=True)
class FolderKind:
    marker: str  # file name in the folder: JSON with "format" and "files" (name -> anything)
    format: str  # the marker's "format" value
    noun: str  # "an artifact folder"
    option: str  # the command-line option naming the folder, for messages
    verb: str = "build"  # "files it did not <verb>"


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_out_folder(out: Path, kind: FolderKind, force: bool = False) -> None:
    """Raise OutputFolderError unless ``out`` may be created or replaced.

    Replaceable: a missing path, an empty folder, or a folder whose marker file is
    of ``kind`` and which holds only the files the marker lists (with ``force``,
    other files too). A symbolic link is refused rather than followed: replacing
    it would swap the link, not the folder it names.
    """
    opt = kind.option
    if out.is_symlink():
        raise OutputFolderError(f"{opt} {out} is a symbolic link; give the folder's real path ({out.resolve()})")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"{opt} {out} is an existing file, not a folder; nothing was written")
    try:
        entries = os.listdir(out)
    except OSError as e:
        raise OutputFolderError(f"{opt} {out} cannot be read: {e.strerror or e}") from None
    if not entries:
        return
    marker = None
    try:
        with open(out / kind.marker, "rb") as f:
            marker = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        pass
    listed = marker.get("files") if isinstance(marker, dict) and marker.get("format") == kind.format else None
    if not isinstance(listed, dict):
        raise OutputFolderError(
            f"{opt} {out} is not empty and is not {kind.noun} (it holds {_describe(entries)}); "
            f"nothing was touched: choose an empty or new folder"
        )
    extra = [e for e in entries if e != kind.marker and e not in listed]
    if extra and not force:
        raise OutputFolderError(
            f"{opt} {out} is {kind.noun} that also holds files it did not {kind.verb} ({_describe(extra)}); "
            f"nothing was touched: move them away, or pass --force to replace the folder with them"
        )


def make_temp_sibling(out: Path, kind: FolderKind) -> Path:
    """A new empty folder beside ``out`` to write into (OutputFolderError when its parent cannot take one)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise OutputFolderError(f"{kind.option} {out}: cannot create a folder in {out.parent}: {e.strerror or e}") from None
    tmp.chmod(0o755)
    return tmp


def swap_in(tmp: Path, out: Path, kind: FolderKind, force: bool) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing what check_out_folder allows."""
    check_out_folder(out, kind, force)  # again: the folder may have changed while it was written
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
