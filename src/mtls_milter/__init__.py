"""mtls-milter: authenticate the envelope sender domain of inbound mail by mutual TLS."""

__version__ = "0.1.0"
