"""A serving process, once started, keeps start-up's objects out of every later collection and
collects young objects 10,000 allocations apart (rswitch/gc_tuning.py): fewer collections, each
walking only what requests made since."""

from __future__ import annotations

import gc

from rswitch.gc_tuning import YOUNG_THRESHOLD, settle


def collections_while(make: int) -> dict[int, int]:
    counts = {0: 0, 1: 0, 2: 0}

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            counts[info["generation"]] += 1

    gc.callbacks.append(count)
    try:
        alive = [{"request": i} for i in range(make)]  # objects in flight, as requests hold them
    finally:
        gc.callbacks.remove(count)
    del alive
    return counts


def test_settled_process_walks_fewer_and_smaller_collections():
    before = gc.get_threshold()
    gc.collect()
    try:
        as_python_does = collections_while(50_000)
        settle()
        assert gc.get_freeze_count() > 1_000  # modules, config, everything built so far
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
        settled = collections_while(50_000)
        assert sum(as_python_does.values()) >= 50 and sum(settled.values()) <= 6
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
