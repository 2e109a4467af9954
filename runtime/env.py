"""Names in a plan run's environment (docs/plans.md, "Values at run time"): the one place that
spells them.

- ``in.<node>.<input>``: a runtime input (``input_env``), as its Python value;
- ``const.<node>.<slot>.<field>``: a folded constant (``constant_env``);
- ``<node>.<slot>.<field>``: a value a stage computes (``value_env``);
- ``<node>.text.tokens``: a runtime prompt after its ``tokenize`` stage (``tokens_env``).

Fields: CONDITIONING entry i as ``<i>.cond`` / ``<i>.<option>``, LATENT as ``samples`` (and
``noise_mask``), IMAGE and MASK as ``value``.
"""
from __future__ import annotations

RUNTIME_INPUT_PREFIX = "in."
CONSTANT_PREFIX = "const."


def input_env(input_name: str) -> str:
    """The runtime input ``"3.seed"``: ``"in.3.seed"``."""
    return RUNTIME_INPUT_PREFIX + input_name


def input_name(env_name: str) -> str | None:
    """``"in.3.seed"`` -> ``"3.seed"``; None for anything that is not a runtime input."""
    return env_name[len(RUNTIME_INPUT_PREFIX):] if env_name.startswith(RUNTIME_INPUT_PREFIX) else None


def value_env(node_id: str, slot: int, field: str) -> str:
    return f"{node_id}.{slot}.{field}"


def constant_env(node_id: str, slot: int, field: str) -> str:
    return CONSTANT_PREFIX + value_env(node_id, slot, field)


def tokens_env(node_id: str) -> str:
    return f"{node_id}.text.tokens"


def split_value(name: str) -> tuple[str, int, str]:
    """``"8.0.value"`` -> ("8", 0, "value"): a computed value's node, output slot and field."""
    node_id, slot, field = name.split(".", 2)
    return node_id, int(slot), field
