"""Job states and the records the server answers, parsed leniently."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Mapping, Optional


class JobState(str, Enum):
    """A job's state, as the server names it (the reference's names; ``Locked`` is theirs)."""

    QUEUED = "Queued"
    PROCESSING = "Processing"
    SUBMITTED = "Submitted"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    INVALID = "Invalid"
    KILLED = "Killed"
    CLEANED = "Cleaned"
    LOCKED = "Locked"
    UNKNOWN = "Unknown"

    @classmethod
    def _missing_(cls, value: object) -> JobState:
        # A state a newer server invents is not an error for an older client.
        return cls.UNKNOWN

    @property
    def is_final(self) -> bool:
        """True once the job will not change any more (results, if any, are stored)."""
        return self in _FINAL

    def __str__(self) -> str:
        return self.value


_FINAL = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.INVALID, JobState.KILLED, JobState.CLEANED}
)


def _opt_int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class JobInfo:
    """What the server said about a job. Fields the server did not send are ``None``
    (a reference server sends only ``id``, ``status`` and ``message``); ``raw`` is the
    whole answer."""

    id: int
    state: JobState
    message: str = ""
    user_id: Optional[int] = None
    service: Optional[str] = None
    attempts: Optional[int] = None
    exit_code: Optional[int] = None
    created_at: Optional[str] = None
    updated_at: Optional[str] = None
    finished_at: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any], id: Optional[int] = None) -> JobInfo:
        job_id = _opt_int(body.get("id"))
        if job_id is None or job_id == 0:
            if id is None:
                raise ValueError("the server's answer has no job id")
            job_id = id
        return cls(
            id=job_id,
            state=JobState(body.get("status", "Unknown")),
            message=_opt_str(body.get("message")) or "",
            user_id=_opt_int(body.get("user_id")),
            service=_opt_str(body.get("service")),
            attempts=_opt_int(body.get("attempts")),
            exit_code=_opt_int(body.get("exit_code")),
            created_at=_opt_str(body.get("created_at")),
            updated_at=_opt_str(body.get("updated_at")),
            finished_at=_opt_str(body.get("finished_at")),
            raw=dict(body),
        )


@dataclass(frozen=True)
class Event:
    """One state change in a job's timeline (``/jobs/{id}/events``)."""

    at: str
    state: JobState
    message: str
    attempts: Optional[int]
    client: Optional[str]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Event:
        return cls(
            at=_opt_str(body.get("at")) or "",
            state=JobState(body.get("status", "Unknown")),
            message=_opt_str(body.get("message")) or "",
            attempts=_opt_int(body.get("attempts")),
            client=_opt_str(body.get("client")),
        )
