"""Which key each upstream is sent. The standard $OPENAI_API_KEY / $ANTHROPIC_API_KEY go only
to OpenAI's and Anthropic's own https hosts; a provider anywhere else (a local vLLM, a
third-party endpoint) gets a key only through its api_key_env, and the start-up summary and
`config check` say so. The fakes record the headers each request arrived with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app, startup_summary
from rswitch.config import ProviderConfig, parse_config, resolve_api_key
from tests.conftest import BASE_CONFIG, SUPPORT_VARS, chat, merge
from tests.fakes import anthropic_fake, openai_fake

OPENAI_KEY = "sk-operators-openai-key"
ANTHROPIC_KEY = "sk-ant-operators-key"
OWN_KEY = "sk-this-servers-own-key"

runner = CliRunner()


@pytest.fixture(autouse=True)
def operator_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("RSWITCH_TEST_OWN_KEY", OWN_KEY)


def gateway_config(providers: dict[str, Any]) -> dict[str, Any]:
    name = next(iter(providers))
    return {
        "model_providers": providers,
        "gateway": {
            "combinations": [{"id": "up", "template_id": "support", "model": "some-model", "provider": name}]
        },
    }


def sent_keys(fake: Any, header: str) -> list[str | None]:
    return [h.get(header) for h in fake.recorder.headers]


async def call_both(gw: Any) -> None:
    """A chat call and an embeddings call through the combination."""
    await gw.post(chat(model="up", variables=SUPPORT_VARS))
    await gw.client.post("/v1/embeddings", json={"model": "up", "input": "x"})


async def test_openai_key_is_not_sent_to_another_server(make_gateway):
    with openai_fake.running() as local:
        gw = await make_gateway(gateway_config({"vllm": {"type": "openai", "base_url": local.base_url}}))
        await call_both(gw)
    assert len(local.recorder.headers) == 2  # both calls arrived
    assert sent_keys(local, "authorization") == [None, None]
    assert gw.core.key_sources["vllm"] == (
        "none ($OPENAI_API_KEY goes only to https://api.openai.com; set api_key_env)"
    )


@pytest.mark.parametrize(
    ("api_key_env", "expected"),
    [("RSWITCH_TEST_OWN_KEY", OWN_KEY), ("OPENAI_API_KEY", OPENAI_KEY)],  # named: the operator chose it
)
async def test_a_server_gets_the_key_its_api_key_env_names(make_gateway, api_key_env, expected):
    with openai_fake.running() as local:
        gw = await make_gateway(
            gateway_config(
                {"vllm": {"type": "openai", "base_url": local.base_url, "api_key_env": api_key_env}}
            )
        )
        await call_both(gw)
    assert sent_keys(local, "authorization") == [f"Bearer {expected}"] * 2


async def test_anthropic_key_is_not_sent_to_another_server(make_gateway):
    with anthropic_fake.running() as proxy:
        gw = await make_gateway(gateway_config({"claude": {"type": "anthropic", "base_url": proxy.base_url}}))
        await gw.post(chat(model="up", variables=SUPPORT_VARS))
    [headers] = proxy.recorder.headers
    assert ANTHROPIC_KEY not in headers.values() and f"Bearer {ANTHROPIC_KEY}" not in headers.values()
    with anthropic_fake.running() as proxy:
        gw = await make_gateway(
            gateway_config(
                {
                    "claude": {
                        "type": "anthropic",
                        "base_url": proxy.base_url,
                        "api_key_env": "RSWITCH_TEST_OWN_KEY",
                    }
                }
            )
        )
        await gw.post(chat(model="up", variables=SUPPORT_VARS))
    assert sent_keys(proxy, "x-api-key") == [OWN_KEY]


@pytest.mark.parametrize(
    ("kind", "base_url", "gets_standard_key"),
    [
        ("openai", None, True),  # the default is OpenAI itself
        ("openai", "https://api.openai.com/v1", True),
        ("openai", "https://API.OpenAI.com:443/v1/", True),
        ("openai", "https://eu.api.openai.com/v1", True),  # OpenAI's data-residency host
        ("openai", "http://api.openai.com/v1", False),  # not over plain http
        ("openai", "https://api.openai.com:8443/v1", False),
        ("openai", "https://api.openai.com.example.net/v1", False),
        ("openai", "https://api.openai.com@example.net/v1", False),
        ("openai", "https://example.net/api.openai.com/v1", False),
        ("openai", "https://notapi.openai.com/v1", False),
        ("openai", "http://127.0.0.1:8000/v1", False),
        ("openai", "https://openrouter.ai/api/v1", False),
        ("openai", "https://api.anthropic.com/v1", False),  # the other vendor's host
        ("openai", "https://[::1/v1", False),  # unparseable: nothing
        ("anthropic", None, True),
        ("anthropic", "https://api.anthropic.com", True),
        ("anthropic", "https://api.openai.com", False),
        ("anthropic", "http://127.0.0.1:4000", False),
    ],
)
def test_which_hosts_get_the_standard_key(kind, base_url, gets_standard_key):
    key, source = resolve_api_key("p", ProviderConfig(type=kind, base_url=base_url))
    standard = OPENAI_KEY if kind == "openai" else ANTHROPIC_KEY
    assert (key == standard) is gets_standard_key
    assert key is None or gets_standard_key
    assert standard not in source


def test_an_explicit_key_is_sent_wherever_the_operator_points_it():
    assert resolve_api_key("p", ProviderConfig(type="openai", base_url="http://10.0.0.5/v1", api_key="sk-x"))[
        0
    ] == ("sk-x")
    assert resolve_api_key(
        "p", ProviderConfig(type="openai", base_url="http://10.0.0.5/v1", api_key_env="OPENAI_API_KEY")
    ) == (OPENAI_KEY, "$OPENAI_API_KEY")


def config_file(tmp_path: Path, providers: dict[str, Any]) -> Path:
    data = merge(BASE_CONFIG, {"model_providers": providers})
    data["dataset"] = {"base_path": str(tmp_path / "prompts")}
    data["analytics"] = {"path": str(tmp_path / "analytics.duckdb")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_check_warns_that_the_standard_key_is_no_longer_sent(tmp_path):
    path = config_file(
        tmp_path,
        {
            "vllm": {"type": "openai", "base_url": "http://127.0.0.1:8000/v1"},
            "keyless": {"type": "openai", "base_url": "http://127.0.0.1:8001/v1", "api_key_env": None},
            "named": {
                "type": "openai",
                "base_url": "http://127.0.0.1:8002/v1",
                "api_key_env": "OPENAI_API_KEY",
            },
            "proxy": {"type": "anthropic", "base_url": "http://127.0.0.1:4000"},
            "openai": {"type": "openai"},
        },
    )
    r = runner.invoke(app, ["config", "check", str(path)])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    by_provider = {w.split(":")[1].strip(): w for w in warnings}
    assert sorted(by_provider) == ["model_providers.proxy", "model_providers.vllm"]
    vllm, proxy = by_provider["model_providers.vllm"], by_provider["model_providers.proxy"]
    assert "$OPENAI_API_KEY is not sent to http://127.0.0.1:8000/v1" in vllm
    assert "set api_key_env" in vllm and "api_key_env: null if it needs none" in vllm
    assert "$ANTHROPIC_API_KEY is not sent to http://127.0.0.1:4000" in proxy
    assert OPENAI_KEY not in r.output and ANTHROPIC_KEY not in r.output


async def test_startup_summary_says_why_a_server_gets_no_key(make_gateway):
    gw = await make_gateway(
        {"model_providers": {"vllm": {"type": "openai", "base_url": "http://127.0.0.1:8000/v1"}}}
    )
    lines = startup_summary(gw.core, "http://127.0.0.1:8080")
    [provider_line] = [line for line in lines if line.strip().startswith("vllm")]
    assert "key: none ($OPENAI_API_KEY goes only to https://api.openai.com; set api_key_env)" in provider_line
    assert any(line.strip().startswith("WARNING") and "model_providers.vllm" in line for line in lines)
    assert OPENAI_KEY not in "\n".join(lines)


def test_explicit_null_api_key_env_means_no_key_and_no_warning():
    cfg = parse_config(
        {
            "model_providers": {
                "vllm": {"type": "openai", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": None}
            }
        }
    )
    from rswitch.config import config_warnings

    assert resolve_api_key("vllm", cfg.model_providers["vllm"])[0] is None
    assert not [w for w in config_warnings(cfg) if "vllm" in w]
