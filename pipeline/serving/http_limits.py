"""A time limit on request headers, which uvicorn lacks (its keep-alive timer covers idle connections only, and
any byte received resets it): a connection whose request line and headers are not complete ``header_timeout``
seconds after it opened, or after its previous response, is closed. Slow-drip *bodies* are answered 408 by the
app itself (``serve.body_timeout_seconds``).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing connections that take longer than `header_timeout` to send headers."""

    header_timeout: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers(None)

    def on_response_complete(self) -> None:
        finished = self.cycle  # a pipelined request may start inside super(): that one is past its headers
        super().on_response_complete()
        self._await_headers(finished)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _await_headers(self, last_cycle: object) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_timeout, self._expire, last_cycle)

    def _expire(self, last_cycle: object) -> None:
        if self.cycle is last_cycle and not self.transport.is_closing():  # no request has begun since: too slow
            self.transport.close()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def with_header_timeout(seconds: float) -> type[HeaderDeadline]:
    """The protocol class to hand to uvicorn (``http=``) with this limit."""
    return type("HeaderDeadlineH11", (HeaderDeadline,), {"header_timeout": seconds})
