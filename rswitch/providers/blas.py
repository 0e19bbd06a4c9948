"""One BLAS thread for the small matrix products made on the event loop.

numpy's OpenBLAS splits a product over every core once it passes a size threshold: a batch of
16 prompts against 200 utterance vectors already does. For a product of microseconds, handing
out the work, and then spinning until a busy core picks it up, costs more than the work, burns
a second core the HTTP server needs, and on a loaded machine stalls the loop for milliseconds.
`one_blas_thread()` runs a block with one BLAS thread and restores the setting after it (about
a microsecond each way); without threadpoolctl, or without a BLAS it knows, it does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_blas: list[Any] | None = None  # threadpoolctl's controllers of the loaded BLAS libraries
_lock = threading.Lock()


def _controllers() -> list[Any]:
    global _blas
    if _blas is None:
        with _lock:
            if _blas is None:
                try:
                    from threadpoolctl import ThreadpoolController
                except ImportError:  # pragma: no cover - installed with the core dependencies
                    _blas = []
                else:
                    _blas = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas


@contextmanager
def one_blas_thread() -> Iterator[None]:
    changed = []
    for lib in _controllers():
        n = lib.get_num_threads()
        if n is not None and n > 1:
            lib.set_num_threads(1)
            changed.append((lib, n))
    try:
        yield
    finally:
        for lib, n in changed:
            lib.set_num_threads(n)
