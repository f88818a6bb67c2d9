"""Editors defined outside the pack, as a third party would write them (used by tests/test_editor_plugin.py)."""
