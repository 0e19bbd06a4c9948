"""The console's keys: the one table in `rswitch.keymap` (plain data, which config validation
reads too), re-exported here for the console's modules."""

from __future__ import annotations

from rswitch.keymap import KEY_IDS, KEYS, Key, key_rows

__all__ = ["KEYS", "KEY_IDS", "Key", "key_rows"]
