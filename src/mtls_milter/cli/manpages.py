"""Man pages generated from the code, so they cannot drift from it.

``mtls-milter(8)`` comes from the argparse definitions (every subcommand, its usage, description
and options); ``mtls-milter.toml(5)`` from the configuration dataclasses (every section, key and
default) and the per-key comments of ``examples/mtls-milter.toml`` when that file is at hand.

    python -m mtls_milter.cli.manpages OUTDIR [EXAMPLE_TOML]

writes ``OUTDIR/mtls-milter.8`` and ``OUTDIR/mtls-milter.toml.5``; a test compares the
committed ``man/`` pages with freshly generated ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mtls_milter import __version__
from mtls_milter.config import Config

_HEADER = '.TH {name} {section} "" "mtls-milter {version}" "{manual}"\n'


def roff(text: str) -> str:
    """Plain text as roff body text: backslashes, hyphens and control characters escaped."""
    text = text.replace("``", "").replace("\\", "\\e").replace("-", "\\-")
    text = "".join(ch if ch.isascii() else f"\\[u{ord(ch):04X}]" for ch in text)
    lines = []
    for line in text.splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(
    parser: argparse.ArgumentParser, path: Sequence[str]
) -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    children = _subcommands(parser)
    if not children:
        yield list(path), parser
    for name, child in children.items():
        yield from _walk(child, [*path, name])


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        metavar = action.metavar
        shown = " ".join(metavar) if isinstance(metavar, tuple) else metavar
        names = ", ".join(action.option_strings) or (shown or action.dest)
        if action.option_strings and action.nargs != 0:
            names += f" {shown or action.dest.upper()}"
        out += [".TP", f"\\fB{roff(str(names))}\\fR", roff(action.help or "")]
    return out


def command_page() -> str:
    """mtls-milter(8)."""
    from mtls_milter.cli.main import build_parser  # main imports every subcommand

    parser = build_parser()
    parser.prog = "mtls-milter"
    lines = [
        _HEADER.format(
            name="MTLS-MILTER", section=8, version=__version__, manual="System Administration"
        ).rstrip("\n"),
        ".SH NAME",
        "mtls\\-milter \\- " + roff(parser.description or ""),
        ".SH SYNOPSIS",
        "\\fBmtls\\-milter\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".br",
        "\\fBmtls\\-milter \\-\\-version\\fR",
        ".SH COMMANDS",
    ]
    for path, sub in _walk(parser, []):
        usage = " ".join(sub.format_usage().split())
        usage = usage.removeprefix("usage: ")
        lines += [f'.SS "{" ".join(path)}"', roff(usage), ".PP", roff(sub.description or "")]
        lines += _options(sub)
    lines += [
        ".SH FILES",
        ".TP",
        "/etc/mtls\\-milter/mtls\\-milter.toml",
        "The configuration (\\fB\\-\\-config\\fR); see \\fBmtls\\-milter.toml\\fR(5).",
        ".SH SEE ALSO",
        "\\fBmtls\\-milter.toml\\fR(5), \\fBpostconf\\fR(5), \\fBsystemd.exec\\fR(5)",
    ]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return f'"{value.value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def example_comments(path: Path | None) -> dict[tuple[str, str], str]:
    """``(section, key) → comment`` from an annotated example file (``key = value  # text``)."""
    comments: dict[tuple[str, str], str] = {}
    if path is None or not path.is_file():
        return comments
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and "]" in stripped:
            section = stripped[1 : stripped.index("]")]
        elif "=" in stripped and "#" in stripped and not stripped.startswith("#"):
            key = stripped.split("=", 1)[0].strip()
            comments[(section, key)] = stripped.split("#", 1)[1].strip()
    return comments


def config_page(example: Path | None = None) -> str:
    """mtls-milter.toml(5)."""
    comments = example_comments(example)
    lines = [
        _HEADER.format(
            name="MTLS-MILTER.TOML", section=5, version=__version__, manual="File Formats"
        ).rstrip("\n"),
        ".SH NAME",
        "mtls\\-milter.toml \\- configuration of \\fBmtls\\-milter\\fR(8)",
        ".SH DESCRIPTION",
        "A TOML file, read by \\fBmtls\\-milter serve\\fR, \\fBpolicy\\-map\\fR, "
        "\\fBcheck\\fR, \\fBprobe\\fR and \\fBconfig\\-test\\fR with \\fB\\-\\-config\\fR. "
        "Every key is optional; unknown sections and keys are errors. "
        "\\fBmtls\\-milter config\\-test \\-\\-config FILE\\fR checks a file.",
    ]
    defaults = Config()
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        lines += [f'.SH "[{section.name}]"', roff((type(value).__doc__ or "").strip())]
        for key in dataclasses.fields(value):
            default = _toml(getattr(value, key.name))
            lines += [".TP", f"\\fB{roff(key.name)}\\fR = {roff(default)}"]
            lines.append(roff(comments.get((section.name, key.name), "(default shown)")))
    lines += [".SH SEE ALSO", "\\fBmtls\\-milter\\fR(8)"]
    return "\n".join(lines) + "\n"


def write_pages(directory: Path, example: Path | None = None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    pages = {"mtls-milter.8": command_page(), "mtls-milter.toml.5": config_page(example)}
    written = []
    for name, text in pages.items():
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)
    return written


if __name__ == "__main__":
    example = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    for page in write_pages(Path(sys.argv[1]), example):
        print(page)
