"""A generated table between two marker lines of a Markdown page, and the command
line that prints, writes or checks it (scripts/settings_table.py, models_table.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GeneratedTable:
    doc: Path  # the page
    start: str  # its marker lines
    end: str
    make: Callable[[], str]  # the table
    what: str  # e.g. "settings table", in messages
    script: str  # the script that writes it

    def replace_block(self, text: str) -> str:
        """`text` with the generated table between its markers."""
        if self.start not in text or self.end not in text:
            raise SystemExit(f"{self.doc.name} has no {self.start} ... {self.end} block")
        head, _, rest = text.partition(self.start)
        _, _, tail = rest.partition(self.end)
        return f"{head}{self.start}\n{self.make()}\n{self.end}{tail}"

    def main(self, argv: list[str] | None, description: str) -> int:
        parser = argparse.ArgumentParser(description=description)
        group = parser.add_mutually_exclusive_group()
        name = self.doc.name
        group.add_argument("--write", action="store_true", help=f"update {name} in place")
        group.add_argument("--check", action="store_true", help=f"exit 1 if {name} is stale")
        args = parser.parse_args(argv)
        if args.write:
            self.doc.write_text(self.replace_block(self.doc.read_text()))
            return 0
        if args.check:
            text = self.doc.read_text()
            if self.replace_block(text) != text:
                print(f"{name} {self.what} is stale: run {self.script} --write")
                return 1
            return 0
        print(self.make())
        return 0
