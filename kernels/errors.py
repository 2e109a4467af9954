"""User-facing errors, on the lowest floor so every layer raises the same kind.

A ``Problem`` names the node, its class_type, the input, what was expected and what was found;
``KilnError`` carries one or more (the CLI prints each and exits with status 2, the server turns
them into ComfyUI's ``node_errors``). Codes are ComfyUI's own (``required_input_missing``,
``return_type_mismatch``, ``value_not_in_list``, ...) so people who know ComfyUI's messages
recognise them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Problem:
    code: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    title: str | None = None
    input_name: str | None = None
    expected: str | None = None
    found: str | None = None
    hint: str | None = None

    def format(self) -> str:
        where = []
        if self.node_id is not None:
            node = f"node {self.node_id}"
            if self.class_type:
                node += f" ({self.class_type}"
                node += f' "{self.title}")' if self.title and self.title != self.class_type else ")"
            where.append(node)
        if self.input_name is not None:
            where.append(f"input '{self.input_name}'")
        text = ", ".join(where)
        text = f"{text}: {self.code}: {self.message}" if text else f"{self.code}: {self.message}"
        details = []
        if self.expected is not None:
            details.append(f"expected {self.expected}")
        if self.found is not None:
            details.append(f"found {self.found}")
        if details:
            text += f" ({'; '.join(details)})"
        if self.hint:
            text += f" {self.hint}"
        return text


class KilnError(Exception):
    """One or more user errors; the CLI prints each and exits with status 2."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(p.format() for p in self.problems))


class InputError(ValueError):
    """Raised by a node about one of its inputs (a model file that does not fit, a value it
    cannot use); the interpreter adds the node's id and class_type to make it a Problem."""

    def __init__(self, input_name: str, message: str, expected: str | None = None, found: str | None = None):
        super().__init__(message)
        self.input_name, self.message, self.expected, self.found = input_name, message, expected, found


class Interrupted(Exception):
    """A run stopped on request (``POST /interrupt``) at its next node or sampler step."""

    def __init__(self, node_id: str | None = None):
        super().__init__(f"interrupted at node {node_id}" if node_id else "interrupted")
        self.node_id = node_id


def did_you_mean(value: object, choices: Iterable[str]) -> str | None:
    """``did you mean 'x'?`` for the closest choice, if any is close."""
    matches = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"(did you mean {matches[0]!r}?)" if matches else None


def short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
