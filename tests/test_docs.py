"""The docs say what the code does: every `iotscan ...` command and option that README.md and docs/*.md show
exists (checked against the real `--help` of each command), the output tables match records.py, local links
resolve, and the README stays a short front page."""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup

from tests.conftest import REPO, run_iotscan

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 250
# The README's two commands for a fresh machine, exactly as .ci/run and CI run them
FRESH_MACHINE = ("./install.sh && .venv/bin/iotscan analyze samples/", ".venv/bin/python -m pytest")

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_SEPARATORS = {"|", "||", "&&", ";", "&"}


@dataclass(frozen=True)
class Shown:
    """An iotscan command line a document shows."""

    where: str  # file:line
    argv: tuple[str, ...]  # after "iotscan"


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: not a shell line
        return []


def _iotscan_calls(line: str) -> list[tuple[str, ...]]:
    """The argument lists of every iotscan call in a shell line (`sudo iotscan ...`, `... | iotscan ...`,
    `.venv/bin/iotscan ...`)."""
    calls, segment = [], []
    for word in [*_words(line), ";"]:
        if word not in _SEPARATORS:
            segment.append(word)
            continue
        while segment and (segment[0] == "sudo" or re.fullmatch(r"\w+=\S*", segment[0])):
            segment = segment[1:]
        if segment and Path(segment[0]).name == "iotscan":
            calls.append(tuple(segment[1:]))
        segment = []
    return calls


def shown_commands(text: str, name: str) -> list[Shown]:
    """Every iotscan command in the fenced code blocks and inline code spans of a Markdown text."""
    shown = []
    for block in _FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        logical, start = "", first_line
        for offset, line in enumerate(block.group(1).splitlines()):
            if not logical:
                start = first_line + offset
            if line.rstrip().endswith("\\"):  # a continued line
                logical += line.rstrip()[:-1] + " "
                continue
            shown += [Shown(f"{name}:{start}", argv) for argv in _iotscan_calls(logical + line)]
            logical = ""
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in _INLINE.finditer(prose):
        code = span.group(1).replace("\\|", "|")  # a pipe escaped in a Markdown table
        if re.match(r"(sudo )?iotscan ", code):
            line = prose.count("\n", 0, span.start()) + 1
            shown += [Shown(f"{name}:{line}", argv) for argv in _iotscan_calls(code)]
    return shown


