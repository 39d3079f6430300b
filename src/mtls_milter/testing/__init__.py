"""Test helpers shipped with the package: an in-process DNS server, a test PKI, harnesses."""
