"""A griffe extension for the docs build: Sphinx roles in docstrings as Markdown code.

pyllm's docstrings predate the site and name other objects the Sphinx way
(``:class:`Tokenizer```, ``:meth:`stream```); Markdown has no such roles and would print them
as typed. Each becomes a code span of its target (a leading ``~`` dropped), which reads the same.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite one object's docstring.

        Args:
            obj: The object griffe has just loaded.
            **kwargs: The other event arguments (unused).
        """
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
