"""Editors defined outside the pack, as a third party would write them (used by the editor tests)."""
