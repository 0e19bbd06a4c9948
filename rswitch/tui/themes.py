"""Themes are data: YAML files (Posting's format) turned into Textual `Theme` objects.

Bundled themes live in the repo's `themes/`; users add their own under
`<XDG data dir>/rswitch/themes/`. A bad file is reported (once, by the caller) and skipped."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import platformdirs
import yaml
from textual.theme import Theme


def _bundled() -> Path:
    """The repo's themes/ (a checkout or an editable install), else where the wheel put them."""
    repo = Path(__file__).resolve().parent.parent.parent / "themes"
    if repo.is_dir():
        return repo
    return Path(sys.prefix) / "share" / "rswitch" / "themes"


BUNDLED = _bundled()
COLOUR_KEYS = (
    "primary",
    "secondary",
    "accent",
    "background",
    "surface",
    "panel",
    "foreground",
    "success",
    "warning",
    "error",
)
HEX = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$")
DEFAULT_THEME = "brutalist"


def user_dir() -> Path:
    return Path(platformdirs.user_data_dir("rswitch")) / "themes"


def parse_theme(data: Any, source: str) -> Theme:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a theme must be a mapping")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: 'name' is required")
    unknown = set(data) - {"name", "dark", "variables", *COLOUR_KEYS}
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    if "primary" not in data:
        raise ValueError(f"{source}: 'primary' is required")
    for key in COLOUR_KEYS:
        if key in data and not (isinstance(data[key], str) and HEX.match(data[key])):
            raise ValueError(f"{source}: '{key}' must be a hex colour like '#1f4fbf'; got {data[key]!r}")
    variables = data.get("variables") or {}
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise ValueError(f"{source}: 'variables' must map names to strings")
    colours = {k: data[k] for k in COLOUR_KEYS if k in data}
    return Theme(name=name, dark=bool(data.get("dark", True)), variables=dict(variables), **colours)


def load_themes(*folders: Path) -> tuple[dict[str, Theme], list[str]]:
    """Every valid theme in the folders (later folders win), and a message per bad file."""
    themes: dict[str, Theme] = {}
    errors: list[str] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.y*ml")):
            try:
                theme = parse_theme(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
            except (ValueError, yaml.YAMLError, OSError) as exc:
                errors.append(str(exc))
                continue
            themes[theme.name] = theme
    return themes, errors
