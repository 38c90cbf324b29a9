"""The blocking client against a real `jobrelay up`."""

from __future__ import annotations

import socket
import time
import zipfile
from pathlib import Path
from typing import Any, List

import httpx
import pytest

import jobrelay
from jobrelay import JobState

from .conftest import JobFactory

SERVICE = "example"


class CountingTransport(httpx.HTTPTransport):
    """Records the path of every request, to check that a wait does not poll."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: List[str] = []
        self.queries: List[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        self.queries.append(request.url.query.decode())
        return super().handle_request(request)


def test_submit_wait_download_checks_contents(url: str, make_job: JobFactory, tmp_path: Path) -> None:
    job_dir = make_job(
        "cat inputs/a.txt inputs/deep/b.txt > out.txt\necho hello\necho oops >&2",
        {"inputs/a.txt": "alpha\n", "inputs/deep/b.txt": "beta\n"},
    )
    with jobrelay.Client(url, user=1) as client:
        job = client.submit(job_dir, service=SERVICE)
        assert job.id > 0 and job.state == JobState.QUEUED
        info = job.wait(timeout=60)
        assert info.state == JobState.COMPLETED and info.state.is_final
        assert info.exit_code == 0 and info.user_id == 1 and info.service == SERVICE

        out = job.download(tmp_path / "results")
        assert (out / "out.txt").read_text() == "alpha\nbeta\n"
        assert (out / "inputs" / "deep" / "b.txt").read_text() == "beta\n"

        archive = job.download(tmp_path / "zips" / "results.zip")
        with zipfile.ZipFile(archive) as zf:
            assert zf.read("out.txt") == b"alpha\nbeta\n"
        assert not list((tmp_path / "zips").glob(".jobrelay-*")), "no part file is left"

        assert b"".join(job.logs()) == b"hello\n"
        assert b"".join(job.logs("stderr")) == b"oops\n"
        states = [e.state for e in job.events()]
        assert states[0] == JobState.QUEUED and states[-1] == JobState.COMPLETED
        assert client.job(job.id).state == JobState.COMPLETED


def test_explicit_names_and_open_files(url: str, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("cat data/in.txt > copy.txt\n")
    with jobrelay.Client(url, user=1) as client, open(tmp_path / "script", "rb") as handle:
        (tmp_path / "upload-1").write_text("from a mapping\n")
        job = client.submit({"run.sh": handle, "data/in.txt": tmp_path / "upload-1"}, SERVICE)
        assert job.wait(60).state == JobState.COMPLETED
        assert (job.download(tmp_path / "r") / "copy.txt").read_text() == "from a mapping\n"


def test_failing_job_is_failed_and_has_no_results(url: str, make_job: JobFactory, tmp_path: Path) -> None:
    with jobrelay.Client(url, user=1) as client:
        job = client.submit(make_job("echo partial > left.txt\nexit 3"), SERVICE)
        info = job.wait(60)
        assert info.state == JobState.FAILED and info.exit_code == 3
        with pytest.raises(jobrelay.NotCompleted) as caught:
            job.download(tmp_path / "nothing")
        assert caught.value.job.state == JobState.FAILED
        partial = job.download_partial(tmp_path / "partial")
        assert (partial / "left.txt").read_text() == "partial\n"


def test_cancel_kills_a_running_job(url: str, make_job: JobFactory) -> None:
    with jobrelay.Client(url, user=1) as client:
        job = client.submit(make_job("echo started\nsleep 60"), SERVICE)
        # Wait for the job's first output: it is running on the client then.
        deadline = time.monotonic() + 30
        while b"started" not in b"".join(job.logs()):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        started = time.monotonic()
        info = job.cancel()
        assert info.state == JobState.KILLED
        assert time.monotonic() - started < 20
        assert job.wait(10).state == JobState.KILLED
        # Cancelling again: it had finished, it keeps its state, no error.
        assert job.cancel().state == JobState.KILLED


def test_cancel_of_a_completed_job_keeps_it_completed(url: str, make_job: JobFactory) -> None:
    with jobrelay.Client(url, user=1) as client:
        job = client.submit(make_job("true"), SERVICE)
        assert job.wait(60).state == JobState.COMPLETED
        assert job.cancel().state == JobState.COMPLETED


def test_wait_is_a_long_poll_not_a_busy_loop(url: str, make_job: JobFactory) -> None:
    transport = CountingTransport()
    with jobrelay.Client(url, user=1, transport=transport) as client:
        job = client.submit(make_job("sleep 2"), SERVICE)
        transport.paths.clear()
        assert job.wait(60).state == JobState.COMPLETED
        # One long-poll answers when the job ends (two if the first was cut short).
        assert len([p for p in transport.paths if p == f"/jobs/{job.id}"]) <= 2, transport.paths


def test_wait_timeout_raises_timeout_with_the_job(url: str, make_job: JobFactory) -> None:
    with jobrelay.Client(url, user=1) as client:
        job = client.submit(make_job("sleep 60"), SERVICE)
        started = time.monotonic()
        with pytest.raises(jobrelay.Timeout) as caught:
            job.wait(timeout=1.0)
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 15, elapsed
        assert caught.value.job is not None and not caught.value.job.state.is_final
        job.cancel()


def test_logs_follow_until_the_job_ends(url: str, make_job: JobFactory) -> None:
    with jobrelay.Client(url, user=1) as client:
        job = client.submit(make_job("for i in 1 2 3 4; do echo line$i; sleep 0.3; done"), SERVICE)
        text = b"".join(job.logs(follow=True)).decode()
        assert text == "line1\nline2\nline3\nline4\n"
        assert client.job(job.id).state == JobState.COMPLETED


def test_jobs_pages_through_every_match(url: str, make_job: JobFactory, monkeypatch: Any) -> None:
    monkeypatch.setattr(jobrelay._protocol, "PAGE_SIZE", 3)
    user = 70_000 + int(time.time()) % 10_000
    transport = CountingTransport()
    with jobrelay.Client(url, user=user, transport=transport) as client:
        ids = [client.submit(make_job("true"), SERVICE).id for _ in range(7)]
        transport.paths.clear()
        transport.queries.clear()
        listed = [job.id for job in client.jobs(user_id=user)]
        assert listed == sorted(ids, reverse=True), "every job once, newest first"
        pages = [q for p, q in zip(transport.paths, transport.queries) if p == "/jobs" and "offset" in q]
        assert len(pages) == 3, f"7 jobs in pages of 3: {pages}"
        assert [j.id for j in client.jobs(user_id=user, limit=4)] == listed[:4]
        assert [j.id for j in client.jobs(user_id=user, offset=5)] == listed[5:]
        for job_id in ids:
            client.job(job_id).wait(60)
        done = list(client.jobs(user_id=user, status=JobState.COMPLETED, service=SERVICE))
        assert len(done) == 7 and all(j.state == JobState.COMPLETED for j in done)
        assert list(client.jobs(user_id=user, status="Failed")) == []


def test_errors_are_typed(url: str, make_job: JobFactory) -> None:
    with jobrelay.Client(url, user=1) as client:
        with pytest.raises(jobrelay.NotFound):
            client.job(987654321)
        with pytest.raises(jobrelay.Refused) as caught:
            client.submit(make_job("true"), service="no-such-service")
        assert caught.value.status == 400
        assert "unknown service" in caught.value.message and "no-such-service" in caught.value.message
        with pytest.raises(jobrelay.Refused) as caught:
            jobrelay.Client(url).submit(make_job("true"), SERVICE)  # no user_id
        assert caught.value.status == 400 and "user_id" in caught.value.message
        with pytest.raises(ValueError):
            client.job(0)


def test_nothing_listening_is_unreachable(make_job: JobFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with jobrelay.Client(f"http://127.0.0.1:{port}", user=1, timeout=5) as client:
        with pytest.raises(jobrelay.Unreachable):
            client.job(1)
        with pytest.raises(jobrelay.Unreachable):
            client.submit(make_job("true"), SERVICE)


def test_unknown_fields_are_harmless(url: str, make_job: JobFactory) -> None:
    with jobrelay.Client(url, user=1) as client:
        job = client.submit(
            make_job("true"),
            SERVICE,
            priority=5,
            cpus=2,
            memory_mb=512,
            walltime=60,
        )
        assert job.wait(60).state == JobState.COMPLETED


def test_a_callback_to_a_server_without_an_allowlist_is_refused(
    url: str, make_job: JobFactory
) -> None:
    # `jobrelay up` configures no webhooks: a callback would never be sent, so it is refused
    # rather than silently dropped.
    with jobrelay.Client(url, user=1) as client:
        with pytest.raises(jobrelay.Refused) as refused:
            client.submit(make_job("true"), SERVICE, callback_url="https://platform.example/hook")
    assert refused.value.status == 400
    assert "callback" in str(refused.value)
