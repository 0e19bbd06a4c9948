"""Upstream providers. `build_provider` imports a provider module only when a config uses it."""

from __future__ import annotations

import importlib
from typing import Any

from rswitch.providers.base import ChatCall, EmbedCall, Provider, UpstreamError

_CLASSES = {
    "openai": ("rswitch.providers.openai", "OpenAIProvider"),
    "anthropic": ("rswitch.providers.anthropic", "AnthropicProvider"),
    "ollama": ("rswitch.providers.ollama", "OllamaProvider"),
    "mock": ("rswitch.providers.mock", "MockProvider"),
    "local": ("rswitch.providers.local", "LocalProvider"),
    "encoder": ("rswitch.providers.encoder", "EncoderProvider"),
}


def build_provider(
    name: str, settings: Any, api_key: str | None, request_timeout: float | None = None
) -> Provider:
    """The provider for `settings`; its attempt timeouts leave room for a fallback within
    `request_timeout` (the gateway's request deadline) when given."""
    module, cls = _CLASSES[settings.type]
    provider: Provider = getattr(importlib.import_module(module), cls)(name, settings, api_key)
    if request_timeout is not None:
        from rswitch.config import provider_timeouts

        provider.timeouts = provider_timeouts(settings, request_timeout)
    return provider


__all__ = ["ChatCall", "EmbedCall", "Provider", "UpstreamError", "build_provider"]
