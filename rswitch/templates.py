"""Prompt templates: `{var}` rendering and a registry of YAML manifests on disk.

A template lives at `<dataset.base_path>/<id>/manifest.yaml`, next to its dataset; with
`storage: {backend: postgres}` its versions live in the database instead (a VersionStore,
rswitch.storage.pg_templates), so that every replica registers into and serves from one place.
Rendering is one pass: `{name}` is replaced by the variable's value, `{{` and `}}` are
literal braces, and a value that itself contains `{x}` is never expanded again.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

log = logging.getLogger("rswitch.templates")

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TemplateError(ValueError):
    """A template could not be registered or found."""


class MissingVariables(ValueError):
    def __init__(self, template_id: str, missing: list[str]) -> None:
        self.template_id = template_id
        self.missing = missing
        super().__init__(f"template '{template_id}' is missing variable(s): {', '.join(missing)}")


def placeholders(text: str) -> list[str]:
    """Variable names in order of first appearance."""
    seen: dict[str, None] = {}
    for m in _TOKEN.finditer(text):
        if m.group(1):
            seen.setdefault(m.group(1))
    return list(seen)


def render(
    text: str, variables: dict[str, Any], template_id: str = "", names: list[str] | None = None
) -> str:
    missing = [name for name in (placeholders(text) if names is None else names) if name not in variables]
    if missing:
        raise MissingVariables(template_id, missing)

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0]  # "{{" -> "{", "}}" -> "}"
        value = variables[name]
        return value if isinstance(value, str) else str(value)

    return _TOKEN.sub(sub, text)


def check_id(template_id: str) -> str:
    if not ID_PATTERN.fullmatch(template_id or ""):  # fullmatch: "$" alone lets "id\n" through
        raise TemplateError(
            f"invalid template id {template_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return template_id


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Template:
    id: str
    template: str
    name: str = ""
    variables: list[str] = field(default_factory=list)
    default_model: str | None = None
    default_provider: str | None = None
    version: int = 1
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    demos: list[dict[str, str]] = field(default_factory=list)  # few-shot turns: {"user", "assistant"}
    provenance: dict[str, Any] = field(default_factory=dict)  # who wrote this version: optimizer run, score …
    source: str = "registry"  # registry | inline (the config file) | bundled (a template_dirs folder)

    def __post_init__(self) -> None:
        found = placeholders(self.template)
        self._names = found  # rendering checks these without rescanning the text
        if not self.variables:
            self.variables = found
        else:
            undeclared = [v for v in found if v not in self.variables]
            if undeclared:
                raise TemplateError(
                    f"template '{self.id}' uses undeclared variable(s) {', '.join(undeclared)}; "
                    f"declared: {', '.join(self.variables)}"
                )
        self.name = self.name or self.id
        for i, d in enumerate(self.demos):
            if (
                not isinstance(d, dict)
                or not isinstance(d.get("user"), str)
                or not isinstance(d.get("assistant"), str)
            ):
                raise TemplateError(
                    f"template '{self.id}': demos[{i}] must have 'user' and 'assistant' strings"
                )

    def render(self, variables: dict[str, Any]) -> str:
        return render(self.template, variables, self.id, self._names)

    def demo_messages(self) -> list[dict[str, str]]:
        """The demos as chat turns that go between the system prompt and the client's messages."""
        out: list[dict[str, str]] = []
        for d in self.demos:
            out.append({"role": "user", "content": d["user"]})
            out.append({"role": "assistant", "content": d["assistant"]})
        return out

    def manifest(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: a few lines of `&a [*b, *b, …]` expand to
    billions of strings once anything copies them (`Template.manifest` does, under the lock)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases and anchors are not allowed in rswitch files", event.start_mark
            )
        return super().compose_node(parent, index)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # what rswitch writes, it can read back
        return True


def load_yaml_text(text: str) -> Any:
    """yaml.safe_load without anchors or aliases (a YAMLError names where one is)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def write_yaml(path: Path, data: Any) -> None:
    """Write YAML atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.dump(data, fh, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)


Signature = tuple[int, int, int]  # (inode, size, mtime_ns) of a manifest file


