"""The exceptions the client raises. Every one is a :class:`JobrelayError`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ._models import JobInfo


class JobrelayError(Exception):
    """Base class of every error this package raises."""


class Refused(JobrelayError):
    """The server answered with an error status (4xx or 5xx).

    ``status`` is the HTTP status and ``message`` the server's own explanation.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class NotFound(Refused):
    """The job (or the endpoint) does not exist, or is another user's (HTTP 404)."""


class Unreachable(JobrelayError):
    """Nothing answered at the server's address, or the connection broke mid-way."""


class Timeout(JobrelayError):
    """A wait ran out (``Job.wait``), or the server took too long to answer.

    ``job`` is the job as last seen when the wait ran out (``None`` for a slow request).
    """

    def __init__(self, message: str, job: Optional[JobInfo] = None) -> None:
        super().__init__(message)
        self.job = job


class NotCompleted(JobrelayError):
    """A download was asked for a job that has no results (yet): ``job`` says its state."""

    def __init__(self, job: JobInfo) -> None:
        detail = f" ({job.message})" if job.message else ""
        super().__init__(f"job {job.id} has no results to download: it is {job.state.value}{detail}")
        self.job = job


class Unsupported(JobrelayError):
    """The server lacks the endpoint (a reference job-orchestrator has no ``/jobs``)."""


class UnsafeArchive(JobrelayError):
    """A result archive holds an entry that would land outside the target directory.

    Every name and link target is checked before anything is written; a link already in
    the directory is found on the way and refused before a file is written through it.
    """
