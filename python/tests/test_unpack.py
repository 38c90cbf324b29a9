"""Unpacking refuses every entry that would land outside the directory (no server needed)."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import List, Tuple

import pytest

from jobrelay import UnsafeArchive
from jobrelay._unpack import unpack

Entry = Tuple[str, bytes, int]


def make_zip(path: Path, entries: List[Entry]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


FILE = stat.S_IFREG | 0o644
LINK = stat.S_IFLNK | 0o777


def test_a_plain_archive_unpacks_with_modes_and_inside_links(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "ok.zip",
        [
            ("run.sh", b"#!/bin/sh\n", stat.S_IFREG | 0o755),
            ("out/a.txt", b"a", FILE),
            ("out/link", b"a.txt", LINK),
            ("top", b"out/a.txt", LINK),
        ],
    )
    dest = tmp_path / "dest"
    written = unpack(archive, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == ["out/a.txt", "run.sh"]
    assert os.stat(dest / "run.sh").st_mode & 0o777 == 0o755
    assert (dest / "out" / "link").read_text() == "a"
    assert os.readlink(dest / "top") == "out/a.txt"


@pytest.mark.parametrize(
    "entries",
    [
        [("../evil.txt", b"x", FILE)],
        [("ok.txt", b"x", FILE), ("a/../../evil.txt", b"x", FILE)],
        [("/tmp/evil.txt", b"x", FILE)],
        [("C:/evil.txt", b"x", FILE)],
        [("a\\..\\..\\evil.txt", b"x", FILE)],
        [("ok.txt", b"x", FILE), ("link", b"../outside", LINK)],
        [("sub/link", b"../../outside", LINK)],
        [("link", b"/etc/passwd", LINK)],
        # Each link alone stays inside by depth; together a -> b/c/../.. with b -> . leaves.
        [("b", b".", LINK), ("a", b"b/c/../..", LINK)],
    ],
    ids=[
        "dotdot",
        "dotdot-deep",
        "absolute",
        "drive",
        "backslash",
        "link-climbs",
        "link-climbs-deep",
        "link-absolute",
        "links-combine-to-leave",
    ],
)
def test_hostile_entries_refuse_the_whole_archive(tmp_path: Path, entries: List[Entry]) -> None:
    archive = make_zip(tmp_path / "bad.zip", entries)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest)
    assert not dest.exists(), "nothing is written, not even the directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_nothing_is_written_through_a_link_already_there(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "out").symlink_to(outside)
    archive = make_zip(tmp_path / "a.zip", [("out/x.txt", b"x", FILE)])
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest)
    assert list(outside.iterdir()) == []

    (dest / "file").symlink_to(outside / "target")
    archive = make_zip(tmp_path / "b.zip", [("file", b"x", FILE)])
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest)
    assert not (outside / "target").exists()
