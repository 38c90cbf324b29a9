"""The same client against a stand-in for a deployed reference server (job-orchestrator),
which has only /upload, /download/{id}, /download_partial/{id} and /terminate/{id}: no /jobs,
no long-poll, no logs. Where jobrelay's endpoints answer 404 the client falls back."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

import jobrelay
from jobrelay import JobState

from .conftest import JobFactory

#: /download polls a job answers Running before it is Completed.
POLLS_TO_COMPLETE = 3


class Reference:
    def __init__(self) -> None:
        self.jobs: Dict[int, Dict[str, Any]] = {}
        self.requests: List[str] = []
        self.lock = threading.Lock()
        self.hostile_zip = False


def zip_of(files: Dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def handler_for(ref: Reference) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def answer(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def no_route(self) -> None:
            # axum's answer to an unknown route: 404, empty body.
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def job(self, prefix: str) -> Any:
            try:
                job_id = int(self.path[len(prefix):])
            except ValueError:
                return None
            return ref.jobs.get(job_id), job_id

        def do_GET(self) -> None:
            with ref.lock:
                ref.requests.append(self.path)
            for prefix in ("/download/", "/download_partial/"):
                if self.path.startswith(prefix):
                    found = self.job(prefix)
                    if found is None:
                        return self.no_route()
                    job, job_id = found
                    if job is None:
                        message = f"Job {job_id} not found in the database"
                        return self.answer(404, {"id": 0, "status": "Unknown", "message": message})
                    if prefix == "/download_partial/":
                        return self.answer(200, zip_of(job["files"]), "application/zip")
                    with ref.lock:
                        job["polls"] += 1
                        if job["status"] == "Queued" and job["polls"] >= POLLS_TO_COMPLETE:
                            job["status"] = "Completed"
                    if job["status"] == "Completed":
                        files = dict(job["files"], **{"out.txt": b"done\n"})
                        if ref.hostile_zip:
                            files = {"../escaped.txt": b"x"}
                        return self.answer(200, zip_of(files), "application/zip")
                    return self.answer(200, {"id": job_id, "status": job["status"], "message": ""})
            if self.path == "/":
                return self.answer(200, {"message": "pong"})
            self.no_route()

        def do_POST(self) -> None:
            with ref.lock:
                ref.requests.append(self.path)
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path == "/upload":
                head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                message = BytesParser(policy=email_policy).parsebytes(head + body)
                fields: Dict[str, str] = {}
                files: Dict[str, bytes] = {}
                for part in message.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    payload = part.get_payload(decode=True) or b""
                    if part.get_filename() is not None:
                        files[Path(part.get_filename()).name] = payload  # the reference flattens
                    else:
                        fields[str(name)] = payload.decode()
                if fields.get("service") != "example":
                    return self.answer(400, {"id": 0, "status": "Unknown", "message": "Invalid service"})
                with ref.lock:
                    job_id = len(ref.jobs) + 1
                    ref.jobs[job_id] = {"files": files, "fields": fields, "status": "Queued", "polls": 0}
                return self.answer(
                    201, {"id": job_id, "status": "Queued", "message": "Job successfully uploaded"}
                )
            if self.path.startswith("/terminate/"):
                found = self.job("/terminate/")
                if found is None or found[0] is None:
                    return self.answer(404, {"id": 0, "status": "Unknown", "message": "not found"})
                found[0]["status"] = "Killed"
                return self.answer(200, {"message": "terminated"})
            self.no_route()

    return Handler


@pytest.fixture
def reference() -> Iterator[tuple]:
    ref = Reference()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(ref))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ref, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_submit_wait_download_on_a_reference_server(
    reference: tuple, make_job: JobFactory, tmp_path: Path
) -> None:
    ref, url = reference
    job_dir = make_job("true", {"inputs/a.pdb": "ATOM\n"})
    with jobrelay.Client(url, user=7) as client:
        job = client.submit(job_dir, service="example")
        assert job.state == JobState.QUEUED
        assert ref.jobs[job.id]["fields"] == {"service": "example", "user_id": "7"}
        assert client.job(job.id).state == JobState.QUEUED  # from /download, JSON while not done

        info = job.wait(timeout=30)  # no long-poll there: /download polled with backoff
        assert info.state == JobState.COMPLETED
        polls = [p for p in ref.requests if p == f"/download/{job.id}"]
        assert len(polls) == POLLS_TO_COMPLETE, ref.requests

        out = job.download(tmp_path / "out")
        assert (out / "out.txt").read_text() == "done\n"
        assert (out / "a.pdb").read_text() == "ATOM\n", "the reference flattens names"
        partial = job.download_partial(tmp_path / "partial")
        assert (partial / "run.sh").exists()


def test_cancel_errors_and_what_the_reference_lacks(reference: tuple, make_job: JobFactory) -> None:
    _, url = reference
    with jobrelay.Client(url, user=7) as client:
        job = client.submit(make_job("sleep 60"), service="example")
        assert job.cancel().state == JobState.KILLED
        assert job.wait(timeout=5).state == JobState.KILLED
        with pytest.raises(jobrelay.NotFound) as caught:
            client.job(999)
        assert "not found" in caught.value.message
        with pytest.raises(jobrelay.Refused) as refused:
            client.submit(make_job("true"), service="other")
        assert refused.value.status == 400 and refused.value.message == "Invalid service"
        with pytest.raises(jobrelay.Unsupported):
            list(client.jobs())
        with pytest.raises(jobrelay.Unsupported):
            list(job.logs())
        with pytest.raises(jobrelay.Unsupported):
            job.events()


def test_a_hostile_archive_is_refused_and_leaves_nothing(
    reference: tuple, make_job: JobFactory, tmp_path: Path
) -> None:
    ref, url = reference
    ref.hostile_zip = True
    with jobrelay.Client(url, user=7) as client:
        job = client.submit(make_job("true"), service="example")
        job.wait(timeout=30)
        dest = tmp_path / "dl" / "out"
        with pytest.raises(jobrelay.UnsafeArchive):
            job.download(dest)
        assert list((tmp_path / "dl").iterdir()) == [], "no part file, no directory"
        assert not (tmp_path / "dl" / "escaped.txt").exists()


def test_the_async_client_falls_back_too(reference: tuple, make_job: JobFactory, tmp_path: Path) -> None:
    import asyncio

    _, url = reference

    async def main() -> None:
        async with jobrelay.AsyncClient(url, user=7) as client:
            job = await client.submit(make_job("true"), service="example")
            assert (await job.wait(timeout=30)).state == JobState.COMPLETED
            out = await job.download(tmp_path / "a")
            assert (out / "out.txt").read_text() == "done\n"

    asyncio.run(main())
