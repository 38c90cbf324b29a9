"""The blocking client: drives the operations of ``_protocol`` with ``httpx.Client``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, List, Optional, Type, Union

import httpx

from . import _protocol as p
from ._files import Files
from ._models import Event, JobInfo, JobState


class Client:
    """A jobrelay (or reference job-orchestrator) server at ``url``.

    ``token`` is sent as ``Authorization: Bearer`` (a server with a users file); ``user`` is
    the ``user_id`` of submissions that name none; ``timeout`` bounds connecting and each read
    or write in seconds (long-polls get the wait they ask for on top). Use it as a context
    manager, or call :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        user: Optional[int] = None,
        timeout: float = 30.0,
        *,
        verify: Union[bool, str] = True,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._protocol = p.Protocol(user)
        self._timeout = httpx.Timeout(timeout)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=self._timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )

    # -- the I/O layer: everything else is in _protocol ----------------------------------

    def _send(self, call: p.Call) -> p.Reply:
        try:
            request = self._http.build_request(
                call.method,
                call.path,
                params=call.params,
                data=call.data,
                files=call.files,
                timeout=p.timeout_for(self._timeout, call),
            )
            response = self._http.send(request, stream=True)
            try:
                mode = p.body_mode(call, response.status_code, response.headers)
                body = bytearray()
                if mode == "sink":
                    assert call.sink is not None
                    for chunk in response.iter_bytes(p.CHUNK_BYTES):
                        call.sink.write(chunk)
                elif mode == "read":
                    for chunk in response.iter_bytes():
                        body += chunk
                        p.check_size(len(body))
                return p.Reply(response.status_code, response.headers, bytes(body))
            finally:
                response.close()
        except httpx.TransportError as e:
            raise p.transport_error(e, self.url) from e

    def _step(self, step: p.Step) -> Any:
        if isinstance(step, p.Call):
            return self._send(step)
        if isinstance(step, p.Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, p.Blocking):
            return step.fn()
        raise TypeError(f"unexpected step {step!r}")

    def _run(self, op: p.Op[p.T]) -> p.T:
        try:
            answer: Any = None
            while True:
                answer = self._step(op.send(answer))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            op.close()

    def _iterate(self, op: p.Op[None]) -> Iterator[Any]:
        try:
            answer: Any = None
            while True:
                step = op.send(answer)
                if isinstance(step, p.Item):
                    answer = None
                    yield step.value
                else:
                    answer = self._step(step)
        except StopIteration:
            return
        finally:
            op.close()

    # -- the API -----------------------------------------------------------------------

    def submit(
        self,
        files: Files,
        service: str,
        user_id: Optional[int] = None,
        *,
        priority: Optional[int] = None,
        cpus: Optional[int] = None,
        memory_mb: Optional[int] = None,
        walltime: Optional[float] = None,
        callback_url: Optional[str] = None,
        callback_events: Optional[str] = None,
    ) -> Job:
        """Uploads a job (files streamed from disk, a directory with its tree) and returns it
        once the server has it stored. ``priority``, ``cpus``, ``memory_mb``, ``walltime``
        (seconds) and ``callback_url`` are sent as form fields only when given; servers that
        do not know them ignore them. A jobrelay server POSTs the job's signed JSON to
        ``callback_url`` when it ends (check it with :func:`jobrelay.webhooks.verify`), and
        when it starts running too with ``callback_events="running,final"``."""
        extra = p.submit_fields(
            priority, cpus, memory_mb, walltime, callback_url, callback_events
        )
        info = self._run(self._protocol.submit(files, service, user_id, extra))
        return Job(self, info.id, info)

    def job(self, id: int) -> Job:
        """The job ``id`` as the server has it now (``NotFound`` if unknown)."""
        return Job(self, id, self._run(self._protocol.job(id)))

    def jobs(
        self,
        service: Optional[str] = None,
        status: Union[JobState, str, None] = None,
        user_id: Optional[int] = None,
        limit: Optional[int] = None,
        offset: int = 0,
    ) -> Iterator[Job]:
        """Jobs newest first, fetched a page at a time as the iterator is consumed; at most
        ``limit`` of them (all without it)."""
        for info in self._iterate(self._protocol.jobs(service, status, user_id, limit, offset)):
            yield Job(self, info.id, info)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: Optional[Type[BaseException]],
        value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()


class Job:
    """A job on the server. ``info`` is what the server last said about it."""

    def __init__(self, client: Client, id: int, info: Optional[JobInfo] = None) -> None:
        self.client = client
        self.id = id
        self.info = info

    @property
    def state(self) -> Optional[JobState]:
        return self.info.state if self.info else None

    def __repr__(self) -> str:
        return f"Job(id={self.id}, state={self.state})"

    def refresh(self) -> JobInfo:
        self.info = self.client._run(self.client._protocol.job(self.id))
        return self.info

    def wait(self, timeout: Optional[float] = None) -> JobInfo:
        """Blocks until the job is final (on the server's long-poll; a reference server is
        polled with backoff) and returns it; raises ``Timeout`` after ``timeout`` seconds."""
        self.info = self.client._run(self.client._protocol.wait(self.id, timeout))
        return self.info

    def download(self, dest: Union[str, "os.PathLike[str]"]) -> Path:
        """The result ZIP of a Completed job, streamed: saved as ``dest`` when it ends in
        ``.zip``, else unpacked (safely) into the directory ``dest``."""
        return self.client._run(self.client._protocol.download(self.id, dest, partial=False))

    def download_partial(self, dest: Union[str, "os.PathLike[str]"]) -> Path:
        """The job's work directory as it is now (running, or finished in any state)."""
        return self.client._run(self.client._protocol.download(self.id, dest, partial=True))

    def logs(self, stream: str = "stdout", follow: bool = False) -> Iterator[bytes]:
        """The job's stdout or stderr in chunks; with ``follow``, until the job is final."""
        return self.client._iterate(self.client._protocol.logs(self.id, stream, follow))

    def cancel(self) -> JobInfo:
        """Kills the job wherever it is; a job that had already finished keeps its state."""
        self.info = self.client._run(self.client._protocol.cancel(self.id))
        return self.info

    def events(self) -> List[Event]:
        """Every state the job went through, oldest first."""
        return self.client._run(self.client._protocol.events(self.id))
