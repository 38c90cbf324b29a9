"""The asyncio client against a real `jobrelay up`, run with asyncio.run (no plugin needed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import jobrelay
from jobrelay import JobState

from .conftest import JobFactory

SERVICE = "example"
CONCURRENT = 50


def test_fifty_concurrent_submissions(url: str, make_job: JobFactory, tmp_path: Path) -> None:
    jobs_dirs = [make_job(f"echo job {i} > out.txt\necho {i}", {"n.txt": str(i)}) for i in range(CONCURRENT)]

    async def main() -> None:
        async with jobrelay.AsyncClient(url, user=2) as client:
            started = time.monotonic()
            jobs = await asyncio.gather(*(client.submit(d, SERVICE) for d in jobs_dirs))
            assert len({job.id for job in jobs}) == CONCURRENT, "one job per submission"
            finals = await asyncio.gather(*(job.wait(timeout=120) for job in jobs))
            assert [f.state for f in finals] == [JobState.COMPLETED] * CONCURRENT
            print(f"{CONCURRENT} jobs submitted and completed in {time.monotonic() - started:.1f} s")
            outs = await asyncio.gather(
                *(job.download(tmp_path / "out" / str(i)) for i, job in enumerate(jobs))
            )
            for i, out in enumerate(outs):
                assert (out / "out.txt").read_text() == f"job {i}\n"
            logs = []
            for job in jobs[:3]:
                logs.append(b"".join([chunk async for chunk in job.logs()]))
            assert logs == [b"0\n", b"1\n", b"2\n"]

    asyncio.run(main())


def test_async_errors_cancel_and_listing(url: str, make_job: JobFactory) -> None:
    async def main() -> None:
        async with jobrelay.AsyncClient(url, user=3) as client:
            with pytest.raises(jobrelay.NotFound):
                await client.job(987654321)
            with pytest.raises(jobrelay.Refused) as caught:
                await client.submit(make_job("true"), "nope")
            assert caught.value.status == 400
            job = await client.submit(make_job("sleep 60"), SERVICE)
            with pytest.raises(jobrelay.Timeout):
                await job.wait(timeout=0.5)
            assert (await job.cancel()).state == JobState.KILLED
            listed = [j.id async for j in client.jobs(user_id=3, limit=1)]
            assert listed == [job.id]
            events = await job.events()
            assert events[-1].state == JobState.KILLED

    asyncio.run(main())
