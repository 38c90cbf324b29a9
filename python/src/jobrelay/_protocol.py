"""The protocol, without I/O: one code base for :class:`Client` and :class:`AsyncClient`.

Every operation is a generator that yields what it needs — an HTTP :class:`Call`, a
:class:`Sleep`, a :class:`Blocking` file task, or an :class:`Item` for the caller — and is sent
the answer back. The two clients only drive these generators (``_sync.py`` with ``httpx.Client``
and ``time.sleep``, ``_async.py`` with ``httpx.AsyncClient`` and ``asyncio``), so request
building, response parsing, long-polls, paging and the fallbacks for a reference server are
written once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Dict, Generator, List, Mapping, Optional, Tuple, TypeVar, Union

import httpx

from ._errors import (
    JobrelayError,
    NotCompleted,
    NotFound,
    Refused,
    Timeout,
    Unreachable,
    Unsupported,
)
from ._files import Files, collect
from ._models import Event, JobInfo, JobState
from ._unpack import unpack

T = TypeVar("T")

#: Longest wait the server grants one long-poll (`MAX_WAIT_SECS` in the server).
MAX_WAIT_SECS = 60.0
#: Extra time given to a long-poll's answer beyond the wait it asked for.
WAIT_GRACE_SECS = 30.0
#: Largest answer kept in memory (JSON records, log windows of at most 1 MiB); ZIPs are streamed.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Chunk size of streamed downloads.
CHUNK_BYTES = 256 * 1024
#: Backoff of the polls a reference server needs (it has no long-poll), in seconds.
POLL_FIRST, POLL_MAX = 0.2, 5.0
#: Backoff of ``logs(follow=True)`` while nothing new arrives.
FOLLOW_FIRST, FOLLOW_MAX = 0.1, 1.0
#: Jobs asked per page by ``jobs()``.
PAGE_SIZE = 100

FilePart = Tuple[str, Tuple[str, IO[bytes], str]]


@dataclass
class Call:
    """One HTTP request. A 2xx ZIP answer goes to ``sink`` when given (streamed, not kept),
    is not read at all with ``head_only``; any other answer is read (at most MAX_BODY_BYTES)."""

    method: str
    path: str
    params: Optional[Dict[str, str]] = None
    data: Optional[Dict[str, str]] = None
    files: Optional[List[FilePart]] = None
    read_timeout: Optional[float] = None
    sink: Optional[IO[bytes]] = None
    head_only: bool = False


@dataclass
class Sleep:
    seconds: float


@dataclass
class Blocking:
    """File work (unpacking) that the async client runs in a thread."""

    fn: Callable[[], Any]


@dataclass
class Item:
    """A value for the caller of an iterating operation (``jobs``, ``logs``)."""

    value: Any


Step = Union[Call, Sleep, Blocking, Item]
Op = Generator[Step, Any, T]


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def is_zip(self) -> bool:
        return is_zip(self.headers)

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise Refused(self.status, f"the server's answer is not JSON: {self.body[:200]!r}") from None


def is_zip(headers: httpx.Headers) -> bool:
    content_type: str = headers.get("content-type", "")
    return content_type.startswith("application/zip")


def body_mode(call: Call, status: int, headers: httpx.Headers) -> str:
    """How a driver treats an answer's body: ``sink``, ``skip`` or ``read``."""
    if 200 <= status < 300 and is_zip(headers):
        if call.sink is not None:
            return "sink"
        if call.head_only:
            return "skip"
    return "read"


def check_size(size: int) -> None:
    if size > MAX_BODY_BYTES:
        raise JobrelayError(f"the server's answer is larger than {MAX_BODY_BYTES} bytes")


def timeout_for(default: httpx.Timeout, call: Call) -> Union[httpx.Timeout, Any]:
    if call.read_timeout is None:
        return httpx.USE_CLIENT_DEFAULT
    return httpx.Timeout(
        connect=default.connect, read=call.read_timeout, write=default.write, pool=default.pool
    )


def transport_error(error: httpx.TransportError, base: str) -> JobrelayError:
    """An httpx failure as this package's exception: nothing answering is Unreachable,
    a slow answer is Timeout."""
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return Unreachable(f"cannot reach the server at {base}: {error}")
    if isinstance(error, httpx.TimeoutException):
        return Timeout(f"the server at {base} did not answer in time: {error!r}")
    return Unreachable(f"the connection to {base} failed: {error!r}")


