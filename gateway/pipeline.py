"""The filter chain: each filter one concern, the order fixed here and nowhere else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol

from aiohttp.web import BaseRequest, StreamResponse

from gateway.context import RequestContext

Next = Callable[[BaseRequest, RequestContext], Awaitable[StreamResponse]]


class Filter(Protocol):
    async def __call__(
        self, request: BaseRequest, ctx: RequestContext, call_next: Next
    ) -> StreamResponse: ...


def chain(filters: Sequence[Filter], endpoint: Next) -> Next:
    """Compose once at start-up: filters[0] runs first and sees the response last."""
    handler = endpoint
    for f in reversed(filters):
        handler = partial(f, call_next=handler)
    return handler
