"""Put ``tests/`` on ``sys.path`` so the benches reuse the test harnesses in ``tests/support/``.

The harnesses (DNS server, PKI, STARTTLS server) are not part of the installed package; a bench
imports this module first (``import benchpath``) and then ``from support.x import ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
