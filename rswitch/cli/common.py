"""What every command shares: the --config option, loading it, failing with one clear message,
reading JSONL files (every bad line named), and printing a list of problems."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from rswitch.config import Config, ConfigError, find_config, load_config
from rswitch.templates import Template, TemplateRegistry

DEFAULT_URL = "http://127.0.0.1:8080"  # a running gateway, for the commands that talk to one

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $RSWITCH_CONFIG, then ./config.yaml, then the built-in default).",
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` in red on stderr; the caller raises what this returns."""
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def fail_with(header: str, problems: list[Any], code: int = 2) -> typer.Exit:
    """A header line, then one indented line per problem."""
    typer.secho(header, err=True, fg=typer.colors.RED)
    for p in problems:
        typer.echo(f"  {p}", err=True)
    return typer.Exit(code)


def load(config: str | None) -> Config:
    """The config the command runs with: the file named, found, or the built-in default."""
    path = find_config(config)
    try:
        if path is None:
            from rswitch.defaults import default_config

            return default_config()[0]
        return load_config(path)
    except ConfigError as exc:
        raise fail(f"invalid config: {exc}") from None


def write_fitted_step(
    config: str | None, template: str | None, index: int, output: Path, edit: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """`route fit --output`: the config file with routing step `index` (of the template's chain,
    or the default one) changed by `edit`, written to `output` (comments are not kept; the
    original is never touched). Returns the edited step."""
    import yaml

    source = find_config(config)
    if source is None:
        raise fail("--output needs a config file (the built-in default has no routing to fit)")
    data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    step = (data["routing"]["templates"][template] if template else data["routing"]["default"])[index]
    edit(step)
    output.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return step


def new_core(cfg: Config) -> Any:
    """A gateway core for one command (start and stop it); a config it cannot be built from is
    the command's error, in one line."""
    from rswitch.core import Core

    try:
        return Core(cfg)
    except Exception as exc:
        raise fail(f"rswitch could not start: {type(exc).__name__}: {exc}") from None


def postgres_datasets(cfg: Config) -> Any:
    """The Postgres dataset store `storage: {backend: postgres}` names, opened for one command
    (close it); an unreachable server or unset DSN is a clear error, without the password."""
    from rswitch.storage.postgres import StorageUnavailable, open_postgres

    try:
        return open_postgres(cfg)[0]
    except StorageUnavailable as exc:
        raise fail(str(exc)) from None


def registry(config: str | None) -> TemplateRegistry:
    from rswitch.core import open_registry
    from rswitch.storage.postgres import StorageUnavailable

    try:
        return open_registry(load(config))
    except ConfigError as exc:
        raise fail(f"invalid config: {exc}") from None
    except StorageUnavailable as exc:  # templates registered in Postgres cannot be read
        raise fail(str(exc)) from None


def get_template(reg: TemplateRegistry, template_id: str) -> Template:
    tpl = reg.get(template_id)
    if tpl is None:
        known = ", ".join(t.id for t in reg.list()) or "none"
        raise fail(f"unknown template id '{template_id}' (known: {known})")
    return tpl


class JsonlError(ValueError):
    """A JSONL file that cannot be used; `problems` names every bad line."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))

    def exit(self, consequence: str = "", code: int = 2) -> typer.Exit:
        """Print every problem and return the exit to raise."""
        if len(self.problems) == 1:
            return fail(self.problems[0] + (f"; {consequence}" if consequence else ""), code)
        header = f"{self.path}: {len(self.problems)} bad lines" + (f"; {consequence}" if consequence else "")
        return fail_with(header, self.problems, code)


def read_jsonl(path: Path, check: Callable[[Any], Any] | None = None) -> list[tuple[int, Any]]:
    """Every non-blank line of a JSONL file as (line number, value).

    `check(value)` returns the value to keep, or raises ValueError with what is wrong with the
    line. All lines are read before anything is returned; a JsonlError names every bad one."""
    import orjson

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise JsonlError(path, [f"cannot read {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise JsonlError(path, [f"{path}: not UTF-8 text"]) from None
    rows: list[tuple[int, Any]] = []
    problems: list[str] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not valid JSON ({exc})")
            continue
        if check is not None:
            try:
                value = check(value)
            except ValueError as exc:
                problems.append(f"{path}:{n}: {exc}")
                continue
        rows.append((n, value))
    if problems:
        raise JsonlError(path, problems)
    if not rows:
        raise JsonlError(path, [f"{path} holds no examples"])
    return rows


def printable(value: object) -> str:
    """Text from outside (a package, a file) made safe for a terminal: control characters and
    escape sequences are shown escaped, never interpreted."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


ADMIN_KEY_ENV = "RSWITCH_ADMIN_KEY"
KEYRING_SERVICE = "rswitch"


def admin_key(url: str) -> str | None:
    """A running gateway's admin key, for every command that talks to one: the environment
    variable, else the OS keyring (service `rswitch`, user the gateway's URL), else None."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if key:
        return key
    try:
        import keyring
    except ImportError:
        return None
    try:
        return keyring.get_password(KEYRING_SERVICE, url.rstrip("/")) or None
    except Exception:  # no usable keyring backend here: as if none were stored
        return None
