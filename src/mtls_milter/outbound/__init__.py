"""Outbound surface: the Postfix socketmap TLS policy service and the probe command."""
