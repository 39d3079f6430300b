"""The pure core: evaluate a transaction from evidence, DNS answers and a clock.

Nothing in here opens sockets on its own or reads the wall clock: the resolver, the chain
validator and the clock are passed in by the rooms around it (docs/design.md, "Module map").
"""
