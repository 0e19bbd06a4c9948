"""Config keys: a misspelt top-level section is an error naming it, Route-Switch's sections
are accepted, and the new gateway keys validate."""

from __future__ import annotations

import pytest

from rswitch.config import ConfigError, config_warnings, parse_config


def test_a_misspelt_top_level_section_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        parse_config({"gatway": {"strategy": "round_robin"}})
    text = str(info.value)
    assert "gatway" in text and "unknown top-level key" in text and "did you mean 'gateway'" in text


def test_every_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {}, "routerr": {}, "extras": 1})
    names = {p.path for p in info.value.problems}
    assert names == {"routerr", "extras"}


def test_route_switchs_mipro_v2_section_is_accepted_with_a_warning():
    cfg = parse_config({"mipro_v2": {"num_candidates": 10}})
    assert any("mipro_v2" in w and "gateway.optimization" in w for w in config_warnings(cfg))


def test_max_rate_wait_seconds_defaults_to_5_and_rejects_negatives():
    assert parse_config({}).gateway.max_rate_wait_seconds == 5.0
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {"max_rate_wait_seconds": -1}})
    assert "gateway.max_rate_wait_seconds" in str(info.value)
