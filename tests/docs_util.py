"""Reading the commands out of the Markdown pages (README.md, docs/*.md, docs/notes/*.md): what tests/docs_runner.py
runs."""
from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "zsh"}
# the first words that make a line of an unlabelled ``` block (which also holds output and layouts) a command
COMMAND_WORDS = {"python", "python3", "bash", "sh", "pip", "printf", "echo", "export", "cd", "mkdir", "accelerate"}
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(\S.*)?$")
TRAINING_PAGES = ("docs/training.md", "docs/reproducing.md")  # doc_training_commands (tests/test_train_scripts.py)
FENCE = re.compile(r"^[ \t]*```([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)  # also indented, in a list


@dataclass(frozen=True)
class DocCommand:
    """One command of a page: where it is, its text (continuations joined), and how it appears."""

    page: str  # path relative to the repository root
    line: int  # line number in the page
    text: str
    kind: str  # "block" (a shell code block), "inline" (a `code span` in the prose) or "python" (a python block)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def pages(notes: bool = False) -> list[Path]:
    """README.md and the pages of docs/, sorted; with notes, the lab notebook's pages (docs/notes/) instead, whose
    commands run the one-off studies of experiments/ (off the default test run)."""
    if notes:
        return sorted((ROOT / "docs" / "notes").glob("*.md"))
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the body's first line) of every ``` block."""
    return [(m.group(1).lower(), textwrap.dedent(m.group(2)), text.count("\n", 0, m.start(2)) + 1)
            for m in FENCE.finditer(text)]


def shell_lines(body: str, first_line: int = 1) -> list[tuple[int, str]]:
    """(line number, line) of a shell block: continuation lines joined, blank and comment lines dropped."""
    out, pending, start = [], "", first_line
    for i, raw in enumerate(body.splitlines(), first_line):
        if not pending:
            start = i
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line, pending = (pending + raw).strip(), ""
        if line and not line.startswith("#"):
            out.append((start, line))
    return out


def doc_commands(path: Path) -> list[str]:
    """The lines of a page's ```bash blocks, continuation lines joined, comments dropped."""
    text = path.read_text(encoding="utf-8")
    return [line for lang, body, _ in fenced_blocks(text) if lang == "bash" for _, line in shell_lines(body)]


def prose(text: str) -> str:
    """The page without its ``` blocks (line breaks kept, so line numbers still hold)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def inline_commands(text: str, words: tuple[str, ...] = ("bash", "python")) -> list[tuple[int, str]]:
    """(line number, text) of the `code spans` in the prose that start with one of the command words."""
    rest = prose(text)
    pattern = r"`((?:%s) [^`]*)`" % "|".join(map(re.escape, words))
    return [(rest.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(pattern, rest)]


def is_command(line: str) -> bool:
    """Whether a line of an unlabelled block reads as a command (not as output or a file layout)."""
    first = line.split(maxsplit=1)[0] if line.split() else ""
    return first in COMMAND_WORDS or bool(ASSIGNMENT.match(line))


def split_and(line: str) -> list[str]:
    """`a && b` -> [a, b] (only at the top level: an && inside quotes stays)."""
    parts, quote, start, i = [], None, 0, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("&&", i):
            parts.append(line[start:i].strip())
            start, i = i + 2, i + 1
        i += 1
    return [p for p in [*parts, line[start:].strip()] if p]


def page_commands(path: Path) -> list[DocCommand]:
    """Every command of a page in page order: shell blocks, the command lines of unlabelled blocks, inline code spans
    that start with bash/python/pip, and python blocks (whole); `a && b` gives two commands."""
    text = path.read_text(encoding="utf-8")
    page = str(path.relative_to(ROOT))
    found: list[DocCommand] = []
    for lang, body, first in fenced_blocks(text):
        if lang == "python":
            found.append(DocCommand(page, first, body, "python"))
        elif lang in SHELL_LANGS or lang in ("", "console"):
            lines = shell_lines(body, first)
            if lang == "console":  # `$ command` lines; the others are output
                lines = [(n, ln[2:]) for n, ln in lines if ln.startswith("$ ")]
            found += [DocCommand(page, n, part, "block") for n, line in lines
                      if lang or is_command(line) for part in split_and(line)]
    found += [DocCommand(page, n, part, "inline") for n, line in inline_commands(text, ("bash", "python", "pip"))
              for part in split_and(" ".join(line.split()))]
    return sorted(found, key=lambda c: c.line)


def doc_training_commands() -> list[tuple[str, str]]:
    """(page, command) for every distinct `bash run_*_nudity.sh ...` / `python train_*.py ...` in the training docs."""
    found: dict[str, str] = {}
    for page in TRAINING_PAGES:
        path = ROOT / page
        for ln in doc_commands(path) + [ln for _, ln in inline_commands(path.read_text(encoding="utf-8"))]:
            if re.match(r"\s*(bash run_\w+_nudity\.sh|python train_)", ln):
                found.setdefault(normalized(ln), Path(page).name)
    return [(page, command) for command, page in found.items()]


def normalized(command: str) -> str:
    """A command's words, as the shell splits them (comments dropped), joined by single spaces."""
    return " ".join(shlex.split(command, comments=True))

