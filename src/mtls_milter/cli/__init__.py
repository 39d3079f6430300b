"""Operator command line: the ``mtls-milter`` entry point and its ``check`` command."""
