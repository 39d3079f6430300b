"""Thin adapters that translate a protocol (CLI, milter, policy, socketmap) into core calls."""
