"""Unpacks a result ZIP into a directory without letting any entry land outside it.

Every name is checked before anything is written: an absolute name, a drive letter, a
backslash, a NUL or a ``..`` component refuses the whole archive, and so does a symbolic link
whose target is absolute or climbs above the directory. Links are created last, and nothing
is ever written through a link (one already in the directory included).
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import List, Tuple

from ._errors import UnsafeArchive

_COPY_CHUNK = 1024 * 1024


def _relative(name: str) -> PurePosixPath:
    """The entry's path inside the directory, or UnsafeArchive."""
    trimmed = name[:-1] if name.endswith("/") else name
    bad = (
        not trimmed
        or trimmed.startswith("/")
        or "\\" in trimmed
        or "\0" in trimmed
        or (len(trimmed) > 1 and trimmed[1] == ":")
    )
    parts = [p for p in trimmed.split("/") if p not in ("", ".")]
    if bad or not parts or ".." in parts:
        raise UnsafeArchive(f"refusing the archive: entry {name!r} would land outside the directory")
    return PurePosixPath(*parts)


def _link_stays_inside(link: PurePosixPath, target: str) -> bool:
    """A link may climb (``..``) only at the start of its target and no higher than its own
    directory, then only descend: counting depth alone lets links combine to leave
    (``a -> b/c/../..`` with ``b -> .``), as the CLI's unpack rule says."""
    if not target or target.startswith("/") or "\0" in target or "\\" in target:
        return False
    depth = len(link.parts) - 1
    descended = False
    for part in target.split("/"):
        if part == "..":
            if descended:
                return False
            depth -= 1
        elif part not in ("", "."):
            descended = True
            depth += 1
        if depth < 0:
            return False
    return True


def _no_link_on_the_way(root: Path, relative: PurePosixPath) -> Path:
    """The destination path; refuses when any existing component (the last included) is a link."""
    current = root
    for part in relative.parts:
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                raise UnsafeArchive(f"refusing to write through the symbolic link {current}")
        except FileNotFoundError:
            pass
    return current


def unpack(archive: Path, dest: Path) -> List[Path]:
    """Unpacks ``archive`` into ``dest`` (created if missing); returns the files written."""
    with zipfile.ZipFile(archive) as zf:
        dirs: List[PurePosixPath] = []
        files: List[Tuple[zipfile.ZipInfo, PurePosixPath, int]] = []
        links: List[Tuple[PurePosixPath, str]] = []
        for info in zf.infolist():
            relative = _relative(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                target = zf.read(info).decode("utf-8", "replace")
                if not _link_stays_inside(relative, target):
                    raise UnsafeArchive(
                        f"refusing the archive: link {info.filename!r} -> {target!r} leaves the directory"
                    )
                links.append((relative, target))
            elif info.is_dir():
                dirs.append(relative)
            else:
                files.append((info, relative, mode))

        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for relative in dirs:
            _no_link_on_the_way(root, relative).mkdir(parents=True, exist_ok=True)
        written: List[Path] = []
        for info, relative, mode in files:
            _no_link_on_the_way(root, relative.parent)
            path = _no_link_on_the_way(root, relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            perms = (mode & 0o777) or 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, perms)
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
            os.chmod(path, perms)
            written.append(path)
        for relative, target in links:
            path = _no_link_on_the_way(root, relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(target, path)
            except FileExistsError as e:
                raise UnsafeArchive(f"refusing to replace {path} by a link") from e
        return written
