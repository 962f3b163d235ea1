"""The bounded queue in front of the Session: at most one request generating and
``max_queue`` waiting; one more is refused with 429 and a ``Retry-After`` estimate.

The Session's worker runs one generation at a time in submission order; this only bounds
how many HTTP requests may be waiting for it, and keeps the handles of the admitted ones
so a server that stops can stop their generations.
"""
from __future__ import annotations

import math
import threading
import time

from max_jupyter.errors import BadArgumentError
from max_jupyter.server.errors import APIError

MAX_RETRY_AFTER_S = 60


class Admission:
    """Counts admitted requests; ``admit`` returns a ``Ticket`` or raises ``APIError(429)``.

    The 429's ``Retry-After`` is the time until the queue has room for one more: the
    requests beyond ``max_queue`` times the recent time one request takes to serve
    (``service_s``), at least 1 s and at most ``MAX_RETRY_AFTER_S``.
    """

    def __init__(self, max_queue: int = 8):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise BadArgumentError(f"max_queue must be an int >= 0; got {max_queue!r}.")
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._tickets: set[Ticket] = set()
        self.service_s = 1.0
        """Moving average of one request's service time: the time from its admission, or
        from the end of the request before it when it had to wait, to its end."""
        self._last_end = time.monotonic()

    @property
    def admitted(self) -> int:
        return len(self._tickets)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free (see the class)."""
        ahead = len(self._tickets) - self.max_queue
        return min(max(math.ceil(self.service_s * ahead), 1), MAX_RETRY_AFTER_S)

    def admit(self) -> Ticket:
        with self._lock:
            if len(self._tickets) > self.max_queue:
                raise APIError(429, f"the server is busy: {len(self._tickets)} requests are "
                               f"running or queued (max_queue={self.max_queue}); retry later.",
                               code="queue_full", headers={"Retry-After": str(self.retry_after())})
            ticket = Ticket(self)
            self._tickets.add(ticket)
            return ticket

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._tickets:
                self._tickets.discard(ticket)
                now = time.monotonic()
                # a request that waited behind another was served from that one's end on
                self.service_s = 0.8 * self.service_s + 0.2 * (now - max(ticket.since, self._last_end))
                self._last_end = now

    def stop_all(self) -> None:
        """Stop every admitted request's generation (queued ones never start)."""
        with self._lock:
            handles = [t.handle for t in self._tickets if t.handle is not None]
        for handle in handles:
            handle.stop()


class Ticket:
    """One admitted request: holds its generation handle; ``release`` stops it and frees the
    slot (idempotent, so every exit path may call it)."""

    def __init__(self, admission: Admission):
        self.admission, self.since, self.handle = admission, time.monotonic(), None
        self._lock = threading.Lock()
        self._released = False

    def attach(self, handle) -> None:
        """Hold ``handle``, the request's generation; stop it at once if the request was
        released meanwhile (cancelled while its generation was being started)."""
        with self._lock:
            self.handle = handle
            released = self._released
        if released:
            handle.stop()

    def release(self) -> None:
        with self._lock:
            self._released, handle = True, self.handle
        if handle is not None:
            handle.stop()
        self.admission._release(self)
