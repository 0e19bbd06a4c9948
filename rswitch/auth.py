"""Who may call: client keys for the app endpoints, the admin key for everything that changes
state or shows the whole gateway, and the guards against web pages in the operator's browser.

Framework-free (header values in, `GatewayError` out), so the server stays a thin face.

Keys are stored as `sha256:<hex>` of the key, never the key. Plain SHA-256, not a salted slow
hash, because the keys are not passwords: `rswitch key create` makes 256 random bits, and a
hash of a 256-bit random secret cannot be reversed or guessed whether salted or not (salt and
stretching only help secrets a person could guess). It also lets a presented key be found with
one dict lookup of its digest. That lookup compares digests, not keys: an attacker who times it
learns how many leading bytes of SHA-256(their guess) match a stored digest, which says nothing
about the key (finding a key for a chosen digest prefix is a preimage search). The admin key is
compared with `hmac.compare_digest`. Keys given through `key_env` / `admin_key_env` must be at
least MIN_KEY_CHARS long for the same reason.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rswitch.config import AuthConfig, ConfigError, ConfigProblem
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.ratelimit import ProviderLimiter

KEY_PREFIX = "rsk-"
MIN_KEY_CHARS = 32
ADMIN_NAME = "admin"  # the client name recorded for calls made with the admin key
JSON_TYPES = ("application/json",)


def new_key() -> str:
    """A new client or admin key: 32 random bytes, URL-safe, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _from_hash(text: str) -> bytes:
    return bytes.fromhex(text.partition(":")[2])


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' are loopback; anything else (0.0.0.0, ::, a name) is not."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class ClientKey:
    name: str
    templates: frozenset[str] | None
    limiter: ProviderLimiter | None

    def admit(self, est: int) -> Ticket:
        """Take this request from the key's rpm/tpm buckets, or answer 429 with Retry-After."""
        if self.limiter is not None:
            bucket = self.limiter.tpm
            if bucket is not None:
                est = min(est, int(bucket.capacity))  # one request never holds more than one window
            wait = self.limiter.try_acquire(est)
            if wait > 0:
                raise GatewayError(
                    429,
                    f"rate limit of API key '{self.name}' reached (gateway.auth.keys rpm/tpm); retry later",
                    error_type="rate_limit_error",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
        return Ticket(self, est)

    def readable(self, template_id: Any, part: str | None = None) -> None:
        """A view of `template_id` (or of its combination `part`): 403 for a key limited to others."""
        if self.templates is None or template_id in self.templates:
            return
        of = f" ('{part}' is one of its combinations)" if part and part != template_id else ""
        raise GatewayError(
            403,
            f"API key '{self.name}' may read only template(s) {', '.join(sorted(self.templates)) or '(none)'}, "
            f"not template '{str(template_id)[:100]}'{of}",
            error_type="permission_error",
            code="template_not_allowed",
        )

    def only_own(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows (optimizer runs, trials) of this key's templates: all of them for an unlimited key."""
        if self.templates is None:
            return rows
        return [r for r in rows if r.get("template_id") in self.templates]


ADMIN = ClientKey(ADMIN_NAME, None, None)


class Ticket:
    """One request made with a key: what the pipeline sees as `Prepared.client`."""

    __slots__ = ("est", "key", "name", "settled")

    def __init__(self, key: ClientKey, est: int) -> None:
        self.key = key
        self.name = key.name
        self.est = est
        self.settled = False

    def check(self, route: Any) -> None:
        """A key limited to templates may only be routed to them (403 otherwise)."""
        allowed = self.key.templates
        if allowed is None:
            return
        tid = route.candidates[0].template_id
        if route.pool_key.partition("|")[0] == "*":  # nothing named: balanced over every template
            raise GatewayError(
                403,
                f"API key '{self.name}' may call only template(s) {', '.join(sorted(allowed)) or '(none)'}: "
                "name one with metadata.template_id or model",
                error_type="permission_error",
                code="template_not_allowed",
            )
        if tid not in allowed:
            raise GatewayError(
                403,
                f"API key '{self.name}' may not call template '{tid}'; "
                f"allowed: {', '.join(sorted(allowed)) or '(none)'}",
                error_type="permission_error",
                code="template_not_allowed",
            )
        route.candidates = [c for c in route.candidates if c.template_id in allowed]  # fallbacks too

    def check_embedding(self, route_id: str, template_id: str | None) -> None:
        """A key limited to templates may embed only through a combination of one of them (a
        combination id as `model` or metadata.combination_id); any other route is 403."""
        allowed = self.key.templates
        if allowed is None or template_id in allowed:
            return
        names = ", ".join(sorted(allowed)) or "(none)"
        why = (
            f"'{route_id}' is a combination of template '{template_id}'"
            if template_id is not None
            else f"'{route_id}' is not a combination of them"
        )
        raise GatewayError(
            403,
            f"API key '{self.name}' may call only template(s) {names}, so it may embed only through "
            f"their combinations (name one as model or metadata.combination_id); {why}",
            error_type="permission_error",
            code="template_not_allowed",
        )

    def settle(self, used: int) -> None:
        """Correct the key's tpm bucket once, with the tokens really used (0 when nothing answered)."""
        if self.settled:
            return
        self.settled = True
        limiter = self.key.limiter
        if limiter is not None:
            limiter.settle(self.est, used)


def missing_key() -> GatewayError:
    return GatewayError(
        401,
        "missing API key: send it as 'Authorization: Bearer <key>' (see gateway.auth in the README)",
        error_type="authentication_error",
        code="missing_api_key",
    )


def wrong_key() -> GatewayError:
    return GatewayError(
        403, "the API key is not valid", error_type="permission_error", code="invalid_api_key"
    )


def needs_admin(path: str, configured: bool) -> GatewayError:
    why = (
        "send the admin key (gateway.auth.admin_key_env)"
        if configured
        else "no admin key is configured (set gateway.auth.admin_key_env or admin_key_hash)"
    )
    return GatewayError(
        403, f"{path} needs the admin key: {why}", error_type="permission_error", code="admin_only"
    )


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Auth:
    """The gateway's keys, built once at start. `None` in the server when none are configured."""

    def __init__(self, keys: dict[bytes, ClientKey], admin: bytes | None) -> None:
        self.keys = keys
        self.admin_digest = admin

    @classmethod
    def from_config(cls, cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> Auth | None:
        """Read hashes and environment variables; a missing or short key stops the start."""
        env = os.environ if environ is None else environ
        problems: list[ConfigProblem] = []

        def secret(path: str, var: str) -> bytes | None:
            value = env.get(var)
            if not value:
                problems.append(ConfigProblem(path, f"environment variable {var} is not set"))
                return None
            if len(value) < MIN_KEY_CHARS:
                problems.append(
                    ConfigProblem(
                        path,
                        f"the key in {var} is shorter than {MIN_KEY_CHARS} characters; "
                        "make one with `rswitch key create NAME`",
                    )
                )
                return None
            return _digest(value)

        keys: dict[bytes, ClientKey] = {}
        for i, k in enumerate(cfg.keys):
            path = f"gateway.auth.keys[{i}]"
            digest = _from_hash(k.hash) if k.hash else secret(f"{path}.key_env", k.key_env or "")
            if digest is None:
                continue
            if digest in keys:
                problems.append(ConfigProblem(path, f"the same key as '{keys[digest].name}'"))
                continue
            limiter = ProviderLimiter(k.rpm, k.tpm) if (k.rpm or k.tpm) else None
            keys[digest] = ClientKey(k.name, None if k.templates is None else frozenset(k.templates), limiter)
        admin: bytes | None = None
        if cfg.admin_key_env and cfg.admin_key_hash:
            problems.append(ConfigProblem("gateway.auth", "give admin_key_env or admin_key_hash, not both"))
        elif cfg.admin_key_env:
            admin = secret("gateway.auth.admin_key_env", cfg.admin_key_env)
        elif cfg.admin_key_hash:
            admin = _from_hash(cfg.admin_key_hash)
        if admin is not None and admin in keys:
            problems.append(ConfigProblem("gateway.auth", "the admin key must differ from every client key"))
        if problems:
            raise ConfigError(problems)
        if not keys and admin is None:
            return None
        return cls(keys, admin)

    def _is_admin(self, digest: bytes) -> bool:
        return self.admin_digest is not None and hmac.compare_digest(digest, self.admin_digest)

    def client(self, authorization: str | None) -> ClientKey | None:
        """For the app endpoints (/v1/chat/completions, /v1/embeddings, /v1/models): a client key
        or the admin key. Open to all when no client keys are configured (an SDK's dummy key is
        then ignored, as before)."""
        if not self.keys:
            return None
        token = bearer(authorization)
        if token is None:
            raise missing_key()
        digest = _digest(token)
        key = self.keys.get(digest)
        if key is not None:
            return key
        if self._is_admin(digest):
            return ADMIN
        raise wrong_key()

    def admin(self, authorization: str | None, path: str) -> None:
        """For mutations and the operator's views: the admin key only."""
        token = bearer(authorization)
        if token is None:
            raise missing_key()
        digest = _digest(token)
        if self._is_admin(digest):
            return
        if digest in self.keys:  # a valid client key, but not for this
            raise needs_admin(path, self.admin_digest is not None)
        raise wrong_key()


def json_content_type(content_type: str | None) -> GatewayError | None:
    """JSON endpoints take JSON only. A web page can send text/plain or a form cross-site without
    asking the browser's CORS preflight; refusing them (415) keeps such pages out."""
    if content_type:
        media = content_type.partition(";")[0].strip().lower()
        if media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
            return None
    got = f"'{content_type}'" if content_type else "none"
    return GatewayError(
        415,
        f"send the body as JSON with 'Content-Type: application/json' (got {got})",
        code="unsupported_media_type",
    )


def foreign_origin(origin: str | None, host: str | None, allowed: frozenset[str]) -> GatewayError | None:
    """A mutation sent by a web page of another origin (not in gateway.cors.allow_origins) → 403."""
    if origin is None or origin in allowed or "*" in allowed:
        return None
    if host and origin.partition("://")[2] == host:  # the gateway's own origin
        return None
    return GatewayError(
        403,
        f"requests from origin '{origin[:100]}' may not change rswitch (gateway.cors.allow_origins)",
        error_type="permission_error",
        code="origin_not_allowed",
    )


LOOPBACK_HOSTS = frozenset({"localhost", "localhost.", "ip6-localhost", "[::1]"})


def host_names(bind_host: str | None) -> frozenset[str] | None:
    """The Host names a key-free gateway answers to: loopback names and the address it was told to
    bind. None (no check) when it is bound beyond loopback: that takes --insecure-no-auth, the
    operator's word that anyone who reaches it may call. `bind_host=None` (in-process) is loopback."""
    if bind_host is not None and not is_loopback(bind_host):
        return None
    names = set(LOOPBACK_HOSTS)
    if bind_host:
        bound = bind_host.lower().strip("[]")
        names.add(f"[{bound}]" if ":" in bound else bound)
    return frozenset(names)


def foreign_host(host: str | None, names: frozenset[str]) -> GatewayError | None:
    """A request addressed to a name that is not this key-free loopback gateway's → 403.

    A web page can point its own name at 127.0.0.1 (DNS rebinding); the browser then sends
    rswitch the page's requests, and its Origin matches that Host, so only the Host tells. One
    header and a set or prefix test per request. 127.x.x.x is matched only as digits and dots:
    a name like '127.evil.example' is the attacker's."""
    if host:
        host = host.lower()
        name = host[: host.find("]") + 1] if host[0] == "[" else host.partition(":")[0]
        if name in names or (name.startswith("127.") and name.replace(".", "").isdigit()):
            return None
    got = f"'{host[:100]}'" if host else "none"
    return GatewayError(
        403,
        f"requests addressed to Host {got} are refused: without client keys (gateway.auth.keys) rswitch answers only "
        "requests to localhost, 127.0.0.1, [::1] or the address it listens on, so a web page cannot "
        "reach it through DNS rebinding (configure client keys to serve other names)",
        error_type="permission_error",
        code="host_not_allowed",
    )
