"""A probe milter for tests: records every macro the MTA sends, per stage, as JSON lines.

Run it as a separate process (libmilter is process-global and ``runmilter`` blocks)::

    python tests/support/probe_milter.py --socket inet:PORT@127.0.0.1 --out FILE

For every message that reaches end-of-message it appends one JSON object to ``FILE``::

    {"seq": 3, "mail_from": "<a@b>", "rcpts": ["<c@d>"],
     "stages": {"connect": {"j": "mx.receiver.test", ...}, "helo": {...}, "envfrom": {...},
                "envrcpt": {...}, "data": {...}, "eoh": {...}, "eom": {...}},
     "new": {"connect": [...], "helo": [...], ...}}

``stages[stage]`` holds every probed macro that ``getsymval`` returned (not ``None``) while in that
callback; libmilter keeps values from earlier stages, so ``new[stage]`` lists the names that first
appeared there. The milter adds the header ``X-Probe: 1`` (and ``X-Probe-Seq: <seq>``) to every
message and accepts it.

By default the probe asks the MTA (``setsymlist``) for the TLS and client macros at the HELO and
MAIL stages, the way the product does; ``--no-symlist`` keeps the MTA's configured lists.
pymilter 1.0.5's ``setsymlist`` wrapper is broken on Python 3, so the context method is called
directly with one space-separated ``str``.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

import Milter

#: Macro names the probe reads at every stage (Postfix and Sendmail names).
PROBED_MACROS: tuple[str, ...] = (
    "j",
    "_",
    "i",
    "v",
    "{daemon_name}",
    "{daemon_addr}",
    "{daemon_port}",
    "{if_name}",
    "{if_addr}",
    "{client_addr}",
    "{client_port}",
    "{client_name}",
    "{client_ptr}",
    "{client_resolve}",
    "{client_connections}",
    "{tls_version}",
    "{cipher}",
    "{cipher_bits}",
    "{alg_bits}",
    "{tls_sni}",
    "{server_name}",
    "{server_addr}",
    "{cert_subject}",
    "{cert_issuer}",
    "{cn_subject}",
    "{cn_issuer}",
    "{verify}",
    "{cert_fp}",
    "{cert_md5}",
    "{auth_type}",
    "{auth_authen}",
    "{auth_author}",
    "{auth_ssf}",
    "{mail_addr}",
    "{mail_host}",
    "{mail_mailer}",
    "{rcpt_addr}",
    "{rcpt_host}",
    "{rcpt_mailer}",
)

#: What the probe requests for the HELO and MAIL stages (unless ``--no-symlist``).
REQUESTED_MACROS = (
    "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer} {cn_subject} {cn_issuer} "
    "{verify} {cert_fp} {cert_md5} {client_addr} {client_port} j i {auth_type} {mail_addr}"
)

_CONTINUE: int = Milter.CONTINUE
_ACCEPT: int = Milter.ACCEPT

_STAGES = ("connect", "helo", "envfrom", "envrcpt", "data", "eoh", "eom")


class _Config:
    out: Path = Path("probe.jsonl")
    request_symlist: bool = True
    lock = threading.Lock()
    seq = 0


def _next_seq() -> int:
    with _Config.lock:
        _Config.seq += 1
        return _Config.seq


class ProbeMilter(Milter.Base):  # type: ignore[misc]
    """Records macros per stage; adds ``X-Probe: 1``; always accepts."""

    def __init__(self) -> None:
        self._conn_stages: dict[str, dict[str, str]] = {}
        self._msg_stages: dict[str, dict[str, str]] = {}
        self._mail_from = ""
        self._rcpts: list[str] = []

    def _snap(self, stage: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for name in PROBED_MACROS:
            value = self.getsymval(name)
            if value is not None:
                values[name] = value if isinstance(value, str) else repr(value)
        return values

    def negotiate(self, opts: list[int]) -> Any:
        rc = super().negotiate(opts)
        if _Config.request_symlist:
            for stage in (Milter.M_HELO, Milter.M_ENVFROM):
                self._ctx.setsymlist(stage, REQUESTED_MACROS)
        return rc

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self._conn_stages = {"connect": self._snap("connect")}
        return _CONTINUE

    def hello(self, hostname: str) -> int:
        self._conn_stages["helo"] = self._snap("helo")
        return _CONTINUE

    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._msg_stages = {"envfrom": self._snap("envfrom")}
        self._mail_from = mailfrom
        self._rcpts = []
        return _CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        self._msg_stages["envrcpt"] = self._snap("envrcpt")
        self._rcpts.append(rcpt)
        return _CONTINUE

    def data(self) -> int:
        self._msg_stages["data"] = self._snap("data")
        return _CONTINUE

    def eoh(self) -> int:
        self._msg_stages["eoh"] = self._snap("eoh")
        return _CONTINUE

    def eom(self) -> int:
        self._msg_stages["eom"] = self._snap("eom")
        seq = _next_seq()
        self.addheader("X-Probe", "1")
        self.addheader("X-Probe-Seq", str(seq))
        stages = {**self._conn_stages, **self._msg_stages}
        new: dict[str, list[str]] = {}
        seen: set[str] = set()
        for stage in _STAGES:
            names = [n for n in stages.get(stage, {}) if n not in seen]
            seen.update(names)
            new[stage] = names
        record = {
            "seq": seq,
            "mail_from": self._mail_from,
            "rcpts": self._rcpts,
            "stages": stages,
            "new": new,
        }
        with _Config.lock, _Config.out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        return _ACCEPT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, help="libmilter socket, e.g. inet:PORT@HOST")
    parser.add_argument("--out", required=True, type=Path, help="JSON-lines output file")
    parser.add_argument("--name", default="probe")
    parser.add_argument(
        "--no-symlist", action="store_true", help="do not request macros (MTA defaults)"
    )
    args = parser.parse_args(argv)
    _Config.out = args.out
    _Config.request_symlist = not args.no_symlist
    args.out.touch()
    Milter.factory = ProbeMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.SETSYMLIST)
    Milter.runmilter(args.name, args.socket, timeout=60)


if __name__ == "__main__":
    main()
