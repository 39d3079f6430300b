"""Helpers shared by test files (importable as ``support.*``: ``tests/`` is on pytest's path)."""
