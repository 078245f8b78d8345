"""One re-enqueue of a run at a time: ``resume`` and ``retry-failed`` claim the run before they look at its jobs.

Their busy check (are the run's chunks queued?) and their enqueue are separate steps, and the enqueue reads the
whole dataset first; two of them started together would both pass the check and both enqueue every open row.
The claim is one ``SET NX`` key: whoever sets it enqueues, the other is refused at once. It lapses a short
while after its holder stops renewing it, so a killed CLI does not block the run.
"""

from __future__ import annotations

import uuid
from types import TracebackType

import redis

from pipeline.errors import ConfigError

CLAIM_SECONDS = 60
# Delete the claim only if it is still ours (it may have lapsed and been taken by another).
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"


def requeue_key(run_id: str) -> str:
    return f"run:{run_id}:requeue"


class RequeueClaim:
    """``with RequeueClaim(connection, run_id, "resume"):`` holds the run's claim, or raises ConfigError."""

    def __init__(self, connection: redis.Redis, run_id: str, what: str) -> None:
        self.connection = connection
        self.run_id = run_id
        self.what = what
        self.token = uuid.uuid4().hex

    def __enter__(self) -> RequeueClaim:
        key = requeue_key(self.run_id)
        if not self.connection.set(key, f"{self.what}:{self.token}", nx=True, ex=CLAIM_SECONDS):
            held = self.connection.get(key)
            holder = (held.decode() if isinstance(held, bytes) else "another command").partition(":")[0]
            raise ConfigError(
                f"run {self.run_id}: a {holder} of this run is enqueueing right now; wait for it, then look at `status`"
            )
        return self

    def renew(self) -> None:
        """Called while enqueueing: a long dataset read keeps the claim."""
        self.connection.eval(_RENEW, 1, requeue_key(self.run_id), f"{self.what}:{self.token}", CLAIM_SECONDS)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.connection.eval(_RELEASE, 1, requeue_key(self.run_id), f"{self.what}:{self.token}")