def error_for(reply: Reply) -> Refused:
    """The server's refusal with its own message (``message``, ``error`` or ``detail``)."""
    message = ""
    try:
        body = json.loads(reply.body)
        if isinstance(body, dict):
            for key in ("message", "error", "detail"):
                if isinstance(body.get(key), str) and body[key]:
                    message = body[key]
                    break
    except ValueError:
        message = reply.body[:500].decode("utf-8", "replace").strip()
    message = message or f"the server answered HTTP {reply.status}"
    return (NotFound if reply.status == 404 else Refused)(reply.status, message)


def _object(reply: Reply) -> Dict[str, Any]:
    if not reply.ok:
        raise error_for(reply)
    body = reply.json()
    if not isinstance(body, dict):
        raise Refused(reply.status, "the server's answer is not a JSON object")
    return body


def submit_fields(
    priority: Optional[int],
    cpus: Optional[int],
    memory_mb: Optional[int],
    walltime: Optional[float],
    callback_url: Optional[str],
    callback_events: Optional[str] = None,
) -> Dict[str, Optional[object]]:
    """The optional form fields of an upload. The server ignores text fields it does not
    know, so these are harmless today and take effect once it reads them."""
    return {
        "priority": priority,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "walltime_secs": walltime,
        "callback_url": callback_url,
        "callback_events": callback_events,
    }


def _job_id(id: int) -> int:
    if isinstance(id, bool) or not isinstance(id, int) or id <= 0:
        raise ValueError(f"a job id is a positive integer, not {id!r}")
    return id


