"""Network I/O: the DNS resolver and its transport, trust store loading, STARTTLS client."""
