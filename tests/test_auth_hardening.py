"""Who may call, hardened: DNS rebinding on the key-free loopback setup, per-key token estimates
given back when a call fails or its client leaves, and template-limited keys on embeddings and on
the stats and optimizer views. Through real requests to the ASGI app."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rswitch.auth import hash_key, new_key
from rswitch.cli import app as rswitch_app
from rswitch.config import ConfigError
from tests.conftest import make_config

APP_KEY = new_key()
SUM_KEY = new_key()
ADMIN_KEY = new_key()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- rswitch key create ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shop\n", "shop\nevil", "\nshop", "shop "])
def test_key_create_refuses_a_name_with_a_newline_or_space(name):
    r = CliRunner().invoke(rswitch_app, ["key", "create", name])
    assert r.exit_code == 2
    assert "key name must be" in r.output
    assert "rsk-" not in r.output  # no key was made


def test_key_create_names_are_the_names_the_config_takes(tmp_path):
    r = CliRunner().invoke(rswitch_app, ["key", "create", "shop.eu@team-1"])
    assert r.exit_code == 0, r.output
    with pytest.raises(ConfigError):  # so a name refused here is refused by the config too
        make_config(tmp_path, {"gateway": {"auth": {"keys": [{"name": "shop\n", "hash": hash_key(APP_KEY)}]}}})