class Protocol:
    """What one client knows (default user, whether the server has jobrelay's extension
    endpoints) and every operation, as generators."""

    def __init__(self, user: Optional[int] = None) -> None:
        self.user = user
        self._extensions: Optional[bool] = None

    def extensions(self) -> Op[bool]:
        """Whether the server has `/jobs` (jobrelay), learnt once: a reference server answers
        404 there, and the operations then fall back to the reference's endpoints."""
        if self._extensions is None:
            reply = yield Call("GET", "/jobs", params={"limit": "1"})
            if reply.status == 404:
                self._extensions = False
            else:
                _object(reply)
                self._extensions = True
        return self._extensions

    def _need_extensions(self, what: str) -> Op[None]:
        if not (yield from self.extensions()):
            raise Unsupported(f"{what} needs jobrelay's /jobs endpoints, which this server lacks")

    def submit(
        self,
        files: Files,
        service: str,
        user_id: Optional[int],
        fields: Mapping[str, Optional[object]],
    ) -> Op[JobInfo]:
        uploads = collect(files)
        data = {"service": service}
        user = self.user if user_id is None else user_id
        if user is not None:
            data["user_id"] = str(int(user))
        data.update({k: str(v) for k, v in fields.items() if v is not None})
        opened: List[IO[bytes]] = []
        try:
            parts: List[FilePart] = []
            for upload in uploads:
                if isinstance(upload.source, Path):
                    handle: IO[bytes] = open(upload.source, "rb")
                    opened.append(handle)
                else:
                    handle = upload.source
                parts.append(("file", (upload.name, handle, "application/octet-stream")))
            reply = yield Call("POST", "/upload", data=data, files=parts)
        finally:
            for handle in opened:
                handle.close()
        return JobInfo.from_json(_object(reply))

    def _reference_status(self, id: int) -> Op[JobInfo]:
        # The reference's only status call: JSON until Completed, then the ZIP (not read).
        reply = yield Call("GET", f"/download/{id}", head_only=True)
        if reply.ok and reply.is_zip:
            return JobInfo(id=id, state=JobState.COMPLETED)
        return JobInfo.from_json(_object(reply), id)

    def job(self, id: int) -> Op[JobInfo]:
        id = _job_id(id)
        if (yield from self.extensions()):
            return JobInfo.from_json(_object((yield Call("GET", f"/jobs/{id}"))), id)
        return (yield from self._reference_status(id))

    def wait(self, id: int, timeout: Optional[float]) -> Op[JobInfo]:
        id = _job_id(id)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = POLL_FIRST
        long_poll = yield from self.extensions()
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if long_poll:
                wait = MAX_WAIT_SECS if left is None else min(MAX_WAIT_SECS, left)
                call = Call(
                    "GET",
                    f"/jobs/{id}",
                    params={"wait": f"{wait:.3f}"},
                    read_timeout=wait + WAIT_GRACE_SECS,
                )
                info = JobInfo.from_json(_object((yield call)), id)
            else:
                info = yield from self._reference_status(id)
            if info.state.is_final:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"job {id} is still {info.state.value} after {timeout} s", info)
            if not long_poll:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                yield Sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, POLL_MAX)

    def jobs(
        self,
        service: Optional[str],
        status: Union[JobState, str, None],
        user_id: Optional[int],
        limit: Optional[int],
        offset: int,
    ) -> Op[None]:
        yield from self._need_extensions("listing jobs")
        filters = {"service": service, "user_id": user_id}
        if status is not None:
            filters["status"] = JobState(status).value if isinstance(status, JobState) else status
        base = {k: str(v) for k, v in filters.items() if v is not None}
        left = limit
        while left is None or left > 0:
            size = PAGE_SIZE if left is None else min(PAGE_SIZE, left)
            params = dict(base, limit=str(size), offset=str(offset))
            page = _object((yield Call("GET", "/jobs", params=params)))
            found = [j for j in page.get("jobs", []) if isinstance(j, dict)]
            for record in found:
                yield Item(JobInfo.from_json(record))
            offset += len(found)
            left = None if left is None else left - len(found)
            total = page.get("total")
            if len(found) < size or (isinstance(total, int) and offset >= total):
                return

    def download(self, id: int, dest: Union[str, "os.PathLike[str]"], partial: bool) -> Op[Path]:
        """Streams the (partial) ZIP beside ``dest``; keeps it there when ``dest`` ends in
        ``.zip``, else unpacks it into the directory ``dest`` and removes it."""
        id = _job_id(id)
        target = Path(dest)
        as_zip = target.suffix.lower() == ".zip"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".jobrelay-", suffix=".zip.part", dir=target.parent)
        part: Optional[Path] = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                path = f"/download_partial/{id}" if partial else f"/download/{id}"
                reply = yield Call("GET", path, sink=sink)
            if not reply.ok:
                raise error_for(reply)
            if not reply.is_zip:
                raise NotCompleted(JobInfo.from_json(reply.json(), id))
            assert part is not None
            if as_zip:
                os.replace(part, target)
                part = None
            else:
                archive = part
                yield Blocking(lambda: unpack(archive, target))
            return target
        finally:
            if part is not None:
                part.unlink(missing_ok=True)

    def logs(self, id: int, stream: str, follow: bool) -> Op[None]:
        id = _job_id(id)
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream is 'stdout' or 'stderr', not {stream!r}")
        yield from self._need_extensions("reading logs")
        offset, delay = 0, FOLLOW_FIRST
        while True:
            reply = yield Call("GET", f"/jobs/{id}/log", params={"stream": stream, "offset": str(offset)})
            if not reply.ok:
                raise error_for(reply)
            state = JobState(reply.headers.get("x-job-status", "Unknown"))
            if reply.body:
                yield Item(reply.body)
                next_offset = reply.headers.get("x-log-next-offset", "")
                offset = int(next_offset) if next_offset.isdigit() else offset + len(reply.body)
                delay = FOLLOW_FIRST
                continue
            if not follow or state.is_final:
                return
            yield Sleep(delay)
            delay = min(delay * 2, FOLLOW_MAX)

    def cancel(self, id: int) -> Op[JobInfo]:
        id = _job_id(id)
        reply = yield Call("POST", f"/terminate/{id}")
        # 409: it had already finished; the answer carries its state, which it keeps.
        if reply.ok or reply.status == 409:
            try:
                body = reply.json()
            except Refused:
                body = None
            if isinstance(body, dict) and body.get("status") not in (None, "Unknown"):
                return JobInfo.from_json(body, id)
            return (yield from self.job(id))
        raise error_for(reply)

    def events(self, id: int) -> Op[List[Event]]:
        id = _job_id(id)
        yield from self._need_extensions("a job's events")
        reply = yield Call("GET", f"/jobs/{id}/events")
        if not reply.ok:
            raise error_for(reply)
        body = reply.json()
        return [Event.from_json(e) for e in body if isinstance(e, dict)] if isinstance(body, list) else []
