"""A 200 MiB upload in flat memory: the file is streamed, never read whole.

The upload runs in a fresh Python process so that its peak RSS (``resource.getrusage``,
``ru_maxrss``) is the upload's alone, not the test session's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import JobFactory

SIZE = 200 * 1024 * 1024
#: Far below the file's size: an interpreter with httpx loaded is ~30-40 MiB.
LIMIT = 100 * 1024 * 1024

UPLOADER = r"""
import asyncio, json, resource, sys, jobrelay
url, job_dir, flavour = sys.argv[1], sys.argv[2], sys.argv[3]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if flavour == "sync":
    with jobrelay.Client(url, user=5, timeout=120) as client:
        info = client.submit(job_dir, service="example").wait(timeout=300)
else:
    async def main():
        async with jobrelay.AsyncClient(url, user=5, timeout=120) as client:
            return await (await client.submit(job_dir, service="example")).wait(timeout=300)
    info = asyncio.run(main())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"state": info.state.value, "before": before, "peak": peak}))
"""


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_200_mib_upload_keeps_memory_flat(url: str, make_job: JobFactory, flavour: str) -> None:
    job_dir = make_job(f'test "$(stat -c %s big.bin)" -eq {SIZE}\nrm big.bin')
    with open(job_dir / "big.bin", "wb") as f:
        chunk = bytes(range(256)) * 4096  # 1 MiB, not all zeros
        for _ in range(SIZE // len(chunk)):
            f.write(chunk)
    done = subprocess.run(
        [sys.executable, "-c", UPLOADER, url, str(job_dir), flavour],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"200 MiB upload ({flavour}): peak RSS {result['peak'] / 2**20:.1f} MiB "
        f"(at start {result['before'] / 2**20:.1f} MiB)"
    )
    assert result["state"] == "Completed", "the server received all 200 MiB"
    assert result["peak"] < LIMIT, result
    (Path(job_dir) / "big.bin").unlink()
