"""ACME over MX (draft §1.3): the ``client-mx-http-01`` / ``server-mx-http-01`` challenge types.

- :mod:`.keyauth` — tokens, RFC 7638 JWK thumbprints, key authorizations (RFC 8555 §8.1);
- :mod:`.validator` — the CA side: resolve (Client) MX, fetch from every address, decide;
- :mod:`.fetch` — the one HTTP exchange the validator needs (stdlib sockets, no proxies);
- :mod:`.responder` — the MX host side: serve ``/.well-known/acme-challenge/<token>``.
"""
