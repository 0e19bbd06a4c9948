"""One BLAS thread for the small matrix products made on the event loop.

numpy's OpenBLAS splits a product over every core once it passes a size threshold: a batch of
16 prompts against 200 utterance vectors already does. For a product of microseconds, handing
out the work, and then spinning until a busy core picks it up, costs more than the work, burns
a second core the HTTP server needs, and on a loaded machine stalls the loop for milliseconds.
`one_blas_thread()` runs a block with one BLAS thread and restores the setting after it; without
threadpoolctl, or without a BLAS it knows, it does nothing. Given the block's work, it leaves a
product OpenBLAS would not split anyway alone: the switch and back cost a few microseconds in a
tight loop, and measurably more in a gateway between requests (c=1, `bench_gateway.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SMALL = 65_536  # multiply-adds: OpenBLAS computes a product this small on the calling thread
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
def one_blas_thread(work: int | None = None) -> Iterator[None]:
    """`work`: the block's multiply-adds, when known (queries x rows x dimensions)."""
    if work is not None and work <= SMALL:
        yield
        return
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