def _signature(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_manifest(path: Path) -> Template:
    """One manifest file as a Template; raises (TemplateError, yaml or OS errors) if it is broken."""
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise TemplateError(f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return template_from(data)


def template_from(data: Any) -> Template:
    """A manifest's fields (as written by `Template.manifest`) as a Template; TemplateError if broken."""
    if not isinstance(data, dict):
        raise TemplateError("a manifest must be a mapping of template fields")
    for key in ("id", "template"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise TemplateError(f"'{key}' must be a non-empty string")
    return Template(**{k: v for k, v in data.items() if k in Template.__dataclass_fields__ and k != "source"})


_STR_OR_NONE = ("default_model", "default_provider")
_STR = ("name", "created_at", "updated_at")


def check_manifest(data: Any, prefix: str = "") -> Template:
    """A manifest from outside (a package) as a Template, refused unless `template register`
    could have written it: a valid id, non-blank text, declared variables, typed fields, a
    version of 1 or more, no unknown fields. Errors name the field, after `prefix`."""
    if not isinstance(data, dict):
        raise TemplateError(f"{prefix.rstrip('.') or 'the manifest'} must be a mapping of template fields")
    known = [k for k in Template.__dataclass_fields__ if k != "source"]
    for key in data:
        if key not in known:
            where = f" in {prefix.rstrip('.')}" if prefix else ""
            raise TemplateError(f"unknown field {key!r}{where} (known: {', '.join(known)})")
    try:
        check_id(data.get("id") if isinstance(data.get("id"), str) else "")
    except TemplateError as exc:
        raise TemplateError(f"{prefix}id: {exc}") from None
    if not isinstance(data.get("template"), str) or not data["template"].strip():
        raise TemplateError(f"{prefix}template must be a non-empty string")
    for key in _STR:
        if key in data and not isinstance(data[key], str):
            raise TemplateError(f"{prefix}{key} must be a string")
    for key in _STR_OR_NONE:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise TemplateError(f"{prefix}{key} must be a string")
    names = data.get("variables", [])
    if not isinstance(names, list) or not all(isinstance(v, str) and v for v in names):
        raise TemplateError(f"{prefix}variables must be a list of names")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise TemplateError(f"{prefix}version {version!r} must be an integer")
    if version < 1:
        raise TemplateError(f"{prefix}version {version!r} must be 1 or more")
    if not isinstance(data.get("demos", []), list):
        raise TemplateError(f"{prefix}demos must be a list")
    if not isinstance(data.get("provenance", {}), dict):
        raise TemplateError(f"{prefix}provenance must be a mapping")
    try:
        return Template(**data)
    except TemplateError as exc:
        raise TemplateError(f"{prefix.rstrip('.') + ': ' if prefix else ''}{exc}") from None


@dataclass
class ManifestChanges:
    """What a scan of the manifest folders found changed (read off the request path)."""

    parsed: list[tuple[Path, Signature, str, Template]] = field(default_factory=list)  # path, sig, source
    errors: list[tuple[Path, Signature, str]] = field(default_factory=list)  # a broken manifest and why
    removed: list[Path] = field(default_factory=list)
    # with a VersionStore: the versions other processes registered there, newer than the served ones
    stored: list[Template] = field(default_factory=list)
    stored_errors: list[tuple[str, int, str]] = field(default_factory=list)  # id, version, why not served
    store_error: str | None = None  # the store did not answer: why


Stored = tuple[str, int, Any]  # template_id, version, its manifest as stored


class VersionStore(Protocol):
    """Where a registry keeps its templates' versions instead of manifest files (Postgres:
    rswitch.storage.pg_templates). Manifests in, manifests out; the highest version is current."""

    where: str  # for messages: "Postgres at host:port/db"

    def heads(self) -> dict[str, int]: ...
    def read(self, wanted: dict[str, int]) -> list[Stored]: ...
    def current(self) -> list[Stored]: ...
    def versions(self, template_id: str) -> list[tuple[int, Any]]: ...
    def append(
        self, template_id: str, make: Callable[[int | None, Any], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]: ...
    def import_once(self, template_id: str, manifests: list[dict[str, Any]]) -> bool: ...
    def close(self) -> None: ...


def _unstamped(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's fields without what each registration sets anew."""
    return {k: v for k, v in manifest.items() if k not in ("version", "created_at", "updated_at")}


def _stored_template(template_id: str, version: int, manifest: Any) -> Template:
    tpl = template_from(manifest)
    if tpl.id != template_id:
        raise TemplateError(f"the manifest stored under '{template_id}' has id '{tpl.id}'")
    tpl.version = version  # the store's key is the truth
    return tpl


class TemplateRegistry:
    """Templates registered on disk (or in a VersionStore) plus inline ones from the config.
    Thread-safe.

    A running gateway picks up manifests that other processes write (`rswitch template
    register`, `template rollback`) through `scan` (stat calls, and parsing only what changed;
    with a store, one query for each template's highest version) and `apply` (a swap under the
    lock); see rswitch.templates_watch."""

    def __init__(self, base_dir: Path, versions: VersionStore | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.versions = versions
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._templates: dict[str, Template] = {}
        self._seen: dict[Path, Signature] = {}  # manifests as last scanned
        self._imported: dict[Path, Signature] = {}  # with a store: the disk's manifests as last imported
        self._disk_looked = False  # with a store: the disk was looked at once (at start)
        self._refused: dict[str, int] = {}  # with a store: an unservable version, reported once
        self.load_errors: list[str] = []
        if versions is not None:  # a registry a command drops without closing closes its store then
            weakref.finalize(self, versions.close)
        self.reload()

    def manifest_path(self, template_id: str) -> Path:
        return self.base_dir / check_id(template_id) / "manifest.yaml"

    def location(self, template_id: str | None = None) -> str:
        """Where registered templates (or this one) are kept, for messages."""
        if self.versions is not None:
            return self.versions.where
        return str(self.base_dir if template_id is None else self.manifest_path(template_id))

    def close(self) -> None:
        if self.versions is not None:
            self.versions.close()

    @staticmethod
    def read_dir(directory: Path) -> tuple[list[Template], list[str]]:
        """Every `<directory>/<id>/manifest.yaml`, and a message for each that is broken."""
        found: list[Template] = []
        errors: list[str] = []
        if Path(directory).is_dir():
            for manifest in sorted(Path(directory).glob("*/manifest.yaml")):
                try:
                    found.append(read_manifest(manifest))
                except Exception as exc:  # one bad manifest must not hide the others
                    errors.append(f"{manifest}: {exc}")
        return found, errors

    def scan(self, bundled: list[Path] | tuple[Path, ...] = ()) -> ManifestChanges:
        """Stat every manifest under the registry folder (and `bundled` template_dirs) and parse
        the ones that changed since the last `apply`. Blocking file I/O: call it off the event
        loop. Changes nothing; `apply` does."""
        changes = ManifestChanges()
        with self._scan_lock:
            present: set[Path] = set()
            registered = [(self.base_dir, "registry")] if self.versions is None else []
            for directory, source in [*registered, *((Path(d), "bundled") for d in bundled)]:
                if not directory.is_dir():
                    continue
                for manifest in sorted(directory.glob("*/manifest.yaml")):
                    present.add(manifest)
                    sig = _signature(manifest)
                    if sig is None or self._seen.get(manifest) == sig:
                        continue
                    try:
                        changes.parsed.append((manifest, sig, source, read_manifest(manifest)))
                    except Exception as exc:
                        changes.errors.append((manifest, sig, f"{type(exc).__name__}: {exc}"))
            changes.removed = [p for p in list(self._seen) if p not in present]
            if self.versions is not None:
                self._poll(changes)
        return changes

    def _poll(self, changes: ManifestChanges) -> None:
        """The versions registered in the store since this registry last served one."""
        assert self.versions is not None
        try:
            heads = self.versions.heads()
            with self._lock:
                served = {t.id: t.version for t in self._templates.values() if t.source == "registry"}
            wanted = {
                tid: v for tid, v in heads.items() if v > served.get(tid, 0) and self._refused.get(tid) != v
            }
            stored = self.versions.read(wanted)
        except Exception as exc:
            changes.store_error = f"{type(exc).__name__}: {exc}"
            return
        for tid, version, manifest in stored:
            try:
                changes.stored.append(_stored_template(tid, version, manifest))
            except Exception as exc:
                changes.stored_errors.append((tid, version, f"{type(exc).__name__}: {exc}"))

    def apply(self, changes: ManifestChanges) -> ManifestChanges:
        """Serve what `scan` parsed; returns what took effect: the templates served anew, the
        broken manifests (each reported once, until it changes again) and the removed ones.

        A registered manifest wins over a bundled one, and a bundled one over the config's own.
        A file written again since it was read is left for the next scan, so an older read never
        replaces a newer version."""
        done = ManifestChanges()
        with self._lock:
            for path, sig, source, tpl in changes.parsed:
                if _signature(path) != sig:
                    continue
                self._seen[path] = sig
                current = self._templates.get(tpl.id)
                if source == "bundled" and current is not None and current.source != "bundled":
                    continue
                if current is not None and current.source == source and current.manifest() == tpl.manifest():
                    continue
                tpl.source = source
                self._templates[tpl.id] = tpl
                done.parsed.append((path, sig, source, tpl))
            for path, sig, problem in changes.errors:
                if _signature(path) == sig:
                    self._seen[path] = sig
                    done.errors.append((path, sig, problem))
            for path in changes.removed:
                if self._seen.pop(path, None) is not None:
                    done.removed.append(path)
            for tpl in changes.stored:  # a newer version than the one served: another process wrote it
                current = self._templates.get(tpl.id)
                if current is not None and current.source == "registry" and current.version >= tpl.version:
                    continue
                tpl.source = "registry"
                self._templates[tpl.id] = tpl
                done.stored.append(tpl)
            for tid, version, problem in changes.stored_errors:
                if self._refused.get(tid) != version:
                    self._refused[tid] = version
                    done.stored_errors.append((tid, version, problem))
            done.store_error = changes.store_error
        return done

    def reload(self) -> None:
        if self.versions is not None:
            self._reload_stored()
            return
        found, errors = self.read_dir(self.base_dir)
        with self._lock:
            inline = {k: v for k, v in self._templates.items() if v.source != "registry"}
            self._templates = {**inline, **{t.id: t for t in found}}  # a registered manifest wins
            self.load_errors = errors

    def _reload_stored(self) -> None:
        assert self.versions is not None
        errors = self._import_disk()
        loaded: list[Template] = []
        for tid, version, manifest in self.versions.current():
            try:
                loaded.append(_stored_template(tid, version, manifest))
            except Exception as exc:
                errors.append(f"{self.versions.where}: template '{tid}' version {version}: {exc}")
        for tpl in loaded:
            tpl.source = "registry"
        with self._lock:
            inline = {k: v for k, v in self._templates.items() if v.source != "registry"}
            self._templates = {**inline, **{t.id: t for t in loaded}}  # a registered version wins
            self.load_errors = errors

    def _import_disk(self) -> list[str]:
        """Manifests on this machine's disk, from before its templates moved to the store: a template
        the store has no version of is imported with its earlier versions, once (whichever replica
        comes first). A manifest written after this registry first looked (a package import, new or
        replacing a template) is imported, or becomes the next version if it differs from the current
        one. Returns the broken manifests' messages."""
        assert self.versions is not None
        errors: list[str] = []
        started, self._disk_looked = self._disk_looked, True
        if not self.base_dir.is_dir():
            return errors
        for path in sorted(self.base_dir.glob("*/manifest.yaml")):
            sig = _signature(path)
            if sig is None or self._imported.get(path) == sig:
                continue
            try:
                tpl = read_manifest(path)
            except Exception as exc:
                errors.append(f"{path}: {exc}")
                continue
            self._imported[path] = sig
            versions = self._disk_versions(path, tpl)
            if self.versions.import_once(tpl.id, versions):
                log.info(
                    "template '%s': imported %d version(s) from %s into %s; its versions live there from now on",
                    tpl.id,
                    len(versions),
                    path,
                    self.versions.where,
                )
            elif started:  # unless another process (a worker of the same box) registered it first
                registered = self._register_stored(tpl, unless_current=True)
                if registered is not None:
                    log.info(
                        "template '%s': %s was written; registered as version %d",
                        tpl.id,
                        path,
                        registered.version,
                    )
            else:
                log.debug(
                    "template '%s' is in %s already; %s is not imported", tpl.id, self.versions.where, path
                )
        return errors

    @staticmethod
    def _disk_versions(path: Path, tpl: Template) -> list[dict[str, Any]]:
        """A manifest's earlier versions (`versions/v<N>.yaml`) and itself, oldest first."""
        by_version: dict[int, dict[str, Any]] = {}
        folder = path.parent / "versions"
        for f in sorted(folder.glob("v*.yaml")) if folder.is_dir() else ():
            try:
                old = template_from(load_yaml_text(f.read_text(encoding="utf-8")))
            except Exception as exc:
                log.warning("template '%s': %s is not imported: %s", tpl.id, f, exc)
                continue
            if old.id == tpl.id and old.version < tpl.version:
                by_version[old.version] = old.manifest()
        by_version[tpl.version] = tpl.manifest()
        return [by_version[v] for v in sorted(by_version)]

    def get(self, template_id: str) -> Template | None:
        with self._lock:
            return self._templates.get(template_id)

    def history(self, template_id: str) -> list[dict[str, Any]]:
        """Earlier versions' manifests, oldest first (the current one is `get`)."""
        if self.versions is not None:
            check_id(template_id)
            current = self.get(template_id)
            below = current.version if current is not None and current.source == "registry" else None
            return [
                {**m, "version": v}
                for v, m in self.versions.versions(template_id)
                if isinstance(m, dict) and (below is None or v < below)
            ]
        folder = self.base_dir / check_id(template_id) / "versions"
        out = (
            [load_yaml_text(f.read_text(encoding="utf-8")) for f in folder.glob("v*.yaml")]
            if folder.is_dir()
            else []
        )
        return sorted((v for v in out if isinstance(v, dict)), key=lambda v: v.get("version", 0))

    def rollback(self, template_id: str, version: int) -> Template:
        """Make an earlier version current again, as a new version (history only grows)."""
        current = self.get(template_id)
        if current is None or current.source != "registry":
            raise TemplateError(f"unknown registered template id '{template_id}'")
        old = next((v for v in self.history(template_id) if v.get("version") == version), None)
        if old is None:
            known = [v.get("version") for v in self.history(template_id)]
            raise TemplateError(
                f"template '{template_id}' has no earlier version {version} (earlier versions: {known or 'none'}; current: {current.version})"
            )
        fields = {
            k: v
            for k, v in old.items()
            if k in Template.__dataclass_fields__
            and k not in ("source", "version", "created_at", "updated_at")
        }
        fields["provenance"] = {"rollback_of": version, "previous_version": current.version}
        return self.register(Template(**fields))

    def list(self) -> list[Template]:
        with self._lock:
            return sorted(self._templates.values(), key=lambda t: t.id)

    def add_inline(self, tpl: Template, source: str = "inline") -> None:
        """Add a template that is not registered on disk (from the config or a bundled folder)."""
        tpl.source = source
        with self._lock:
            self._templates.setdefault(tpl.id, tpl)

    def register(self, tpl: Template) -> Template:
        """Write (or replace, bumping the version) a template's manifest atomically."""
        if self.versions is not None:
            registered = self._register_stored(tpl)
            assert registered is not None
            return registered
        path = self.manifest_path(tpl.id)
        with self._lock:
            old = self._templates.get(tpl.id)
            if old is not None:  # a new version of it, whether it came from disk, the config or a bundle
                tpl.version = old.version + 1
                tpl.created_at = old.created_at
                write_yaml(
                    path.parent / "versions" / f"v{old.version}.yaml", old.manifest()
                )  # keep every version
            tpl.updated_at = _now()
            write_yaml(path, tpl.manifest())
            tpl.source = "registry"
            self._templates[tpl.id] = tpl
        return tpl

    def _register_stored(self, tpl: Template, unless_current: bool = False) -> Template | None:
        """The next version in the store: numbered there, under its lock, so that two processes
        registering at once get n+1 and n+2. A template served from the config or a bundle that the
        store has never seen goes in first as the version before. `unless_current`: None, and
        nothing written, when the current version holds the same fields already."""
        assert self.versions is not None
        check_id(tpl.id)
        with self._lock:
            local = self._templates.get(tpl.id)
        base = local.manifest() if local is not None and local.source != "registry" else None
        fields = tpl.manifest()

        def make(version: int | None, latest: Any) -> list[dict[str, Any]]:
            if unless_current and isinstance(latest, dict) and _unstamped(latest) == _unstamped(fields):
                return []
            previous = latest if isinstance(latest, dict) and version is not None else base
            before = version if version is not None else (base["version"] if base is not None else 0)
            new = {
                **fields,
                "version": before + 1,
                "created_at": (previous or fields).get("created_at", fields["created_at"]),
                "updated_at": _now(),
            }
            return [base, new] if version is None and base is not None else [new]

        added = self.versions.append(tpl.id, make)
        if not added:
            return None
        stored = added[-1]
        tpl.version, tpl.created_at = stored["version"], stored["created_at"]
        tpl.updated_at = stored["updated_at"]
        tpl.source = "registry"
        with self._lock:
            current = self._templates.get(tpl.id)
            if current is None or current.source != "registry" or current.version < tpl.version:
                self._templates[tpl.id] = tpl
        return tpl
