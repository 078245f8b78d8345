"""Prompt templates: Jinja2, sandboxed (templates may come from users) and strict about missing variables."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from pipeline.errors import TemplateError

# The most characters (or items) anything a template builds may hold, the rendered prompt included. Templates come
# from users: ``{{ "x" * 400000000 }}`` would otherwise take 1.5 GB at submit and again on every worker.
MAX_TEMPLATE_SIZE = 1_000_000
_MAX_EXPONENT = 1_000


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            size = _size(sequence)
            if size is not None and isinstance(times, int) and size * times > MAX_TEMPLATE_SIZE:
                raise SecurityError(f"the template builds a value over the limit of {MAX_TEMPLATE_SIZE:,}")
    elif operator == "**":
        if isinstance(right, (int, float)) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"the template raises to a power over {_MAX_EXPONENT}")
    elif (
        (sizes := (_size(left), _size(right)))
        and sizes[0] is not None
        and sizes[1] is not None
        and sizes[0] + sizes[1] > MAX_TEMPLATE_SIZE
    ):
        raise SecurityError(f"the template builds a value over the limit of {MAX_TEMPLATE_SIZE:,}")


def _check_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """A filter or method given a size over the limit (``center(400000000)``, ``ljust``, ``indent``...)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_SIZE:
            raise SecurityError(f"the template passes {value:,}, over the limit of {MAX_TEMPLATE_SIZE:,}")


def _bounded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context / pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args[1:], kwargs)
        return function(*args, **kwargs)

    return bounded


class BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox (no attribute escapes, ranges capped) with sizes capped too: repetition, concatenation,
    powers, and the size arguments of filters and methods."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_arguments(args, kwargs)
        return super().call(context, obj, *args, **kwargs)


_ENV = BoundedSandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)


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
        self._pieces = self._plain_pieces()

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

    def _plain_pieces(self) -> list[tuple[str, bool]] | None:
        """A plain template (see ``plain_variables``) as (text, is a variable name) pieces, rendered without Jinja:
        its sandboxed render cost about 11 us a row, ten times the joining of the same pieces."""
        if self.plain_variables() is None:
            return None
        pieces: list[tuple[str, bool]] = []
        for statement in self._ast.body:
            assert isinstance(statement, nodes.Output)
            for node in statement.nodes:
                if isinstance(node, nodes.TemplateData):
                    pieces.append((node.data, False))
                else:
                    assert isinstance(node, nodes.Name)  # plain_variables let nothing else through
                    pieces.append((node.name, True))
        return pieces

    @property
    def variables(self) -> set[str]:
        return set(meta.find_undeclared_variables(self._ast))

    def render(self, values: Mapping[str, Any]) -> str:
        try:
            prompt = self._render_bounded(values)
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template variable missing: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template failed: {exc}") from None
        except Exception as exc:  # a filter or expression failed on this row's data
            raise TemplateError(f"template failed: {type(exc).__name__}: {exc}") from None
        return prompt

    def _render_bounded(self, values: Mapping[str, Any]) -> str:
        """Render piece by piece, stopping as soon as the prompt passes the limit (a loop of pieces under the
        limit each could otherwise build gigabytes)."""
        parts, size = [], 0
        for part in self._template.generate(**values) if self._pieces is None else self._plain_parts(values):
            size += len(part)
            if size > MAX_TEMPLATE_SIZE:
                raise SecurityError(f"the rendered prompt is over the limit of {MAX_TEMPLATE_SIZE:,} characters")
            parts.append(part)
        return "".join(parts)

    def _plain_parts(self, values: Mapping[str, Any]) -> list[str]:
        """What Jinja renders for a plain template: each variable as ``str`` of its value, a missing one an error
        worded as Jinja's."""
        assert self._pieces is not None
        parts = []
        for text, is_name in self._pieces:
            if not is_name:
                parts.append(text)
            elif text in values:
                parts.append(str(values[text]))
            else:
                raise jinja2.UndefinedError(f"{text!r} is undefined")
        return parts

    def check_columns(self, columns: list[str], where: str) -> None:
        """Fail before enqueue when the template names a variable that no column provides."""
        missing = sorted(self.variables - set(columns))
        if missing:
            raise TemplateError(
                f"{where}: template variable(s) {', '.join(missing)} not among the columns ({', '.join(columns)})"
            )


@functools.lru_cache(maxsize=64)
def compiled_template(source: str) -> PromptTemplate:
    """The process's one compiled copy of a template (a worker compiled its run's template for every chunk)."""
    return PromptTemplate(source)
