"""Regenerate the field tables of docs/output.md from the code that defines the records.

iotscan/output/records.py is the one place that names the fields of every record (``*_FIELDS``: tuples of
(name, meaning)); the frame facts of inspect's packet records are iotscan/inspect/fields.py's PACKET_FIELDS.
docs/output.md marks where each table goes:

    <!-- fields: FLOW_FIELDS -->
    ...generated...
    <!-- end fields -->

    python docs/make_tables.py          # rewrite the tables in docs/output.md
    python docs/make_tables.py --check  # exit 1 when they differ from the code (tests/test_docs.py runs this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT_DOC = REPO / "docs" / "output.md"
_BLOCK = re.compile(r"(<!-- fields: (?P<name>\w+) -->\n)(?P<body>.*?)(<!-- end fields -->)", re.S)


def field_tables() -> dict[str, tuple[tuple[str, str], ...]]:
    """Every (name, meaning) table of records.py, by its name, and inspect's PACKET_FIELDS."""
    sys.path.insert(0, str(REPO))
    from iotscan.inspect import fields
    from iotscan.output import records

    tables = {}
    for name, value in vars(records).items():
        if name.isupper() and isinstance(value, tuple) and value and all(
                isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair) for pair in value):
            tables[name] = value
    tables["PACKET_FIELDS"] = fields.PACKET_FIELDS
    return tables


def render(pairs: tuple[tuple[str, str], ...]) -> str:
    rows = [f"| `{name}` | {meaning.replace('|', chr(92) + '|')} |" for name, meaning in pairs]
    return "\n".join(["| field | meaning |", "| --- | --- |", *rows]) + "\n"


def regenerate(text: str, tables: dict[str, tuple[tuple[str, str], ...]]) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in tables:
            raise SystemExit(f"docs/output.md names {name}, which records.py does not define")
        return match.group(1) + render(tables[name]) + match.group(4)

    return _BLOCK.sub(fill, text)


def missing_tables(text: str, tables: dict[str, tuple[tuple[str, str], ...]]) -> list[str]:
    """The tables of the code that docs/output.md has no place for."""
    return sorted(set(tables) - {m["name"] for m in _BLOCK.finditer(text)})


def main(argv: list[str]) -> int:
    tables = field_tables()
    text = OUTPUT_DOC.read_text()
    new = regenerate(text, tables)
    missing = missing_tables(text, tables)
    if "--check" in argv:
        if missing:
            print(f"docs/output.md has no table for {', '.join(missing)}: add '<!-- fields: NAME -->' and "
                  "'<!-- end fields -->' lines where it goes, then run python docs/make_tables.py")
        if new != text:
            print("docs/output.md's field tables differ from the code: run python docs/make_tables.py")
        return 1 if missing or new != text else 0
    OUTPUT_DOC.write_text(new)
    if missing:
        print(f"no place in docs/output.md for: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
