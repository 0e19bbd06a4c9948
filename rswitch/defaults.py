"""The embedded default: what `rswitch serve` / `rswitch tui` run with no config at all.

The sample templates, combinations on the embedded local model, and — when they are
there — combinations on OpenAI, Anthropic or a local Ollama server as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import platformdirs

from rswitch.config import Config, parse_config
from rswitch.templates import TemplateRegistry

SAMPLES = Path(__file__).resolve().parent.parent / "sample_prompts"
LOCAL_MODEL = "smollm2-135m-instruct"
ENCODER_MODEL = "wordllama-256"  # the static encoder: /v1/embeddings' default, and the semantic router's
OLLAMA_URL = "http://127.0.0.1:11434"


def ollama_url() -> str:
    """Ollama's own convention: $OLLAMA_HOST, else localhost:11434."""
    host = os.environ.get("OLLAMA_HOST", "").strip()
    if not host:
        return OLLAMA_URL
    return host if "://" in host else f"http://{host}"


def data_dir() -> Path:
    """Where the embedded default keeps datasets and analytics ($RSWITCH_DATA_DIR overrides)."""
    return Path(os.environ.get("RSWITCH_DATA_DIR") or platformdirs.user_data_dir("rswitch"))


def ollama_models(url: str, timeout: float = 0.5) -> list[str] | None:
    """The models a local Ollama server has, or None when none answers."""
    try:
        resp = httpx.get(url + "/api/tags", timeout=timeout)
        resp.raise_for_status()
        return [m["name"] for m in resp.json().get("models", []) if m.get("name")]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def default_config(probe_ollama: bool = True) -> tuple[Config, list[str]]:
    """The built-in config and a line for each thing detected or not."""
    notes: list[str] = []
    templates = [t.id for t in TemplateRegistry.read_dir(SAMPLES)[0]] if SAMPLES.is_dir() else []
    providers: dict[str, Any] = {
        "local": {"type": "local", "models": [LOCAL_MODEL]},
        "encoder": {"type": "encoder", "models": [ENCODER_MODEL]},
    }
    combos: list[dict[str, Any]] = []
    extra: list[tuple[str, str]] = []  # (provider, model) beside the local model

    if os.environ.get("OPENAI_API_KEY"):
        providers["openai"] = {"type": "openai", "api_key_env": "OPENAI_API_KEY"}
        extra.append(("openai", "gpt-4o-mini"))
        notes.append("detected  OPENAI_API_KEY: added openai/gpt-4o-mini combinations")
    else:
        notes.append("not set   OPENAI_API_KEY (set it to add OpenAI combinations)")
    if os.environ.get("ANTHROPIC_API_KEY"):
        providers["anthropic"] = {"type": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"}
        extra.append(("anthropic", "claude-haiku-4-5"))
        notes.append("detected  ANTHROPIC_API_KEY: added anthropic/claude-haiku-4-5 combinations")
    else:
        notes.append("not set   ANTHROPIC_API_KEY (set it to add Anthropic combinations)")
    url = ollama_url()
    models = ollama_models(url) if probe_ollama else None
    if models:
        providers["ollama"] = {"type": "ollama", "base_url": url, "models": models}
        extra.append(("ollama", models[0]))
        notes.append(
            f"detected  Ollama at {url} ({len(models)} model(s)): added ollama/{models[0]} combinations"
        )
    elif models == []:
        notes.append(f"detected  Ollama at {url}, but it has no models (ollama pull …)")
    else:
        notes.append(f"no answer Ollama at {url}")

    for tid in templates:
        local_id = f"{tid}-local"
        for provider, model in extra:  # remote models first; the local one catches their failures
            combos.append(
                {
                    "id": f"{tid}-{provider}",
                    "template_id": tid,
                    "model": model,
                    "provider": provider,
                    "weight": 1,
                    "fallbacks": [local_id],
                }
            )
        combos.append(
            {
                "id": local_id,
                "template_id": tid,
                "model": LOCAL_MODEL,
                "provider": "local",
                "weight": 1,
                "is_primary": not extra,
            }
        )
    if not templates:
        notes.append(f"no sample templates found at {SAMPLES}")

    base = data_dir()
    data = {
        "gateway": {"combinations": combos, "embeddings": {"provider": "encoder", "model": ENCODER_MODEL}},
        "template_dirs": [str(SAMPLES)] if templates else [],
        "model_providers": providers,
        "dataset": {"base_path": str(base / "prompts")},
        "analytics": {"path": str(base / "analytics" / "metrics.duckdb")},
    }
    cfg = parse_config(data)
    cfg.notes = notes
    return cfg, notes
