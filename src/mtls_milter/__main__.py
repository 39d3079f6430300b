"""Allow ``python -m mtls_milter``."""

from mtls_milter.cli.main import main

raise SystemExit(main())
