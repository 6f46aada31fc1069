"""How purenn writes files: atomically, next to the target, with a normal file's mode.

Every file purenn writes (``PurifiedModel.save``, ``export_onnx``, figures) goes through
:func:`atomic_write`:

- The target is checked first: its directory must exist (a :class:`~purenn.errors.ConfigError`
  names it otherwise) and it must not be a directory.
- A symbolic link is written through: the file it points to is replaced, the link stays.
- The data goes to a temporary file in the target's directory named
  ``.NAME.purenn-tmp-<pid>-<random>``, which is renamed onto the target once complete (fsynced), so
  the target appears complete or not at all, and an existing target stays as it was if writing fails.
- The new file gets the mode a plain ``open(path, "w")`` would give it: an existing target's mode
  is kept, a new file gets ``0o666`` less the umask.
- Temporary files that a killed run left behind (same target, purenn's pattern, and a process id
  that is not alive on this machine) are removed by the next write to that target. Files of a live
  process, of other targets, or not named by purenn are never touched (nor, on Windows, any: there
  a process cannot be probed safely).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from purenn.errors import ConfigError

__all__ = ["TEMP_TAG", "PendingWrite", "begin_write", "atomic_write", "write_chunks", "temp_path", "stale_temps",
           "resolve_target", "as_path"]

#: the part of a temporary file's name that marks it as purenn's
TEMP_TAG = ".purenn-tmp-"
_CHUNK = 1 << 22
#: private test hook: called as ``hook(tmp_path, bytes_written)`` after every chunk :func:`write_chunks` writes
_write_hook: Callable[[Path, int], None] | None = None


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}{re.escape(TEMP_TAG)}(\d+)-[0-9a-f]{{16}}")


def temp_path(target: Path) -> Path:
    """A fresh temporary path next to ``target``: ``.NAME.purenn-tmp-<pid>-<16 hex digits>``."""
    return target.with_name(f".{target.name}{TEMP_TAG}{os.getpid()}-{secrets.token_hex(8)}")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (this process counts as alive)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would terminate it: never assume dead
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to someone else
        return True
    return True


def stale_temps(target: Path) -> list[Path]:
    """purenn's temporary files for ``target`` whose writing process no longer runs."""
    pattern = _pattern(target.name)
    out = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
            out.append(Path(entry.path))
    return out


def as_path(path: object, what: str = "path") -> Path:
    """``path`` (a ``str`` or ``os.PathLike``) as a :class:`Path`, else a :class:`ConfigError`."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ConfigError(f"{what} must be a file path (str or pathlib.Path), got {path!r}.")
    return Path(path)


def resolve_target(path: str | os.PathLike, what: str = "file") -> Path:
    """The file a write to ``path`` replaces (a symlink's target), after checking it can be written."""
    given = as_path(path)
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    if target.is_dir():
        raise ConfigError(f"{str(given)!r} is a directory; give a {what} name inside it.")
    parent = target.parent
    if not parent.is_dir():
        raise ConfigError(
            f"cannot write {str(given)!r}: the directory {str(parent)!r} does not exist; create it first."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {str(given)!r}: the directory {str(parent)!r} is not writable.")
    return target


class PendingWrite:
    """A write in progress: ``tmp`` is the temporary path to fill, then :meth:`commit` renames it onto
    the target (or :meth:`discard` removes it). Made by :func:`begin_write`."""

    def __init__(self, path: str | os.PathLike, what: str = "file") -> None:
        self.path = path
        self.target = resolve_target(path, what)
        for old in stale_temps(self.target):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        self.tmp = temp_path(self.target)

    def commit(self) -> None:
        """Give the temporary file the target's mode (or a new file's), fsync it, rename it onto the target."""
        if not self.tmp.is_file():
            raise ConfigError(f"nothing was written for {str(self.path)!r}.")
        try:
            mode = stat.S_IMODE(os.stat(self.target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(self.tmp, mode)
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        """Remove the temporary file, if any; the target stays as it was."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def begin_write(path: str | os.PathLike, what: str = "file") -> PendingWrite:
    """Check ``path``, remove stale temporary files for it, and return a :class:`PendingWrite`."""
    return PendingWrite(path, what)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path to write; on normal exit it replaces the target (see the module docstring).

    On an exception the temporary file is removed and the target is left as it was.

    Example:
        >>> with atomic_write("out.bin") as tmp:           # doctest: +SKIP
        ...     _ = tmp.write_bytes(b"data")
    """
    pending = begin_write(path, what)
    try:
        yield pending.tmp
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def write_chunks(path: str | os.PathLike, chunks: Iterable[bytes | memoryview], what: str = "file") -> Path:
    """Write ``chunks`` to ``path`` with :func:`atomic_write`; returns the target written."""
    with atomic_write(path, what) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        written = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                view = memoryview(chunk)
                for s in range(0, len(view), _CHUNK):
                    part = view[s : s + _CHUNK]
                    f.write(part)
                    written += len(part)
                    if _write_hook is not None:
                        f.flush()
                        _write_hook(tmp, written)
    return Path(path)


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # fallback: briefly set and restore (not thread-safe, hence last)
    os.umask(old)
    return old
