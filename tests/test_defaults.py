"""The built-in default config: sample templates on the local model, plus what is detected."""

from __future__ import annotations

from rswitch.defaults import LOCAL_MODEL, SAMPLES, default_config
from tests.fakes import ollama_fake


def test_without_keys_or_ollama_every_sample_template_runs_on_the_local_model(monkeypatch, tmp_path):
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("RSWITCH_DATA_DIR", str(tmp_path))
    cfg, notes = default_config()
    combos = {c.id: c for c in cfg.gateway.combinations}
    samples = {m.parent.name for m in SAMPLES.glob("*/manifest.yaml")}
    assert {"support-reply", "summarise", "classify-intent", "extract-json"} <= samples
    assert set(combos) == {f"{t}-local" for t in samples}
    assert all(c.provider == "local" and c.model == LOCAL_MODEL for c in combos.values())
    assert set(cfg.model_providers) == {"local", "encoder"}  # chat on the local model, embeddings static
    assert (
        cfg.dataset_dir == tmp_path / "prompts"
        and cfg.analytics_file == tmp_path / "analytics" / "metrics.duckdb"
    )
    text = "\n".join(notes)
    assert (
        "not set   OPENAI_API_KEY" in text
        and "not set   ANTHROPIC_API_KEY" in text
        and "no answer Ollama" in text
    )


def test_keys_and_a_running_ollama_add_combinations_that_fall_back_to_local(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("RSWITCH_DATA_DIR", str(tmp_path))
    with ollama_fake.running(models=["llama3.2:latest", "qwen2.5:0.5b"]) as fake:
        monkeypatch.setenv("OLLAMA_HOST", fake.base_url)
        cfg, notes = default_config()
    combos = {c.id: c for c in cfg.gateway.combinations}
    assert combos["summarise-openai"].model == "gpt-4o-mini" and combos["summarise-openai"].fallbacks == [
        "summarise-local"
    ]
    assert combos["summarise-anthropic"].provider == "anthropic"
    assert combos["summarise-ollama"].model == "llama3.2:latest"
    assert cfg.model_providers["ollama"].base_url == fake.base_url
    text = "\n".join(notes)
    assert (
        "detected  OPENAI_API_KEY" in text and "detected  ANTHROPIC_API_KEY" in text and "2 model(s)" in text
    )
    assert "sk-test-openai" not in text
