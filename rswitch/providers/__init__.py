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


def build_provider(name: str, settings: Any, api_key: str | None) -> Provider:
    module, cls = _CLASSES[settings.type]
    return getattr(importlib.import_module(module), cls)(name, settings, api_key)


__all__ = ["ChatCall", "EmbedCall", "Provider", "UpstreamError", "build_provider"]
