"""Allow ``python -m mtls_milter``."""

from mtls_milter.adapters.cli import main

raise SystemExit(main())
