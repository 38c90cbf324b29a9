"""jobrelay: submit, follow, download and cancel jobs on a jobrelay server (or a reference
job-orchestrator server), from blocking code (:class:`Client`) or asyncio (:class:`AsyncClient`).

>>> with jobrelay.Client("http://127.0.0.1:5000", user=1) as client:
...     job = client.submit("examples/residues", service="example")
...     job.wait(timeout=600)
...     job.download("results")
"""

from ._async import AsyncClient, AsyncJob
from ._errors import (
    JobrelayError,
    NotCompleted,
    NotFound,
    Refused,
    Timeout,
    Unreachable,
    UnsafeArchive,
    Unsupported,
)
from ._models import Event, JobInfo, JobState
from ._sync import Client, Job
from . import webhooks

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Event",
    "Job",
    "JobInfo",
    "JobState",
    "JobrelayError",
    "NotCompleted",
    "NotFound",
    "Refused",
    "Timeout",
    "Unreachable",
    "UnsafeArchive",
    "Unsupported",
    "webhooks",
]
