"""The stand-in API's canned resources, shaped like the real API's (its OpenAPI schemas AgentManagerAgent
and CallManagerCall): UUID v4 ids, `tm_*` timestamps, `9999-01-01...` for "not deleted"."""

from __future__ import annotations

from typing import Any

DEMO_CUSTOMER_ID = "4dabc01d-8187-4e34-81f1-52e8891eb826"
"""The customer a `voipbin-gateway demo token` acts for unless told otherwise."""
DEMO_AGENT_ID = "f2374054-b30d-42ff-9ecd-e0ab8c3fe616"
NOT_DELETED = "9999-01-01T00:00:00.000000Z"


def agent(customer_id: str) -> dict[str, Any]:
    """The demo agent, as GET /v1.0/me answers it and as the API's agent tokens carry it."""
    return {
        "id": DEMO_AGENT_ID,
        "customer_id": customer_id,
        "username": "demo@example.com",
        "name": "Demo Agent",
        "detail": "",
        "ring_method": "ringall",
        "status": "available",
        "permission": 64,
        "tag_ids": [],
        "addresses": [{"type": "tel", "target": "+14155550100", "target_name": "Demo Agent"}],
        "tm_create": "2026-01-15T09:30:00.000000Z",
        "tm_update": "2026-01-15T09:30:00.000000Z",
        "tm_delete": NOT_DELETED,
    }


def _call(call_id: str, status: str, direction: str, hangup_reason: str, minute: int) -> dict[str, Any]:
    at = f"2026-01-15T09:{minute:02d}:00.000000Z"
    return {
        "id": call_id,
        "customer_id": None,  # the caller's, filled in when served
        "owner_type": "agent",
        "owner_id": DEMO_AGENT_ID,
        "flow_id": "6096120b-e6a8-498f-8e10-52af448425db",
        "type": "flow",
        "source": {"type": "tel", "target": "+14155550100"},
        "destination": {"type": "tel", "target": "+821055501234"},
        "status": status,
        "direction": direction,
        "hangup_by": "remote" if status == "hangup" else "",
        "hangup_reason": hangup_reason,
        "tm_create": at,
        "tm_update": at,
        "tm_delete": NOT_DELETED,
    }


CALLS: dict[str, dict[str, Any]] = {
    call["id"]: call
    for call in (
        _call("f477fe8b-d0e3-4b8a-8d1c-f09ef38c6cf9", "progressing", "outgoing", "", 42),
        _call("1952fbaa-36ac-4d8c-a912-fcaf9ef584f5", "hangup", "incoming", "normal", 30),
    )
}
"""Newest first, as the API lists them."""