def command_path(argv: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """The subcommand path an argument list runs (as the CLI resolves it, default subcommands included) and
    the problems found on the way (a subcommand that does not exist)."""
    from iotscan.cli import app

    command = typer.main.get_command(app)
    path: list[str] = []
    args = list(argv)
    while isinstance(command, TyperGroup):
        context = command.make_context("iotscan", list(args), resilient_parsing=True)
        rest = [*context._protected_args, *context.args]
        if not rest or rest[0].startswith("-"):
            break
        name, sub, args = command.resolve_command(context, rest)
        if sub is None:
            return tuple(path), [f"no command {' '.join(['iotscan', *path, rest[0]])!r}"]
        path.append(name)
        command = sub
    return tuple(path), []


def options_of(argv: tuple[str, ...]) -> list[str]:
    """The option names an argument list uses: `--bpf`, `-o`, `--idle-timeout` (of `--idle-timeout=60`)."""
    return [word.split("=", 1)[0] for word in argv
            if word.startswith("-") and word != "-" and not re.fullmatch(r"-\d[\d.]*", word)]


@functools.cache
def help_text(path: tuple[str, ...]) -> str:
    """The real `iotscan PATH --help`, wide enough that no option name is wrapped."""
    proc = run_iotscan(*path, "--help", env={"COLUMNS": "250"}, timeout=60)
    assert proc.returncode == 0, (path, proc.stderr.decode(errors="replace"))
    return proc.stdout.decode()


def problems_in(shown: list[Shown]) -> list[str]:
    """What the shown commands name that the CLI does not have."""
    problems = []
    for item in shown:
        path, wrong = command_path(item.argv)
        problems += [f"{item.where}: {p}" for p in wrong]
        if wrong:
            continue
        text = help_text(path)
        for option in options_of(item.argv):
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                problems.append(f"{item.where}: `iotscan {' '.join(path)}` has no option {option}")
    return problems


def _documents() -> list[Path]:
    return [README, *DOCS]


def test_readme_is_a_short_front_page_with_the_two_commands() -> None:
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: details go to docs/"
    blocks = [b.strip() for b in _FENCE.findall(text)]
    for command in FRESH_MACHINE:
        assert command in blocks, f"the README must show {command!r} as a code block of its own"
    ci = (REPO / ".ci" / "run").read_text()
    assert "./install.sh" in ci and ".venv/bin/iotscan analyze samples/" in ci and ".venv/bin/python -m pytest" in ci


def test_every_command_and_option_the_docs_show_exists() -> None:
    shown = [s for path in _documents() for s in shown_commands(path.read_text(), path.relative_to(REPO).name)]
    paths = {command_path(s.argv)[0] for s in shown}
    # the docs show every command a user runs
    assert {("analyze",), ("live",), ("inspect",), ("devices", "scan"), ("doctor",), ("model", "train"),
            ("lab", "generate"), ("report",)} <= paths, paths
    assert len(shown) > 50
    problems = problems_in(shown)
    assert not problems, "the docs show what the CLI does not have:\n" + "\n".join(problems)


SYNTHETIC = """
A paragraph with `iotscan analyze x.pcap --no-such-flag` inline.

```sh
sudo iotscan live eth0 --duration 5 --stats-interval 1   # fine
iotscan analyze a.pcap \\
    --bpf 'not port 53' --idle-timeout=60 --made-up 3
tcpdump -w - | iotscan devices - --no-identity-pass --frobnicate
iotscan analyse x.pcap
iotscan model info --json
```
"""


def test_the_check_catches_options_and_commands_that_do_not_exist() -> None:
    shown = shown_commands(SYNTHETIC, "synthetic.md")
    assert [s.argv[:2] for s in shown] == [("live", "eth0"), ("analyze", "a.pcap"), ("devices", "-"),
                                           ("analyse", "x.pcap"), ("model", "info"), ("analyze", "x.pcap")]
    assert shown[1].where == "synthetic.md:6"  # a continued line counts from its first line
    assert options_of(shown[1].argv) == ["--bpf", "--idle-timeout", "--made-up"]
    assert command_path(("devices", "-", "--no-identity-pass")) == (("devices", "scan"), [])
    problems = problems_in(shown)
    assert problems == [
        "synthetic.md:6: `iotscan analyze` has no option --made-up",
        "synthetic.md:8: `iotscan devices scan` has no option --frobnicate",
        "synthetic.md:9: no command 'iotscan analyse'",
        "synthetic.md:2: `iotscan analyze` has no option --no-such-flag",
    ]


def _make_tables():  # docs/make_tables.py, which is a script, not a module of the package
    spec = importlib.util.spec_from_file_location("make_tables", REPO / "docs" / "make_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_output_doc_tables_are_the_ones_records_py_defines() -> None:
    make_tables = _make_tables()
    tables = make_tables.field_tables()
    assert {"FLOW_FIELDS", "DEVICE_FIELDS", "SUMMARY_FIELDS", "STATS_FIELDS", "PACKET_FIELDS"} <= set(tables)
    text = make_tables.OUTPUT_DOC.read_text()
    assert make_tables.missing_tables(text, tables) == [], "run python docs/make_tables.py"
    assert make_tables.regenerate(text, tables) == text, "docs/output.md is stale: run python docs/make_tables.py"
    for pairs in tables.values():
        for name, _ in pairs:
            assert f"| `{name}` |" in text
    # and the check itself fails on a stale table
    stale = text.replace("| `flow_id` |", "| `flow_number` |", 1)
    assert make_tables.regenerate(stale, tables) == text


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", _documents(), ids=lambda p: p.name)
def test_local_links_resolve(document: Path) -> None:
    text = _FENCE.sub("", document.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", _FENCE.sub("", linked.read_text()), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{document.name}: links that lead nowhere: {broken}"
