"""What the console's state column says of a combination whose circuit breaker opened, as the
gateway reports it in /status: skipped during the cooldown, then waiting for a probe."""

from __future__ import annotations

from typing import Any

from rswitch.tui.model import combination_row
from tests.conftest import SUPPORT_VARS, chat

BROKEN = {"type": "mock", "retry_same": 0, "mock": {"failure_rate": 1.0, "failure_status": 500}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def status_row(gw: Any, combo: str) -> dict[str, Any]:
    status = (await gw.client.get("/status")).json()
    return next(c for c in status["combinations"] if c["id"] == combo)


async def test_an_open_breaker_past_its_cooldown_reads_probe_due_not_circuit_open(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"broken": BROKEN},
            "gateway": {
                "circuit_breaker": {"failures": 2, "cooldown_seconds": 30},
                "combinations": [
                    {
                        "id": "main",
                        "template_id": "support",
                        "model": "small",
                        "provider": "broken",
                        "fallbacks": ["backup"],
                    },
                    {
                        "id": "backup",
                        "template_id": "support",
                        "model": "large",
                        "provider": "mock",
                        "weight": 0,
                    },
                ],
            },
        }
    )
    clock = Clock()
    gw.core.gateway.breakers.clock = clock
    for _ in range(2):  # two failed attempts at main, each rescued by the backup
        r = await gw.post(chat(metadata={"combination_id": "main"}, variables=SUPPORT_VARS))
        assert r.headers["x-rswitch-combination"] == "backup"
    main = await status_row(gw, "main")
    assert main["breaker"]["state"] == "open" and main["breaker"]["retry_in"] == 30.0
    assert combination_row(main)["state"] == "circuit open"

    clock.now += 31  # the cooldown is over and no request has come: the next one will probe main
    main = await status_row(gw, "main")
    assert main["breaker"] == {"state": "open", "failures": 2, "retry_in": 0.0}
    assert combination_row(main)["state"] == "probe due"
