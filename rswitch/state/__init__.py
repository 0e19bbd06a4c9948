"""Live state shared between rswitch processes and replicas (rate limits, upstream blocks).

The default is local: each process keeps its own, as before. `state: {backend: redis}` keeps
it in Redis (see `shared`), falling back to local state while Redis is unreachable."""

from typing import Any

from rswitch.gateway.ratelimit import ProviderLimiter


def build_limiters(config: Any) -> tuple[Any, dict[str, ProviderLimiter]]:
    """(the shared state or None, every provider's limiter). Every provider gets one: even
    without rpm/tpm it honours an upstream's Retry-After."""
    providers = config.model_providers
    st = config.state
    if st.backend != "redis":
        return None, {name: ProviderLimiter(pc.rate_limit, pc.tpm) for name, pc in providers.items()}
    import importlib.util
    import os

    if importlib.util.find_spec("redis") is None:
        raise RuntimeError("state.backend: redis needs the redis package: pip install 'rswitch[replicas]'")
    from rswitch.state.shared import SharedLimiter, SharedState

    url = st.url or os.environ.get(st.url_env or "", "")
    state = SharedState(url, prefix=st.key_prefix, timeout_ms=st.timeout_ms)
    return state, {
        name: SharedLimiter(name, pc.rate_limit, pc.tpm, state, lease=st.reserve_ms / 1000)
        for name, pc in providers.items()
    }
