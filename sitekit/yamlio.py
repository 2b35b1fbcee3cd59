"""The one YAML reader for files people write (federation specs, a site's data.yaml).

Stricter than ``yaml.safe_load`` in two ways that matter for hand-edited files:

- a key given twice in one mapping is an error at its line (``safe_load`` keeps the last one
  silently: ``rounds: 5`` ... ``rounds: 7`` would train 7 rounds);
- dates stay text (``2026-01-15`` is the string "2026-01-15"), so the spec's own date checks
  apply, with the field's name, to an impossible date such as 2026-02-30, which ``safe_load``
  would turn into a bare ``ValueError`` while parsing.
"""
from __future__ import annotations

from typing import Any

import yaml

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: let the base class report it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} is given twice (first at line {first.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """Where and what, for an error message: (" at line 7", "key 'rounds' is given twice (...)")."""
    mark = getattr(exc, "problem_mark", None)
    return (f" at line {mark.line + 1}" if mark else "", getattr(exc, "problem", None) or str(exc).splitlines()[0])


def load(text: str) -> Any:
    """Parse YAML text; raises ``yaml.YAMLError`` (with ``problem_mark``) on any problem."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
