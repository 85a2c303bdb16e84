"""Files the builder and the runners write and read: hashes and atomic replacement.

Writes are atomic: the bytes go to a temporary file in the target's folder
(``.<name>.<pid>.<random>.tmp``), which is fsynced, renamed over the target,
and the folder fsynced. A crash at any point leaves either the old file or the
new one, never half of one, and a symbolic link at the target is replaced, not
followed; the next write to the same path removes temporary files that crashed
writers left (those whose process no longer exists). A write that fails (disk
full, read-only, the folder is a file) raises OutputError and leaves the target
as it was. Nothing is ever written into an artifact folder: runners only read
them (see manifest.artifact_folder_holding).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from .errors import OutputError
from .manifest import artifact_folder_holding

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: new files get 0666 & ~umask, like open() would give them


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Delete ``.<name>.<pid>.*.tmp`` left by writers that died (SIGKILL, power loss)."""
    prefix = f".{name}."
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid_text = entry[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # its writer is alive (or the pid was reused): leave it
            except ProcessLookupError:
                pass
            except OSError:
                continue
        try:
            os.unlink(os.path.join(folder, entry))
        except OSError:
            pass


def _write_failed(path: Path, e: OSError) -> OutputError:
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    why = f"{e.strerror or e}" + (f" ({code})" if code else "")
    kept = "the previous file is intact" if path.exists() else "nothing was written"
    hint = "; free some space or choose another output folder" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return OutputError(f"could not write {path}: {why}; {kept}{hint}")


def refuse_artifact_folder(path: Path, what: str = "") -> None:
    """OutputError when ``path`` is an artifact folder or lies inside one (see artifact_folder_holding)."""
    art = artifact_folder_holding(path)
    if art is not None:
        raise OutputError(
            f"{what or 'will not write'} {path}: it is inside the artifact folder {art}, which runners only read "
            f"(a file written there would break its manifest); choose an output path outside it"
        )


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring); OutputError on failure."""
    path = Path(path)
    folder = path.parent
    refuse_artifact_folder(path)
    _remove_stale_temps(folder, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise _write_failed(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_failed(path, e) from None
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # folders some filesystems cannot fsync
            raise _write_failed(path, e) from None
