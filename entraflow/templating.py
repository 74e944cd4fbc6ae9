"""Step inputs and conditions as sandboxed Jinja2 templates over the event and earlier steps.

A template reads `event.*` (the CloudEvent) and `steps.<id>.*` (outputs of earlier steps). A name
that does not exist is an error, never an empty string: an empty group id must not reach Graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from jinja2 import StrictUndefined, TemplateError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

STEPS_NAME = "steps"
# What evaluating a template over an event can raise: Jinja's own errors, and the Python errors
# of the expressions it runs (`1 / 0`, `'a' + 1`, `event.data.items[3]`).
EVALUATION_ERRORS = (TemplateError, ArithmeticError, TypeError, ValueError, LookupError)


class TemplateProblem(ValueError):
    """Raised when a template does not parse or cannot be evaluated against its context."""


@dataclass(frozen=True)
class TemplateReads:
    """What a template reads, found without rendering it."""

    # Top-level names read and not set by the template itself: `event`, `steps`, or a typo.
    names: frozenset[str]
    # Step ids read as `steps.<id>` or `steps['<id>']`.
    step_ids: frozenset[str]
    # Whether it reads `steps[<expression>]`, a step that cannot be known before a run.
    computed_step: bool


NO_READS = TemplateReads(frozenset(), frozenset(), computed_step=False)


def _is_template(value: str) -> bool:
    # A string without a brace is a literal and is never rendered, so it cannot fail.
    return "{" in value


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """A `with` value with its templates filled in; non-strings pass through unchanged."""
    if not isinstance(value, str) or not _is_template(value):
        return value
    try:
        return _environment.from_string(value).render(**context)
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"template {value!r}: {_describe(exc)}") from exc


def render_inputs(templates: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """Every `with` value of a step, rendered."""
    return {name: render_value(value, context) for name, value in templates.items()}


def evaluate_condition(condition: str, context: Mapping[str, Any]) -> bool:
    """The truth of an `if`, written as `{{ expression }}` or as a bare expression."""
    try:
        return bool(_environment.compile_expression(_expression_of(condition))(**context))
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"condition {condition!r}: {_describe(exc)}") from exc


def _expression_of(condition: str) -> str:
    expression = condition.strip()
    if expression.startswith("{{") and expression.endswith("}}"):
        expression = expression[2:-2]
    return expression


def template_reads(value: str) -> TemplateReads:
    """What a `with` value reads; raises `TemplateProblem` when it does not compile."""
    if not _is_template(value):
        return NO_READS
    try:
        tree = _environment.parse(value)
        # Compiling also catches what parsing lets through, such as an unknown filter.
        _environment.compile(tree)
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"template {value!r}: {_describe(exc)}") from exc
    return _reads_of(tree)


def condition_reads(condition: str) -> TemplateReads:
    """What an `if` reads; raises `TemplateProblem` when it does not compile."""
    expression = _expression_of(condition)
    try:
        # The very check `evaluate_condition` makes first; the wrapped form gives the tree.
        _environment.compile_expression(expression)
        tree = _environment.parse(f"{{{{ {expression} }}}}")
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"condition {condition!r}: {_describe(exc)}") from exc
    return _reads_of(tree)


def _reads_of(tree: nodes.Template) -> TemplateReads:
    step_ids: set[str] = set()
    computed_step = False
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if not _reads_steps(node):
            continue
        if isinstance(node, nodes.Getattr):
            step_ids.add(node.attr)
        elif isinstance(node, nodes.Getitem) and _is_string_constant(node.arg):
            step_ids.add(node.arg.value)
        else:
            computed_step = True
    return TemplateReads(
        names=frozenset(meta.find_undeclared_variables(tree)),
        step_ids=frozenset(step_ids),
        computed_step=computed_step,
    )


def _reads_steps(node: nodes.Node) -> bool:
    target = getattr(node, "node", None)
    return isinstance(target, nodes.Name) and target.name == STEPS_NAME


def _is_string_constant(node: nodes.Node) -> TypeGuard[nodes.Const]:
    return isinstance(node, nodes.Const) and isinstance(node.value, str)


def _describe(exc: Exception) -> str:
    # Jinja's messages stand alone; a Python error needs its name ("division by zero" alone
    # does not say what went wrong).
    return str(exc) if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
