"""Our own inbound milter transport: a sans-I/O protocol core (version 6) and an asyncio driver."""
