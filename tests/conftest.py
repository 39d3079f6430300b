"""Shared pytest configuration: fixtures live in the fixtures_* modules beside this file."""

pytest_plugins = ["fixtures_acme", "fixtures_dns", "fixtures_pki"]
