"""Prompt templates: Jinja2, sandboxed (templates may come from users) and strict about missing variables."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from .errors import TemplateError

_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)


class PromptTemplate:
    """A compiled template; ``render`` raises TemplateError naming the missing variable."""

    def __init__(self, source: str) -> None:
        if not source or not source.strip():
            raise TemplateError("the prompt template is empty")
        try:
            self._ast = _ENV.parse(source)
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"template syntax error on line {exc.lineno}: {exc.message}") from None
        self.source = source

    def plain_variables(self) -> tuple[list[str], bool] | None:
        """For a template made only of text and plain ``{{ name }}`` outputs (no filter, attribute, test or block):
        its variable names and whether its text is blank; None for any other template.

        Such a template fails for a row exactly when a variable is not among the row's values, and renders blank
        exactly when its text is blank and every variable's value is blank text: checks that need no rendering.
        """
        names: list[str] = []
        blank_text = True
        for statement in self._ast.body:
            if not isinstance(statement, nodes.Output):
                return None
            for node in statement.nodes:
                if isinstance(node, nodes.TemplateData):
                    blank_text = blank_text and not node.data.strip()
                elif isinstance(node, nodes.Name) and node.ctx == "load" and node.name not in _ENV.globals:
                    names.append(node.name)
                else:
                    return None
        return list(dict.fromkeys(names)), blank_text

    @property
    def variables(self) -> set[str]:
        return set(meta.find_undeclared_variables(self._ast))

    def render(self, values: Mapping[str, Any]) -> str:
        try:
            return self._template.render(**values)
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template variable missing: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template failed: {exc}") from None
        except Exception as exc:  # a filter or expression failed on this row's data
            raise TemplateError(f"template failed: {type(exc).__name__}: {exc}") from None

    def check_columns(self, columns: list[str], where: str) -> None:
        """Fail before enqueue when the template names a variable that no column provides."""
        missing = sorted(self.variables - set(columns))
        if missing:
            raise TemplateError(
                f"{where}: template variable(s) {', '.join(missing)} not among the columns ({', '.join(columns)})"
            )
