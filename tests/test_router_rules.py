"""The router chain's rules step: decisions on fixed inputs, order, pass-through, explanations."""

from __future__ import annotations

import pytest

from rswitch.config import ConfigError, parse_config
from rswitch.routing.base import Chain, Query
from rswitch.routing.chains import build_chains
from tests.conftest import chat

COMBOS = [
    {"id": "cheap", "template_id": "summarise", "model": "small", "provider": "mock"},
    {"id": "strong", "template_id": "summarise", "model": "large", "provider": "mock", "weight": 0},
    {"id": "vision", "template_id": "summarise", "model": "vl", "provider": "mock", "weight": 0},
    {"id": "tools", "template_id": "summarise", "model": "fn", "provider": "mock", "weight": 0},
]
ROUTING = {
    "tiers": {"premium": ["strong"], "budget": ["cheap"]},
    "default": [
        {
            "type": "rules",
            "name": "fast-path",
            "rules": [
                {"route": "vision", "has_images": True},
                {"route": "combination:tools", "has_tools": True},
                {"route": "tier:premium", "keywords": ["contract", "lawsuit"]},
                {"route": "tier:premium", "min_tokens": 200},
                {"route": "tier:premium", "regex": r"\bprove\b"},
                {"route": "tier:budget", "metadata": {"plan": "free"}},
                {"route": "tier:premium", "min_messages": 6},
            ],
        }
    ],
}
VARS = {"words": 5}


def chains(routing=ROUTING):
    cfg = parse_config(
        {
            "model_providers": {"mock": {"type": "mock"}},
            "gateway": {"combinations": COMBOS},
            "routing": routing,
        }
    )
    return build_chains(cfg.routing)


def q(text="hello", **kw) -> Query:
    return Query([{"role": "user", "content": text}], kw.pop("params", {}), kw.pop("metadata", {}))


@pytest.mark.parametrize(
    ("query", "target", "reason"),
    [
        (
            Query(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this"},
                            {"type": "image_url", "image_url": {"url": "data:x"}},
                        ],
                    }
                ]
            ),
            "combination:vision",
            "rule[0]",
        ),
        (q(params={"tools": [{"type": "function"}]}), "combination:tools", "rule[1]"),
        (q("Please review this CONTRACT clause"), "tier:premium", "keyword='contract'"),
        (q("word " * 900), "tier:premium", "tokens="),
        (q("can you prove it?"), "tier:premium", "regex="),
        (q("hi", metadata={"plan": "free"}), "tier:budget", "rule[5]"),
    ],
)
async def test_each_rule_decides_on_fixed_inputs(query, target, reason):
    default, _ = chains()
    out = await default.route(query)
    assert out.decision is not None and out.decision.target == target
    assert reason in out.decision.reason
    assert out.explain().startswith("fast-path: rule[") and f"=> {target}" in out.explain()


async def test_no_rule_passes_to_the_balancer():
    default, _ = chains()
    out = await default.route(q("a short question"))
    assert out.decision is None
    assert out.explain().startswith("fast-path: pass => balancer (")


async def test_first_deciding_step_wins_and_later_steps_are_not_consulted():
    routing = {
        **ROUTING,
        "default": [
            {"type": "rules", "name": "first", "rules": [{"route": "cheap", "keywords": ["refund"]}]},
            {
                "type": "rules",
                "name": "second",
                "rules": [{"route": "strong", "keywords": ["refund", "hello"]}],
            },
        ],
    }
    default, _ = chains(routing)
    out = await default.route(q("refund please"))
    assert out.decision.step == "first" and out.trace == [
        "first: rule[0] keyword='refund' -> combination:cheap"
    ]
    out = await default.route(q("hello there"))
    assert out.decision.step == "second" and out.trace[0] == "first: pass"


async def test_routing_narrows_the_pool_and_explains_in_header_and_analytics(make_gateway):
    gw = await make_gateway({"gateway": {"combinations": COMBOS}, "routing": ROUTING})
    r = await gw.post(chat("this contract is unfair", variables=VARS))
    assert r.headers["x-rswitch-combination"] == "strong"
    assert "keyword='contract' -> tier:premium" in r.headers["x-rswitch-route"]
    r = await gw.post(chat("summarise this", variables=VARS, stream=True))
    assert r.headers["x-rswitch-combination"] == "cheap" and "=> balancer" in r.headers["x-rswitch-route"]
    routes = [row["route"] for row in gw.analytics_rows()]
    assert "tier:premium" in routes[0] and "balancer" in routes[1]
    # a pinned combination is never re-routed
    r = await gw.post(chat("contract", variables=VARS, metadata={"combination_id": "cheap"}))
    assert r.headers["x-rswitch-combination"] == "cheap" and "x-rswitch-route" not in r.headers


