"""Fixtures: a real `jobrelay up` on an ephemeral port for the whole session, and job
directories written by the tests.

The binary is ``$JOBRELAY_BIN``, else ``$CARGO_TARGET_DIR/debug/jobrelay``, else the
repository's ``target/debug/jobrelay`` (``cargo build -p jobrelay``); the tests that need it
skip, saying so, when there is none.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def find_binary() -> Optional[Path]:
    candidates = []
    if os.environ.get("JOBRELAY_BIN"):
        candidates.append(Path(os.environ["JOBRELAY_BIN"]))
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "jobrelay")
    candidates.append(REPO / "target" / "debug" / "jobrelay")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class Server:
    """A running `jobrelay up` (or the `jobrelay` command of ``args``, which prints its
    "listening on" address too), stopped by its pid."""

    def __init__(self, binary: Path, data_dir: Path, args: Optional[List[str]] = None) -> None:
        argv = args or ["up", "--port", "0", "--slots", "4", "--data-dir", str(data_dir)]
        self.process = subprocess.Popen(
            [str(binary), *argv],
            stdout=subprocess.PIPE,
            stderr=open(data_dir.parent / f"{argv[0]}.stderr", "wb"),
            stdin=subprocess.DEVNULL,
        )
        lines: "queue.Queue[str]" = queue.Queue()

        def read() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                lines.put(raw.decode("utf-8", "replace"))

        threading.Thread(target=read, daemon=True).start()
        self.url = ""
        try:
            while not self.url:
                line = lines.get(timeout=START_TIMEOUT)
                if "listening on " in line:
                    self.url = line.split("listening on ", 1)[1].strip()
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"jobrelay up printed no address within {START_TIMEOUT} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    binary = find_binary()
    if binary is None:
        reason = "no jobrelay binary: set JOBRELAY_BIN or run `cargo build -p jobrelay`"
        print(f"skipped: {reason}")
        pytest.skip(reason)
    running = Server(binary, tmp_path_factory.mktemp("up") / "data")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def url(server: Server) -> str:
    return server.url


JobFactory = Callable[..., Path]


@pytest.fixture
def make_job(tmp_path: Path) -> JobFactory:
    """Writes a job directory: ``run.sh`` with the given script, plus ``files``
    (name → text, names may hold sub-directories)."""
    count = 0

    def make(script: str, files: Optional[Dict[str, str]] = None) -> Path:
        nonlocal count
        count += 1
        job = tmp_path / f"job{count}"
        job.mkdir()
        (job / "run.sh").write_text("#!/bin/bash\nset -e\n" + script + "\n")
        for name, text in (files or {}).items():
            (job / name).parent.mkdir(parents=True, exist_ok=True)
            (job / name).write_text(text)
        return job

    return make
