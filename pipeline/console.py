"""The one console every command prints to (stderr), and the rule for user text on it.

Rich reads `[...]` as markup, so text from data, models or paths (`[INST] ... [/INST]`, `file[train]`)
either vanishes or raises. Everything that did not come from our own source goes through `plain`
(for f-strings with markup around it) or `cell` (for table cells).
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.text import Text

console = Console(stderr=True)


def plain(value: object) -> str:
    """`value` as text that rich prints literally inside a markup string."""
    return escape(str(value))


def cell(value: object) -> Text:
    """`value` as a table cell that is never parsed as markup."""
    return Text(str(value))
