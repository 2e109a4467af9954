"""The runtime's one user-facing error type.

kiln.runtime must not import kiln.compiler, so it cannot raise KilnError; PlanError carries the
same pieces (what, expected, found) and formats the same way, and the CLI prints it and exits 2.
"""
from __future__ import annotations


class PlanError(Exception):
    """A plan, or a value given to it, that the runtime refuses to run."""

    def __init__(self, code: str, message: str, *, input_name: str | None = None,
                 expected: str | None = None, found: str | None = None, hint: str | None = None):
        self.code = code
        self.message = message
        self.input_name = input_name
        self.expected = expected
        self.found = found
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.input_name is not None:
            text = f"input '{self.input_name}': {text}"
        details = [f"expected {self.expected}"] if self.expected is not None else []
        if self.found is not None:
            details.append(f"found {self.found}")
        if details:
            text += f" ({'; '.join(details)})"
        if self.hint:
            text += f" {self.hint}"
        return text
