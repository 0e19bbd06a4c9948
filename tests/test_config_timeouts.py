"""Per-provider attempt limits that cannot take effect are refused with the key named, before
anything is served: `timeout_seconds` ends an attempt, so a longer first-byte, idle or
connect limit would silently never apply."""

from __future__ import annotations

import pytest

from rswitch.config import ConfigError, parse_config


def provider_config(**limits: float) -> dict:
    return {
        "gateway": {"request_timeout_seconds": 30},
        "model_providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", **limits}},
    }


@pytest.mark.parametrize(
    "key", ["first_byte_timeout_seconds", "idle_timeout_seconds", "connect_timeout_seconds"]
)
def test_a_limit_longer_than_the_attempts_timeout_is_refused_naming_both(key):
    with pytest.raises(ConfigError) as info:
        parse_config(provider_config(timeout_seconds=3, **{key: 8}))
    [problem] = info.value.problems
    assert problem.path == f"model_providers.up.{key}"
    assert "timeout_seconds (3)" in str(info.value) and "(got 8" in str(info.value)


def test_limits_within_the_attempts_timeout_are_accepted():
    cfg = parse_config(
        provider_config(timeout_seconds=10, first_byte_timeout_seconds=10, idle_timeout_seconds=4)
    )
    assert cfg.model_providers["up"].first_byte_timeout_seconds == 10


def test_a_limit_past_the_request_deadline_is_named_once():
    with pytest.raises(ConfigError) as info:
        parse_config(provider_config(timeout_seconds=60, first_byte_timeout_seconds=45))
    [problem] = info.value.problems
    assert "gateway.request_timeout_seconds (30)" in problem.message
