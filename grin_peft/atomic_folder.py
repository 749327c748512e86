"""Saving a delta folder as one unit: written beside the target, then swapped in with one rename.

Guarantee (local filesystems): after `save_folder` returns, the folder holds exactly the new save; if the process
dies at any point before, it holds exactly what it held before (or does not exist, if it did not). On Linux the
swap of an existing folder is one `renameat2(RENAME_EXCHANGE)` call, so a reader never finds the folder missing;
elsewhere it is two renames: a reader can find it missing for an instant, and a kill in that instant leaves the
previous version in `.<name>.grin-old-*` beside it. A reader that reads the config before a swap and the weights
after it gets a mismatched pair: the manifest written with every save (`integrity`) makes that a clear error, never
a silent load. Temporary folders of killed saves are removed by the next save beside them.

Saving into the working directory itself (`save_pretrained(".")`) writes in place instead: each file atomically,
with the manifest to detect a mixed pair. Files and folders follow the user's umask, as a plain open/mkdir would
(temporary files and folders are created 0600/0700, and safetensors 0.8 writes its files 0600).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import GrinError

TMP_MARK = ".grin-tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored at once."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by mkstemp/mkdtemp the permissions a plain open/mkdir would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def apply_umask_tree(folder: str | os.PathLike) -> None:
    """`apply_umask` to a folder and everything in it: libraries differ (safetensors 0.8 writes files 0600)."""
    apply_umask(folder, directory=True)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            apply_umask(os.path.join(root, name), directory=True)
        for name in files:
            apply_umask(os.path.join(root, name))


def temporary_name(target: Path) -> str:
    """Prefix of the temporary folders of saves into `target`; the pid tells whether their save is still alive."""
    return f".{target.name}{TMP_MARK}{os.getpid()}-"


def clean_stale(target: Path) -> list[Path]:
    """Remove temporary folders left beside `target` by saves whose process no longer runs; returns them."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}{re.escape(TMP_MARK)}(\d+)-")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the OS or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _carry_over(old: Path, new: Path) -> None:
    """Keep what the folder held besides this save (a tokenizer, other adapters): hard links, not copies."""
    for entry in old.iterdir():
        if (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run `write(temporary_folder)` and make its result `target` in one step (see the module docstring).

    A target that is this process's working directory (or holds it) cannot be swapped out from under it: there the
    files are written in place, each one atomically, and the manifest tells a mixed pair at load.
    """
    if Path(target).exists() and not Path(target).is_dir():
        raise GrinError(f"{target} is a file; a delta is saved into a directory.")
    target = Path(os.path.realpath(target))  # a symlinked folder: swap the folder, keep the link
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        write(target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    work = Path(tempfile.mkdtemp(prefix=temporary_name(target), dir=target.parent))
    apply_umask(work, directory=True)
    try:
        write(work)
        apply_umask_tree(work)
        if target.is_dir():
            _carry_over(target, work)
        _fsync_tree(work)
        _publish(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _publish(work: Path, target: Path) -> None:
    """Move the finished folder to `target`; an existing target is swapped out and removed."""
    if not target.exists():
        try:
            os.rename(work, target)
            return
        except OSError:
            if not target.is_dir():
                raise
    if _exchange(work, target):
        shutil.rmtree(work, ignore_errors=True)  # `work` now holds the previous version
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.grin-old-", dir=target.parent))  # never cleaned: a kill
    os.rmdir(old)  # between the two renames leaves the previous version here, to rename back
    os.rename(target, old)
    os.rename(work, target)
    shutil.rmtree(old, ignore_errors=True)
