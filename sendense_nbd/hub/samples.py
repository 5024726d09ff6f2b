"""A job's throughput over time: ``(t, bytes)`` samples in the hub's store, bounded per job.

Each progress report a job gets records the bytes it has sent so far
(``bytes_transferred``) at the hub's clock, and its completion the final
sum. Reports are numbered (``seq``); a job keeps every report whose number
is a multiple of its stride, and its newest. The stride starts at 1 and
doubles whenever that would keep more than :data:`MAX_SAMPLES` (every other
sample goes), so the first and newest reports stay and the whole job stays
covered evenly. The samples go with their job when it is pruned
(:meth:`~sendense_nbd.hub.jobs.JobStore.prune`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from sendense_nbd.hub.db import Connection

#: Samples kept per job (the newest included).
MAX_SAMPLES = 240


@attrs.frozen
class Sample:
    """The bytes a job had sent (``bytes``) at time ``t`` (epoch seconds, the hub's clock)."""

    t: float
    bytes: int

    def to_json(self) -> list[float | int]:
        """``[t, bytes]``."""
        return [self.t, self.bytes]


def stride(reports: int) -> int:
    """The stride after ``reports`` reports: the smallest power of two that keeps, with the newest, at
    most :data:`MAX_SAMPLES` of reports ``0 .. reports - 1``."""
    step = 1
    while (reports - 1) // step + 2 > MAX_SAMPLES:
        step *= 2
    return step


def add_sample(connection: Connection, job_id: str, t: float, sent: int) -> None:
    """Record a job's next report: the reports off the stride go (the previous newest, or every other
    one when the stride doubles), then this one is added."""
    (last,) = connection.execute("SELECT MAX(seq) FROM job_samples WHERE job_id = ?", (job_id,)).fetchone()
    seq = 0 if last is None else int(last) + 1
    if seq:
        connection.execute("DELETE FROM job_samples WHERE job_id = ? AND seq % ? != 0", (job_id, stride(seq + 1)))
    connection.execute("INSERT INTO job_samples (job_id, seq, t, bytes) VALUES (?, ?, ?, ?)", (job_id, seq, t, sent))


def read_samples(connection: Connection, job_id: str) -> list[Sample]:
    """A job's samples, oldest first."""
    found = connection.execute("SELECT t, bytes FROM job_samples WHERE job_id = ? ORDER BY seq", (job_id,))
    return [Sample(float(row[0]), int(row[1])) for row in found]


def delete_samples(connection: Connection, job_ids: Sequence[str]) -> None:
    """Forget the samples of these jobs."""
    connection.executemany("DELETE FROM job_samples WHERE job_id = ?", [(job_id,) for job_id in job_ids])
