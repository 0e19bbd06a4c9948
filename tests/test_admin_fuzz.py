"""Arbitrary JSON on every admin action: a 4xx in the OpenAI error shape naming what is wrong,
never a 5xx, and the gateway keeps serving."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from rswitch.admin.api import ENDPOINTS, PREFIX
from rswitch.core import Core
from rswitch.server import create_app
from tests.conftest import make_config

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["weight", "template_id", "template", "name", "variables", "default_model", "default_provider"]
FIELDS += ["version", "include_analytics", "logs_limit"]
FIELDS += ["candidates", "models", "rows", "split", "evaluator", "budget_calls", "seed", "dry_run"]
ACTIONS = [
    PREFIX + e.path.format(combination_id="support-a", template_id="support", run_id="r1")
    for e in ENDPOINTS
    if e.method == "POST" and not e.upload
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp: Path = tmp_path_factory.mktemp("admin-fuzz")
    core = Core(make_config(tmp, {"gateway": {"optimization": {"enabled": True, "interval_seconds": 3600}}}))
    with TestClient(create_app(core), base_url="http://localhost") as c:
        yield c


@settings(
    max_examples=int(os.environ.get("RSWITCH_FUZZ_EXAMPLES", "250")),
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(ACTIONS),
    body=json_values | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
)
def test_no_json_body_on_an_admin_action_gets_a_5xx(client: TestClient, path: str, body: Any) -> None:
    r = client.post(path, json=body)
    assert r.status_code < 500, (path, body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"]
    else:
        assert r.headers["content-type"].startswith(("application/json", "application/gzip"))
    assert client.get(PREFIX + "/snapshot").status_code == 200
