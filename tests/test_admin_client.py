"""`HttpOperator`, the operator interface over HTTP, against a real gateway on loopback (uvicorn
in a thread) with an admin key: the same typed answers as the in-process operator, the
gateway's refusals raised as the GatewayError it answered, a package downloaded whole, and an
unreachable gateway said plainly (never with the key in the message)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rswitch.admin import actions, views
from rswitch.admin.client import HttpOperator, Unreachable
from rswitch.auth import hash_key, new_key
from rswitch.core import Core
from rswitch.gateway.errors import GatewayError
from rswitch.tui.server import GatewayThread
from tests.conftest import SUPPORT_VARS, chat, make_config

pytestmark = pytest.mark.slow

ADMIN = new_key()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Core]]:
    core = Core(make_config(tmp_path, {"gateway": {"auth": {"admin_key_hash": hash_key(ADMIN)}}}))
    thread = GatewayThread(core, "127.0.0.1", 0)
    url = thread.start()
    try:
        yield url, core
    finally:
        thread.stop()


async def test_views_and_actions_over_http(served: tuple[str, Core], tmp_path: Path) -> None:
    url, core = served
    async with HttpOperator(url, ADMIN) as op:
        changed = await op.reweight("support-a", 0)
        assert isinstance(changed, views.CombinationView) and changed.weight == 0
        async with httpx.AsyncClient() as http:
            r = await http.post(
                url + "/v1/chat/completions", json=chat(model="support", variables=SUPPORT_VARS)
            )
        assert r.headers["x-rswitch-combination"] == "support-b"  # routing follows the reweight
        snap = await op.snapshot()
        assert isinstance(snap, views.ConsoleSnapshot)
        assert [e.text for e in snap.events] == ["weight of support-a set to 0"]
        rid = r.headers["x-rswitch-request-id"]
        call = await op.recent_call(rid)
        assert call.system_prompt == "You support Acme. Be kind."
        assert (await op.set_enabled("sum-a", False)).enabled is False
        reset = await op.reset_weights()
        assert {c.id: (c.weight, c.enabled) for c in reset.combinations}["support-a"] == (3, True)
        assert core.gateway.combinations["sum-a"].enabled

        v2 = await op.template_register(
            actions.TemplateSpec(template_id="support", template="Help with {product}.")
        )
        assert v2.version == 2 and core.registry.get("support").template == "Help with {product}."
        history = await op.template_history("support")
        assert [v.version for v in history.versions] == [1, 2]
        back = await op.template_rollback("support", 1)
        assert (
            back.version == 3 and core.registry.get("support").template == "You support {product}. Be {tone}."
        )

        imported = await op.dataset_import(
            "support", [{"messages": [{"role": "user", "content": "refund?"}], "expected": "Sure."}]
        )
        assert (imported.imported, imported.labelled) == (1, 1)
        exported = await op.dataset_export("support", labelled=True)
        assert b'"label_expected":"Sure."' in exported and len(exported.splitlines()) == 1

        package = await op.export_package("support", tmp_path / "out")
        assert package.parent == tmp_path / "out" and package.name.startswith("support-")
        assert package.name.endswith(".tar.gz") and [p.name for p in package.parent.iterdir()] == [
            package.name
        ]
        with tarfile.open(package, "r:gz") as tar:
            assert any(n.endswith("package.yaml") for n in tar.getnames())
        again = await op.import_package(package, overwrite=True)
        assert again.template_id == "support" and again.replaced


async def test_refusals_are_the_gateways_errors_and_change_nothing(served: tuple[str, Core]) -> None:
    url, core = served
    async with HttpOperator(url, ADMIN) as op:
        with pytest.raises(GatewayError) as bad:
            await op.reweight("support-a", -1)
        assert bad.value.status == 400 and bad.value.param == "weight"
        with pytest.raises(GatewayError) as unknown:
            await op.reweight("nope", 1)
        assert unknown.value.status == 404 and "support-a" in unknown.value.message
        with pytest.raises(GatewayError) as rows:
            await op.dataset_import("support", [{"messages": "not a list"}])
        assert rows.value.status == 400 and "line 1" in rows.value.message
    assert core.gateway.combinations["support-a"].weight == 3
    assert core.datasets.recent("support") == []
    async with HttpOperator(url, "sk-not-the-admin-key") as wrong:
        with pytest.raises(GatewayError) as refused:
            await wrong.snapshot()
        assert refused.value.status == 403
    async with HttpOperator(url) as nokey:
        with pytest.raises(GatewayError) as missing:
            await nokey.reweight("support-a", 0)
        assert missing.value.status == 401
    assert core.gateway.combinations["support-a"].weight == 3


async def test_an_unreachable_gateway_is_said_plainly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with HttpOperator(url, ADMIN) as op:
        with pytest.raises(Unreachable) as down:
            await op.status()
        with pytest.raises(Unreachable):
            await op.export_package("support", tmp_path)
    assert down.value.status == 503 and url in down.value.message
    assert ADMIN not in down.value.message
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_http_operator_has_every_operator_method() -> None:
    wanted: Any = [n for n in vars(actions.Operator) if not n.startswith("_")]
    assert wanted and all(callable(getattr(HttpOperator, n, None)) for n in wanted)
