"""Keys kept out of packages: every key the config could use, whether or not rswitch sends it
anywhere — the standard $OPENAI_API_KEY withheld from a local server, and the client and admin
keys of gateway.auth, whose variables no name pattern catches."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.config import parse_config, secrets_to_withhold
from rswitch.storage.datasets import DatasetStore

runner = CliRunner()

OPENAI_KEY = "sk-operators-openai-key-0123"
ADMIN_KEY = "rsw-admin-0123456789abcdef"
CLIENT_KEY = "rsw-client-alice-0123456789"


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("RSWITCH_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("APP_ALICE", CLIENT_KEY)


def config(tmp_path: Path) -> dict:
    return {
        # a local OpenAI-compatible server: $OPENAI_API_KEY is not sent to it
        "model_providers": {"vllm": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "templates": {"support": {"template": "You support {product}."}},
        "gateway": {
            "combinations": [{"id": "s", "template_id": "support", "model": "m", "provider": "vllm"}],
            "auth": {
                "keys": [{"name": "alice", "key_env": "APP_ALICE"}],
                "admin_key_env": "RSWITCH_ADMIN_KEY",
            },
        },
        "dataset": {"base_path": str(tmp_path / "prompts")},
        "analytics": {"path": str(tmp_path / "analytics.duckdb")},
    }


def export(tmp_path: Path, pasted: str) -> tuple[int, str, Path]:
    """A dataset row holding `pasted` (a user pasted it into a message), exported by the CLI."""
    store = DatasetStore(tmp_path / "prompts", 1000)
    store.import_rows(
        "support",
        [
            {
                "messages": [{"role": "user", "content": f"my key is {pasted}"}],
                "variables": {"product": "Acme"},
            }
        ],
    )
    store.close()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp_path)))
    out = tmp_path / "out"
    r = runner.invoke(
        app, ["package", "export", "--template-id", "support", "-c", str(cfg), "--output-dir", str(out)]
    )
    return r.exit_code, r.output, out


def test_the_list_holds_the_standard_key_withheld_from_a_local_server_and_the_auth_keys(tmp_path):
    cfg = parse_config(config(tmp_path))
    assert set(secrets_to_withhold(cfg)) == {OPENAI_KEY, ADMIN_KEY, CLIENT_KEY}


@pytest.mark.parametrize(
    ("pasted", "origin"),
    [
        (OPENAI_KEY, "$OPENAI_API_KEY"),
        # $RSWITCH_ADMIN_KEY and $APP_ALICE end in no *_API_KEY/_TOKEN/_SECRET pattern: before,
        # only the providers' keys were on the list and these went into the package
        (ADMIN_KEY, "a key the config uses"),
        (CLIENT_KEY, "a key the config uses"),
    ],
)
def test_an_export_holding_a_key_the_config_uses_is_refused_and_writes_nothing(tmp_path, pasted, origin):
    code, output, out = export(tmp_path, pasted)
    assert code != 0
    assert f"dataset.sqlite contains a secret (the value of {origin})" in output
    assert pasted not in output
    assert list(out.iterdir()) == []
