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


def test_a_misspelt_section_is_named_without_its_value(tmp_path):
    """`config check` on `gatway:` printed the whole section after "(got {…})" on one line."""
    section = {
        "combinations": [
            {"id": f"c{i}", "model": "m", "provider": "p", "prompt": "x" * 50} for i in range(20)
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config({"gatway": section})
    [problem] = info.value.problems
    assert str(problem).startswith("gatway: unknown top-level key; did you mean 'gateway'?")
    assert "(got" not in str(problem) and "combinations" not in str(problem)


def test_a_long_bad_value_is_abridged_to_one_short_line():
    long_url = "http://" + "x" * 500
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"model_providers": {"p": {"type": "openai", "base_url": long_url, "models": "m" * 300}}}
        )
    [problem] = info.value.problems
    line = str(problem)
    assert line.startswith("model_providers.p.models: ") and "(got 'mmmm" in line
    shown = line.split("(got ", 1)[1]
    assert shown.endswith("…)") and len(shown) <= 82  # ~80 characters of the value, then "…"
    assert len(line) < 200


def test_a_short_bad_value_is_shown_whole():
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {"strategy": "fastest"}})
    assert "(got 'fastest')" in str(info.value)


def test_embeddings_on_a_provider_that_cannot_embed_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "model_providers": {"claude": {"type": "anthropic"}, "enc": {"type": "encoder"}},
                "gateway": {"embeddings": {"provider": "claude", "model": "claude-3-haiku"}},
            }
        )
    [problem] = info.value.problems
    assert problem.path == "gateway.embeddings.provider"
    assert "'claude' is of type anthropic, which serves no embeddings; allowed: enc" in str(problem)


def test_embeddings_on_an_unknown_provider_is_a_config_error_listing_those_that_embed():
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "model_providers": {"claude": {"type": "anthropic"}, "enc": {"type": "encoder"}},
                "gateway": {"embeddings": {"provider": "ghost", "model": "m"}},
            }
        )
    [problem] = info.value.problems
    assert problem.path == "gateway.embeddings.provider"
    assert str(problem) == "gateway.embeddings.provider: unknown provider; allowed: enc (got 'ghost')"


def test_the_embedding_provider_types_are_those_whose_provider_embeds():
    from rswitch.config import EMBEDDING_PROVIDER_TYPES, PROVIDER_TYPES
    from rswitch.providers import build_provider
    from rswitch.providers.base import Provider

    for kind in PROVIDER_TYPES:
        provider = build_provider(
            "p", parse_config({"model_providers": {"p": {"type": kind}}}).model_providers["p"], None
        )
        embeds = type(provider).embed is not Provider.embed
        assert embeds == (kind in EMBEDDING_PROVIDER_TYPES), kind
