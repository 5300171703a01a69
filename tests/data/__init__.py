"""Helpers and generated assets for the data-layer tests (tests/test_data_*.py)."""
