"""rswitch: a self-hosted LLM gateway with a terminal UI."""

__version__ = "0.1.0"
