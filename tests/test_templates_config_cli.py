"""Template rendering, config validation, and the CLI commands around them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.config import ConfigError, parse_config
from rswitch.templates import (
    MissingVariables,
    Template,
    TemplateError,
    TemplateRegistry,
    placeholders,
    render,
)

runner = CliRunner()


# -- rendering ---------------------------------------------------------------------------------


def test_render_replaces_once_and_escapes_braces():
    text = 'Reply as {role}. Output JSON like {{"a": 1}}. Topic: {topic}'
    out = render(text, {"role": "{topic}", "topic": "tea"})
    assert out == 'Reply as {topic}. Output JSON like {"a": 1}. Topic: tea'  # not expanded again


def test_render_names_every_missing_variable():
    with pytest.raises(MissingVariables) as exc:
        render("{a} {b} {c}", {"b": 1}, "tpl")
    assert exc.value.missing == ["a", "c"]
    assert "tpl" in str(exc.value)


def test_non_identifier_braces_are_left_alone():
    assert placeholders("{ not a var } {1x} {ok}") == ["ok"]
    assert render("{ not a var } {ok}", {"ok": "y"}) == "{ not a var } y"


def test_template_rejects_undeclared_variables():
    with pytest.raises(TemplateError, match="undeclared"):
        Template(id="t", template="{a} {b}", variables=["a"])


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "-x", "x" * 200])
def test_template_ids_cannot_escape_the_data_dir(tmp_path, bad):
    reg = TemplateRegistry(tmp_path)
    with pytest.raises(TemplateError):
        reg.register(Template(id=bad, template="x"))
    assert list(tmp_path.iterdir()) == []


def test_registry_versions_and_reload(tmp_path):
    reg = TemplateRegistry(tmp_path)
    reg.register(Template(id="greet", template="Hello {name}"))
    second = reg.register(Template(id="greet", template="Hi {name}!"))
    assert second.version == 2
    again = TemplateRegistry(tmp_path)
    assert again.get("greet").template == "Hi {name}!" and again.get("greet").version == 2


def test_bad_manifest_is_reported_not_fatal(tmp_path):
    TemplateRegistry(tmp_path).register(Template(id="good", template="x"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.yaml").write_text("id: broken\ntemplate: [unclosed")
    reg = TemplateRegistry(tmp_path)
    assert reg.get("good") is not None
    assert any("broken" in e for e in reg.load_errors)


# -- config ------------------------------------------------------------------------------------


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return [str(p) for p in exc.value.problems]


def test_config_reports_every_problem_with_key_path_value_and_allowed():
    found = problems(
        {
            "gateway": {
                "strategy": "fastest",
                "combinations": [
                    {
                        "id": "a",
                        "model": "m",
                        "provider": "nope",
                        "prompt": "x",
                        "weight": -2,
                        "colour": "red",
                    },
                    {"id": "a", "model": "m", "provider": "p", "template_id": "t", "fallbacks": ["zzz"]},
                ],
            },
            "model_providers": {"p": {"type": "mock"}},
        }
    )
    text = "\n".join(found)
    assert "gateway.strategy" in text and "'fastest'" in text and "round_robin" in text
    assert "gateway.combinations[0].weight" in text and "-2" in text
    assert "gateway.combinations[0].colour: unknown key" in text


def test_config_semantic_problems_are_named():
    found = problems(
        {
            "gateway": {
                "combinations": [
                    {"id": "a", "model": "m", "provider": "nope", "prompt": "x"},
                    {"id": "a", "model": "m", "provider": "p", "template_id": "t", "fallbacks": ["zzz"]},
                    {"id": "b", "model": "m", "provider": "p"},
                ]
            },
            "model_providers": {"p": {"type": "mock"}},
        }
    )
    text = "\n".join(found)
    assert "gateway.combinations[0].provider: unknown provider; allowed: p (got 'nope')" in text
    assert "gateway.combinations[1].id: duplicate combination id" in text
    assert "gateway.combinations[1].fallbacks[0]: unknown combination id" in text and "'zzz'" in text
    assert "gateway.combinations[2]: needs either template_id or an inline prompt" in text


def test_seed_style_inline_prompts_share_a_template(tmp_path):
    from rswitch.core import build_combinations, open_registry

    cfg = parse_config(
        {
            "gateway": {
                "combinations": [
                    {
                        "id": "default",
                        "name": "default",
                        "prompt": "Default onboarding prompt: {topic}",
                        "model": "gpt-4",
                        "provider": "openai",
                        "is_primary": True,
                        "weight": 10,
                    },
                    {
                        "id": "fallback",
                        "name": "fallback",
                        "prompt": "Default onboarding prompt: {topic}",
                        "model": "gpt-3.5-turbo",
                        "provider": "openai",
                        "weight": 5,
                    },
                ]
            },
            "model_providers": {"openai": {"type": "openai", "rate_limit": 1200}},
            "dataset": {"base_path": str(tmp_path)},
        }
    )
    combos = build_combinations(cfg, open_registry(cfg))
    assert combos[0].template_id == combos[1].template_id
    assert combos[0].template_id.startswith("inline-")


# -- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "dataset": {"base_path": "data/prompts"},
                "analytics": {"path": "data/a.duckdb"},
            }
        )
    )
    return path


def test_cli_template_register_list_show_render(cfg_file, tmp_path):
    r = runner.invoke(
        app,
        [
            "template",
            "register",
            "--config",
            str(cfg_file),
            "--template-id",
            "welcome",
            "--name",
            "Welcome",
            "--prompt-text",
            "Welcome {user} to {place}.",
            "--default-model",
            "m",
            "--default-provider",
            "mock",
        ],
    )
    assert r.exit_code == 0, r.output
    manifest = yaml.safe_load((tmp_path / "data" / "prompts" / "welcome" / "manifest.yaml").read_text())
    assert manifest["variables"] == ["user", "place"] and manifest["default_provider"] == "mock"

    r = runner.invoke(app, ["template", "list", "--config", str(cfg_file)])
    assert r.exit_code == 0 and "welcome" in r.output and "user, place" in r.output

    r = runner.invoke(app, ["template", "show", "welcome", "--config", str(cfg_file)])
    assert r.exit_code == 0 and "Welcome {user} to {place}." in r.output

    r = runner.invoke(
        app,
        [
            "template",
            "render",
            "welcome",
            "--var",
            "user=Ada",
            "--var",
            "place=Paris",
            "--config",
            str(cfg_file),
        ],
    )
    assert r.exit_code == 0 and r.output.strip() == "Welcome Ada to Paris."

    r = runner.invoke(app, ["template", "render", "welcome", "--var", "user=Ada", "--config", str(cfg_file)])
    assert r.exit_code != 0 and "place" in r.output


def test_cli_register_from_file_and_errors(cfg_file, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Summarise {text}")
    r = runner.invoke(
        app,
        ["template", "register", "-c", str(cfg_file), "--template-id", "sum", "--prompt-file", str(prompt)],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["template", "register", "-c", str(cfg_file), "--template-id", "x"])
    assert r.exit_code != 0 and "exactly one of --prompt-text or --prompt-file" in r.output
    r = runner.invoke(
        app,
        [
            "template",
            "register",
            "-c",
            str(cfg_file),
            "--template-id",
            "x",
            "--prompt-text",
            "a",
            "--default-provider",
            "ghost",
        ],
    )
    assert r.exit_code != 0 and "ghost" in r.output
    r = runner.invoke(app, ["template", "show", "nope", "-c", str(cfg_file)])
    assert r.exit_code != 0 and "unknown template id 'nope'" in r.output


def test_cli_config_check(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"m": {"type": "mock"}},
                "gateway": {"combinations": [{"id": "c", "prompt": "hi {x}", "model": "m", "provider": "m"}]},
            }
        )
    )
    r = runner.invoke(app, ["config", "check", str(good)])
    assert r.exit_code == 0 and "ok" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "strategy": "x",
                    "combinations": [{"id": "c", "template_id": "missing", "model": "m", "provider": "m"}],
                },
                "model_providers": {"m": {"type": "mock", "timeout_seconds": -1}},
            }
        )
    )
    r = runner.invoke(app, ["config", "check", str(bad)])
    assert r.exit_code == 1
    assert "gateway.strategy" in r.output and "model_providers.m.timeout_seconds" in r.output
    unknown_tpl = tmp_path / "tpl.yaml"
    unknown_tpl.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"m": {"type": "mock"}},
                "gateway": {
                    "combinations": [{"id": "c", "template_id": "missing", "model": "m", "provider": "m"}]
                },
            }
        )
    )
    r = runner.invoke(app, ["config", "check", str(unknown_tpl)])
    assert r.exit_code == 1 and "gateway.combinations[0].template_id" in r.output and "'missing'" in r.output
    notyaml = tmp_path / "n.yaml"
    notyaml.write_text("gateway: [")
    r = runner.invoke(app, ["config", "check", str(notyaml)])
    assert r.exit_code == 1 and "not valid YAML" in r.output


def test_key_in_config_file_warns_without_printing_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"model_providers": {"o": {"type": "openai", "api_key": "sk-inline-secret"}}})
    )
    r = runner.invoke(app, ["config", "check", str(path)])
    assert r.exit_code == 0
    assert "model_providers.o.api_key" in r.output and "sk-inline-secret" not in r.output


def test_python_dash_m_works():
    out = subprocess.run(
        [sys.executable, "-m", "rswitch", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "serve" in out.stdout


@pytest.mark.parametrize(
    ("addr", "expected"),
    [(":8080", ("0.0.0.0", 8080)), ("127.0.0.1:9000", ("127.0.0.1", 9000)), ("[::1]:7000", ("::1", 7000))],
)
def test_seed_style_addr(addr, expected):
    from rswitch.cli import parse_addr

    assert parse_addr(addr) == expected


def test_bad_addr_is_a_clear_error():
    r = runner.invoke(app, ["serve", "--addr", "nonsense"])
    assert r.exit_code != 0 and "--addr must look like" in r.output


def test_registry_keeps_every_earlier_version(tmp_path):
    reg = TemplateRegistry(tmp_path)
    reg.register(Template(id="g", template="one {x}"))
    reg.register(Template(id="g", template="two {x}"))
    reg.register(Template(id="g", template="three {x}"))
    assert [v["template"] for v in reg.history("g")] == ["one {x}", "two {x}"]
    assert [v["version"] for v in reg.history("g")] == [1, 2]
    assert reg.get("g").version == 3
