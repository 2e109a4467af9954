"""The runtime's user errors: a ``KilnError`` with one problem, built the way runtime code
raises them (what, the input, expected, found); the CLI prints it and exits 2."""
from __future__ import annotations

from kiln.kernels.errors import KilnError, Problem


class PlanError(KilnError):
    """A plan, or a value given to it, that the runtime refuses to run."""

    def __init__(self, code: str, message: str, *, input_name: str | None = None,
                 expected: str | None = None, found: str | None = None, hint: str | None = None,
                 node_id: str | None = None, class_type: str | None = None):
        self.problem = Problem(code, message, node_id=node_id, class_type=class_type, input_name=input_name,
                               expected=expected, found=found, hint=hint)
        super().__init__([self.problem])

    def format(self) -> str:
        return self.problem.format()
