"""What ``submit`` uploads: paths and directories expanded into (name in the job, source)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, List, Mapping, Sequence, Set, Union

PathLike = Union[str, "os.PathLike[str]"]
#: A file or directory, several of them, or explicit names in the job mapped to a path or an
#: open binary file (``{"run.sh": "/tmp/upload-1", "inputs/a.pdb": request.FILES["pdb"]}``).
Files = Union[PathLike, Sequence[PathLike], Mapping[str, Union[PathLike, IO[bytes]]]]


@dataclass(frozen=True)
class Upload:
    """One file of a job: its name in the work directory and where its bytes come from."""

    name: str
    source: Union[Path, IO[bytes]]


def check_name(name: str) -> None:
    """The server's rules for a name, checked before anything is sent (it checks again)."""
    if not name:
        raise ValueError("file name is empty")
    if "\0" in name or "\\" in name:
        raise ValueError(f"file name {name!r} contains a NUL byte or a backslash")
    if name.startswith("/"):
        raise ValueError(f"file name {name!r} is absolute")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"file name {name!r} has an empty, '.' or '..' component")


def _walk(root: Path) -> List[Upload]:
    """A directory's regular files (links to files followed, linked directories not entered,
    so a loop cannot trap the walk) under their paths relative to it, sorted."""
    found: List[Upload] = []
    for here, dirs, names in os.walk(root):
        dirs.sort()
        base = Path(here)
        for name in sorted(names):
            path = base / name
            if path.is_file():
                found.append(Upload(path.relative_to(root).as_posix(), path))
    return found


def collect(files: Files) -> List[Upload]:
    """Expands ``files`` as the CLI does: a file goes under its own name, a directory's files
    under their paths relative to it. Refuses a name twice, or a name that is both a file and
    a directory, before a byte is sent."""
    uploads: List[Upload] = []
    if isinstance(files, Mapping):
        for name, source in files.items():
            uploads.append(Upload(name, Path(source) if isinstance(source, (str, os.PathLike)) else source))
    else:
        paths: Sequence[PathLike] = [files] if isinstance(files, (str, os.PathLike)) else files
        for entry in paths:
            path = Path(entry)
            if path.is_dir():
                uploads.extend(_walk(path))
            elif path.is_file():
                uploads.append(Upload(path.name, path))
            else:
                raise FileNotFoundError(f"no file or directory {str(path)!r}")
    if not uploads:
        raise ValueError("nothing to upload: a job needs at least run.sh")
    names: Set[str] = set()
    dirs: Set[str] = set()
    for upload in uploads:
        check_name(upload.name)
        parents = {upload.name[:i] for i, c in enumerate(upload.name) if c == "/"}
        if upload.name in names or upload.name in dirs or parents & names:
            raise ValueError(f"file name {upload.name!r} is repeated or clashes with a directory")
        names.add(upload.name)
        dirs |= parents
    return uploads
