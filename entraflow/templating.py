"""Step inputs and conditions as sandboxed Jinja2 templates over the event and earlier steps.

A template reads `event.*` (the CloudEvent) and `steps.<id>.*` (outputs of earlier steps). A name
that does not exist is an error, never an empty string: an empty group id must not reach Graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

_environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class TemplateProblem(ValueError):
    """Raised when a template does not parse or cannot be evaluated against its context."""


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """A `with` value with its templates filled in; non-strings pass through unchanged."""
    if not isinstance(value, str) or "{" not in value:
        return value
    try:
        return _environment.from_string(value).render(**context)
    except TemplateError as exc:
        raise TemplateProblem(f"template {value!r}: {exc}") from exc


def render_inputs(templates: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """Every `with` value of a step, rendered."""
    return {name: render_value(value, context) for name, value in templates.items()}


def evaluate_condition(condition: str, context: Mapping[str, Any]) -> bool:
    """The truth of an `if`, written as `{{ expression }}` or as a bare expression."""
    expression = condition.strip()
    if expression.startswith("{{") and expression.endswith("}}"):
        expression = expression[2:-2]
    try:
        return bool(_environment.compile_expression(expression)(**context))
    except TemplateError as exc:
        raise TemplateProblem(f"condition {condition!r}: {exc}") from exc
