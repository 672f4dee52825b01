"""A node's weights cache folder, reached only through its file descriptor.

The cache is written by the app and may be written by others on the node too. A symbolic link
planted in it (at a file, its ``.partial`` or ``.partial.ranges``, a stamp, a subfolder, or the
model's folder itself) would turn a download into a write anywhere the app can write, and the
clean-up of stale files into a removal anywhere. So the folder the cache lives in is resolved
once (the configured cache may well be a link to a larger disk), and everything below it is
opened relative to a descriptor, one path component at a time, with ``O_NOFOLLOW``: a link is
refused with its name, never followed. Names come from a manifest that ``license_contract``
already checked (relative, no ``..``); each component is opened on its own, so no name can
leave the folder either way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from serve_app.errors import ConfigError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW
_READ_BLOCK = 1 << 20


class CacheError(ConfigError):
    """Something in the weights cache that the app did not put there: it is refused, not used."""

    code = "weights_cache_tampered"


class CacheFolder:
    """A folder of the weights cache, opened once: ``open`` makes one; files are named by
    their ``/``-separated path relative to it. Close it (or use it as a context manager)."""

    def __init__(self, path: Path, fd: int, parent_fd: int) -> None:
        self.path = path
        self._fd, self._parent_fd = fd, parent_fd

    @classmethod
    def open(cls, folder: str | os.PathLike[str], *, within: str | os.PathLike[str] | None = None,
             create: bool = True) -> CacheFolder:
        """Open ``folder``, which lies in ``within`` (default: its parent). ``within`` is
        resolved once; the components from there to ``folder`` are opened without following
        links, and created when ``create``. ``FileNotFoundError`` when it is missing."""
        folder = Path(folder)
        base = folder.parent if within is None else Path(within)
        parts = folder.relative_to(base).parts
        if not parts or any(p in ("..", ".") for p in parts):
            raise ValueError(f"{folder} is not a folder inside {base}")
        if create:
            base.mkdir(parents=True, exist_ok=True)
        fd = os.open(base.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        parent_fd = -1
        try:
            for part in parts:
                if parent_fd >= 0:
                    os.close(parent_fd)
                parent_fd, fd = fd, -1
                fd = _open_dir(parent_fd, part, create, folder)
        except BaseException:
            for open_fd in (fd, parent_fd):
                if open_fd >= 0:
                    os.close(open_fd)
            raise
        return cls(folder, fd, parent_fd)

    def close(self) -> None:
        for fd in (self._fd, self._parent_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._parent_fd = -1

    def __enter__(self) -> CacheFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files by name -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _at(self, name: str, create: bool = False) -> Iterator[tuple[int, str]]:
        """(descriptor of the folder holding ``name``, its last component)."""
        parts = PurePosixPath(name).parts
        if not parts or any(p in ("..", ".", "/") for p in parts):
            raise CacheError(f"{name!r} is not a file name inside {self.path}")
        fd = self._fd
        try:
            for part in parts[:-1]:
                inner = _open_dir(fd, part, create, self.path / name)
                if fd != self._fd:
                    os.close(fd)
                fd = inner
            yield fd, parts[-1]
        finally:
            if fd != self._fd:
                os.close(fd)

    def open_file(self, name: str, flags: int, mode: int = 0o644) -> int:
        """A descriptor of ``name`` (``os.open`` flags; parents created with ``O_CREAT``)."""
        with self._at(name, create=bool(flags & os.O_CREAT)) as (fd, base):
            try:
                return os.open(base, flags | _NOFOLLOW, mode, dir_fd=fd)
            except OSError as exc:
                raise _refusal(exc, self.path / name) from None

    def lstat(self, name: str) -> os.stat_result | None:
        """The status of ``name`` itself (None when missing); a link or anything other than a
        regular file is refused."""
        try:
            with self._at(name) as (fd, base):
                st = os.stat(base, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise _link(self.path / name)
        if not stat.S_ISREG(st.st_mode):
            raise CacheError(f"{self.path / name} is not a regular file; the weights cache "
                             "holds only the files it fetched. Remove it.")
        return st

    def size(self, name: str) -> int | None:
        st = self.lstat(name)
        return None if st is None else st.st_size

    def read_text(self, name: str) -> str | None:
        """The text of ``name``; None when it is missing."""
        try:
            fd = self.open_file(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            return f.read()

    def write_text(self, name: str, text: str) -> None:
        """Replace ``name`` with ``text``: written beside it, then renamed over it, so that a
        reader sees the old text or the new one."""
        temp = f"{name}.{uuid.uuid4().hex}.writing"  # one per writer: two replicas may race
        fd = self.open_file(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        self.replace(temp, name)

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        fd = self.open_file(name, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            while block := f.read(_READ_BLOCK):
                digest.update(block)
        return digest.hexdigest()

    def unlink(self, name: str) -> None:
        """Remove ``name`` if it is there (a link is removed, not what it points to)."""
        try:
            with self._at(name) as (fd, base):
                os.unlink(base, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _refusal(exc, self.path / name) from None

    def replace(self, source: str, target: str) -> None:
        """Rename ``source`` over ``target``; both in one subfolder."""
        src, dst = PurePosixPath(source), PurePosixPath(target)
        if src.parent != dst.parent:
            raise ValueError(f"{source} and {target} are in different folders")
        with self._at(source) as (fd, base):
            os.replace(base, dst.name, src_dir_fd=fd, dst_dir_fd=fd)

    def names(self) -> Iterator[str]:
        """Every file below the folder; a link anywhere in it is refused."""
        yield from self._walk(self._fd, "")

    def _walk(self, fd: int, prefix: str) -> Iterator[str]:
        with os.scandir(fd) as entries:
            found = [(e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in entries]
        for entry, is_dir, is_link in sorted(found):
            name = f"{prefix}{entry}"
            if is_link:
                raise _link(self.path / name)
            if not is_dir:
                yield name
                continue
            inner = _open_dir(fd, entry, False, self.path / name)
            try:
                yield from self._walk(inner, f"{name}/")
            finally:
                os.close(inner)

    # -- the folder's lock, beside it in its parent ---------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while fetching: one download per node, however many replicas."""
        import fcntl

        name = f".{self.path.name}.lock"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644, dir_fd=self._parent_fd)
        except OSError as exc:
            raise _refusal(exc, self.path.parent / name) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _open_dir(fd: int, part: str, create: bool, whole: Path) -> int:
    try:
        return os.open(part, _DIR, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        raise _refusal(exc, whole) from None
    with contextlib.suppress(FileExistsError):
        os.mkdir(part, 0o755, dir_fd=fd)
    try:
        return os.open(part, _DIR, dir_fd=fd)
    except OSError as exc:
        raise _refusal(exc, whole) from None


def _refusal(exc: OSError, path: Path) -> OSError | CacheError:
    # O_NOFOLLOW on a link answers ELOOP; O_DIRECTORY on a file (or on a link, for some
    # kernels) ENOTDIR.
    if exc.errno == errno.ELOOP:
        return _link(path)
    if exc.errno == errno.ENOTDIR:
        return CacheError(f"A path to {path} passes through something that is not a folder "
                          "(a file or a symbolic link planted in the weights cache). Remove it.")
    return exc


def _link(path: Path) -> CacheError:
    return CacheError(f"{path} (or a folder on its way) is a symbolic link: the weights cache "
                      "holds only the files it fetched and follows no link. Remove it; the next "
                      "start fetches what is missing.")
