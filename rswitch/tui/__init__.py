"""The operator console (`rswitch tui`): a Textual view over the in-process core."""
