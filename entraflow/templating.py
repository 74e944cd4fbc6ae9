"""Step inputs and conditions as sandboxed Jinja2 templates over the event and earlier steps.

A template reads `event.*` (the CloudEvent) and `steps.<id>.*` (outputs of earlier steps). A name
that does not exist is an error, never an empty string: an empty group id must not reach Graph.

Templates run in `entraflow.template_limits`' sandbox, bounded in time and size. Going over a
limit raises `TemplateProblem` like any other template error: a step fails with `invalid_input`,
and `flows apply` refuses a template whose constant parts already go over one (`template_reads`
and `condition_reads` try them, with every value read from the event unknown).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeGuard

from jinja2 import Template, TemplateError, meta, nodes
from jinja2.environment import TemplateExpression

from entraflow.template_limits import (
    UNKNOWN,
    BoundedEnvironment,
    TemplateLimitError,
    check_source,
    limits,
    render_within_limits,
)

STEPS_NAME = "steps"

# How much of a template an error message quotes.
SHOWN_TEMPLATE_CHARS = 200

# What evaluating a template over an event can raise: Jinja's own errors (a limit is one), the
# Python errors of the expressions it runs (`1 / 0`, `'a' + 1`, `event.data.items[3]`), and deep
# nesting in event data, which Python reports as RecursionError or MemoryError.
EVALUATION_ERRORS = (
    TemplateError,
    ArithmeticError,
    TypeError,
    ValueError,
    LookupError,
    RecursionError,
    MemoryError,
)


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


_environment = BoundedEnvironment()
# Compiled templates and conditions kept per process, by source: a flow's steps render the same
# few sources for every run, and compiling one costs more than rendering it.
COMPILED_CACHE_SIZE = 1024


@lru_cache(maxsize=COMPILED_CACHE_SIZE)
def _template(source: str) -> Template:
    return _environment.from_string(source)


@lru_cache(maxsize=COMPILED_CACHE_SIZE)
def _expression(expression: str) -> TemplateExpression:
    return _environment.compile_expression(expression)


# --- rendering -------------------------------------------------------------------------------


def _is_template(value: str) -> bool:
    # A string without a brace is a literal and is never rendered, so it cannot fail.
    return "{" in value


def _shown(text: str) -> str:
    """`text` quoted for an error message, cut short when long."""
    if len(text) <= SHOWN_TEMPLATE_CHARS:
        return repr(text)
    return f"{text[:SHOWN_TEMPLATE_CHARS]!r}... ({len(text):,} characters)"


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """A `with` value with its templates filled in; non-strings pass through unchanged."""
    if not isinstance(value, str) or not _is_template(value):
        return value
    try:
        check_source(value)
        with limits():
            return render_within_limits(_template(value), context)
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"template {_shown(value)}: {_describe(exc)}") from exc


def render_inputs(templates: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """Every `with` value of a step, rendered, within one rendering's limits."""
    with limits():
        return {name: render_value(value, context) for name, value in templates.items()}


def evaluate_condition(condition: str, context: Mapping[str, Any]) -> bool:
    """The truth of an `if`, written as `{{ expression }}` or as a bare expression."""
    try:
        check_source(condition)
        with limits():
            return bool(_expression(_expression_of(condition))(**context))
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"condition {_shown(condition)}: {_describe(exc)}") from exc


def _expression_of(condition: str) -> str:
    expression = condition.strip()
    if expression.startswith("{{") and expression.endswith("}}"):
        expression = expression[2:-2]
    return expression


def template_reads(value: str) -> TemplateReads:
    """What a `with` value reads; raises `TemplateProblem` when it does not compile or when it
    goes over a template limit whatever the event holds."""
    if not _is_template(value):
        return NO_READS
    try:
        check_source(value)
        # Compiling also catches what parsing lets through, such as an unknown filter.
        template = _environment.from_string(value)
        reads = _reads_of(_environment.parse(value))
        _try_out(lambda context: render_within_limits(template, context), reads)
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"template {_shown(value)}: {_describe(exc)}") from exc
    return reads


def condition_reads(condition: str) -> TemplateReads:
    """What an `if` reads; raises `TemplateProblem` when it does not compile or when it goes
    over a template limit whatever the event holds."""
    expression = _expression_of(condition)
    try:
        check_source(condition)
        # The very check `evaluate_condition` makes first; the wrapped form gives the tree.
        evaluate = _environment.compile_expression(expression)
        reads = _reads_of(_environment.parse(f"{{{{ {expression} }}}}"))
        _try_out(lambda context: evaluate(**context), reads)
    except EVALUATION_ERRORS as exc:
        raise TemplateProblem(f"condition {_shown(condition)}: {_describe(exc)}") from exc
    return reads


def _try_out(evaluate: Callable[[dict[str, Any]], object], reads: TemplateReads) -> None:
    """Evaluate a template with every name it reads unknown; raise the limit it goes over."""
    try:
        with limits():
            # Globals (`range`, `namespace`) are read as names too; they keep their values.
            evaluate(dict.fromkeys(reads.names - _environment.globals.keys(), UNKNOWN))
    except TemplateLimitError:
        raise
    except Exception:
        # Any other error depends on what the event holds: the run decides.
        return


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


def _describe(exc: BaseException) -> str:
    # Jinja's messages stand alone; a Python error needs its name ("division by zero" alone
    # does not say what went wrong).
    return str(exc) if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