async def test_template_chain_overrides_the_default(make_gateway):
    routing = {
        **ROUTING,
        "templates": {
            "summarise": [{"type": "rules", "rules": [{"route": "vision", "keywords": ["contract"]}]}]
        },
    }
    gw = await make_gateway({"gateway": {"combinations": COMBOS}, "routing": routing})
    r = await gw.post(chat("contract", model="summarise", variables=VARS))
    assert r.headers["x-rswitch-combination"] == "vision"
    r = await gw.post(chat("contract", variables=VARS))  # not a template request: the default chain
    assert r.headers["x-rswitch-combination"] == "strong"


@pytest.mark.parametrize(
    ("routing", "fragment"),
    [
        (
            {"default": [{"type": "rules", "rules": [{"route": "tier:gold"}]}]},
            "routing.default[0].rules[0].route: unknown tier",
        ),
        (
            {"default": [{"type": "rules", "rules": [{"route": "nope"}]}]},
            "routing.default[0].rules[0].route: unknown combination id",
        ),
        (
            {"default": [{"type": "rules", "rules": [{"route": "cheap", "regex": "("}]}]},
            "routing.default[0].rules[0].regex: not a valid regular expression",
        ),
        (
            {"default": [{"type": "rules", "rules": [{"route": "cheap", "colour": "red"}]}]},
            "routing.default[0].rules[0].colour: unknown key",
        ),
        ({"default": [{"type": "magic", "rules": []}]}, "routing.default[0].type"),
        ({"tiers": {"x": ["ghost"]}}, "routing.tiers.x[0]: unknown combination id"),
        ({"surprise": 1}, "routing.surprise: unknown key"),
    ],
)
def test_bad_routing_blocks_are_errors_with_key_paths(routing, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_config(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "gateway": {"combinations": COMBOS},
                "routing": routing,
            }
        )
    assert fragment in str(exc.value)


def test_empty_chain_is_none():
    default, per_template = build_chains(parse_config({}).routing)
    assert default is None and per_template == {}
    assert isinstance(chains()[0], Chain)


def test_cli_route_explain(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from rswitch.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "templates": {"summarise": {"template": "S {words}"}},
                "gateway": {"combinations": COMBOS},
                "routing": ROUTING,
            }
        )
    )
    r = CliRunner().invoke(app, ["route", "explain", "Is this contract valid?", "-c", str(cfg)])
    assert r.exit_code == 0 and "keyword='contract'" in r.output and "tier:premium → strong" in r.output
    r = CliRunner().invoke(app, ["route", "explain", "hi", "-c", str(cfg), "--metadata", "plan=free"])
    assert "tier:budget → cheap" in r.output
    r = CliRunner().invoke(app, ["route", "explain", "hi", "-c", str(cfg)])
    assert "decision    pass" in r.output


async def test_config_text_in_rules_is_matched_literally_never_run_as_code():
    """The rules compile to one Python function; quotes, backslashes and code-like text in
    keywords and metadata are data in it, matched literally."""
    tricky = ['it\'s "quoted"', "back\\slash", "x' or True or '", "__import__('os')"]
    routing = {
        "default": [
            {
                "type": "rules",
                "rules": [
                    {"route": "strong", "keywords": tricky[:2]},
                    {"route": "tools", "metadata": {"plan": tricky[2]}},
                    {"route": "vision", "keywords": [tricky[3]]},
                ],
            }
        ]
    }
    chain, _ = chains(routing)
    assert (await chain.route(q("nothing special"))).decision is None
    assert (await chain.route(q('so IT\'S "QUOTED" then'))).decision.target == "combination:strong"
    assert (await chain.route(q("a back\\slash here"))).decision.target == "combination:strong"
    assert (await chain.route(q("hi", metadata={"plan": tricky[2]}))).decision.target == "combination:tools"
    assert (await chain.route(q("hi", metadata={"plan": "free"}))).decision is None
    assert (await chain.route(q("call __import__('os') now"))).decision.target == "combination:vision"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_answer_still_says_how_the_request_was_routed(make_gateway, stream):
    combos = [{**c, "provider": "down"} if c["id"] == "strong" else c for c in COMBOS]
    gw = await make_gateway(
        {
            "model_providers": {
                "down": {"type": "mock", "mock": {"failure_rate": 1.0, "failure_status": 500}}
            },
            "gateway": {"combinations": combos, "max_attempts": 1},
            "routing": ROUTING,
        }
    )
    r = await gw.post(chat("this contract is unfair", variables=VARS, stream=stream))
    assert r.status_code == 502  # the upstream's 500, as a gateway error
    assert "keyword='contract' -> tier:premium" in r.headers["x-rswitch-route"]
    assert len(r.headers["x-rswitch-request-id"]) == 32
