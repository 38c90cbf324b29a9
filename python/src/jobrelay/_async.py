"""The asyncio client: drives the operations of ``_protocol`` with ``httpx.AsyncClient``.

The same generators as :class:`jobrelay.Client`; only the I/O differs. Uploaded files are read
in 64 KiB chunks and downloads written in 256 KiB chunks from the event loop (short blocking
calls on a local disk); unpacking a result runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import TracebackType
from typing import Any, AsyncIterator, List, Optional, Type, Union

import httpx

from . import _protocol as p
from ._files import Files
from ._models import Event, JobInfo, JobState


class AsyncClient:
    """:class:`jobrelay.Client` for asyncio: the same arguments, every call awaited."""

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        user: Optional[int] = None,
        timeout: float = 30.0,
        *,
        verify: Union[bool, str] = True,
        transport: Optional[httpx.AsyncBaseTransport] = None,
        max_connections: int = 100,
    ) -> None:
        self.url = url.rstrip("/")
        self._protocol = p.Protocol(user)
        self._timeout = httpx.Timeout(timeout)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=self._timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections),
        )

    # -- the I/O layer: everything else is in _protocol ----------------------------------

    async def _send(self, call: p.Call) -> p.Reply:
        try:
            request = self._http.build_request(
                call.method,
                call.path,
                params=call.params,
                data=call.data,
                files=call.files,
                timeout=p.timeout_for(self._timeout, call),
            )
            response = await self._http.send(request, stream=True)
            try:
                mode = p.body_mode(call, response.status_code, response.headers)
                body = bytearray()
                if mode == "sink":
                    assert call.sink is not None
                    async for chunk in response.aiter_bytes(p.CHUNK_BYTES):
                        call.sink.write(chunk)
                elif mode == "read":
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        p.check_size(len(body))
                return p.Reply(response.status_code, response.headers, bytes(body))
            finally:
                await response.aclose()
        except httpx.TransportError as e:
            raise p.transport_error(e, self.url) from e

    async def _step(self, step: p.Step) -> Any:
        if isinstance(step, p.Call):
            return await self._send(step)
        if isinstance(step, p.Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, p.Blocking):
            return await asyncio.get_running_loop().run_in_executor(None, step.fn)
        raise TypeError(f"unexpected step {step!r}")

    async def _run(self, op: p.Op[p.T]) -> p.T:
        try:
            answer: Any = None
            while True:
                answer = await self._step(op.send(answer))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            op.close()

    async def _iterate(self, op: p.Op[None]) -> AsyncIterator[Any]:
        try:
            answer: Any = None
            while True:
                step = op.send(answer)
                if isinstance(step, p.Item):
                    answer = None
                    yield step.value
                else:
                    answer = await self._step(step)
        except StopIteration:
            return
        finally:
            op.close()

    # -- the API -----------------------------------------------------------------------

    async def submit(
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
    ) -> AsyncJob:
        """See :meth:`jobrelay.Client.submit`."""
        extra = p.submit_fields(
            priority, cpus, memory_mb, walltime, callback_url, callback_events
        )
        info = await self._run(self._protocol.submit(files, service, user_id, extra))
        return AsyncJob(self, info.id, info)

    async def job(self, id: int) -> AsyncJob:
        return AsyncJob(self, id, await self._run(self._protocol.job(id)))

    async def jobs(
        self,
        service: Optional[str] = None,
        status: Union[JobState, str, None] = None,
        user_id: Optional[int] = None,
        limit: Optional[int] = None,
        offset: int = 0,
    ) -> AsyncIterator[AsyncJob]:
        """See :meth:`jobrelay.Client.jobs`; use with ``async for``."""
        async for info in self._iterate(
            self._protocol.jobs(service, status, user_id, limit, offset)
        ):
            yield AsyncJob(self, info.id, info)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: Optional[Type[BaseException]],
        value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        await self.aclose()


class AsyncJob:
    """:class:`jobrelay.Job` for asyncio."""

    def __init__(self, client: AsyncClient, id: int, info: Optional[JobInfo] = None) -> None:
        self.client = client
        self.id = id
        self.info = info

    @property
    def state(self) -> Optional[JobState]:
        return self.info.state if self.info else None

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id}, state={self.state})"

    async def refresh(self) -> JobInfo:
        self.info = await self.client._run(self.client._protocol.job(self.id))
        return self.info

    async def wait(self, timeout: Optional[float] = None) -> JobInfo:
        self.info = await self.client._run(self.client._protocol.wait(self.id, timeout))
        return self.info

    async def download(self, dest: Union[str, "os.PathLike[str]"]) -> Path:
        return await self.client._run(self.client._protocol.download(self.id, dest, partial=False))

    async def download_partial(self, dest: Union[str, "os.PathLike[str]"]) -> Path:
        return await self.client._run(self.client._protocol.download(self.id, dest, partial=True))

    def logs(self, stream: str = "stdout", follow: bool = False) -> AsyncIterator[bytes]:
        return self.client._iterate(self.client._protocol.logs(self.id, stream, follow))

    async def cancel(self) -> JobInfo:
        self.info = await self.client._run(self.client._protocol.cancel(self.id))
        return self.info

    async def events(self) -> List[Event]:
        return await self.client._run(self.client._protocol.events(self.id))
