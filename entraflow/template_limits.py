"""A Jinja2 sandbox whose renderings are bounded in time and size.

Flow files and event data may both be hostile, so a rendering is bounded: in time
(`MAX_RENDER_S`), in loop iterations (`MAX_LOOP_ITERATIONS`), in the size of its source
(`MAX_TEMPLATE_CHARS`) and of what it renders (`MAX_OUTPUT_CHARS`), and in the size of every value
it computes on the way (`MAX_VALUE_CHARS`, `MAX_INT_BITS`, `MAX_ITEMS`). Operations that could
build a value out of proportion (`**`, `*`, `%`, `center`, `join`, ...) are checked before they
run, since a value too big to hold cannot be checked afterwards. Going over a limit raises
`TemplateLimitError`. Nothing is folded at compile time, so compiling a template never computes
one of its values.

A rendering's budget is set by `limits()`; `UNKNOWN` stands for a value not known yet (an event's,
before any run): every operation on it gives it back, so the rest of a template is still checked.
"""

from __future__ import annotations

import functools
import re
import time
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from string import Formatter
from typing import Any, TypeGuard, cast

from jinja2 import StrictUndefined, Template, Undefined, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, _PassArg, pass_context
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

# How long one rendering (the inputs of a step, one condition) may take: flow templates take
# well under a millisecond, and a worker or a scheduler must not be held longer than this.
MAX_RENDER_S = 1.0
# How many loop iterations one rendering may run: a loop's output is held until the loop ends,
# so iterations bound memory as well as time. Loops over a whole event's lists stay far below.
MAX_LOOP_ITERATIONS = 100_000
# The longest rendered value, in characters: ids, UPNs and names are far shorter.
MAX_OUTPUT_CHARS = 64 * 1024
# The longest value a template may compute on the way, in characters as printed, and the most
# characters its `{{ }}` may produce in all (captured blocks and macros included): this bounds
# the memory a rendering takes. Events themselves are smaller (scheduler.producer).
MAX_VALUE_CHARS = 256 * 1024
# The largest integer a template may compute, in bits (about 1,200 decimal digits).
MAX_INT_BITS = 4096
# The most items of a `range()`, and of the `batch` and `slice` filters' groups.
MAX_ITEMS = 100_000
# The longest template source, in characters: compiling takes time in proportion to it.
MAX_TEMPLATE_CHARS = 64 * 1024
# What `_printed_size` counts for a value whose printed form is short and fixed (a number, a
# range, a macro): the longest float repr is 24 characters.
_SHORT_VALUE_CHARS = 24
# Attributes a template may not read: they build values out of proportion to their inputs
# (`(1).to_bytes(10**9)`, `translate` with a table of long strings) and no flow needs them.
DENIED_ATTRIBUTES = frozenset({"to_bytes", "translate", "maketrans"})
# Filters left out: no flow needs them and their output cannot be bounded cheaply.
DENIED_FILTERS = frozenset({"pprint"})


class TemplateLimitError(SecurityError):
    """Raised when a rendering goes over one of the template limits (time, size)."""


@dataclass
class _Rendering:
    """What one rendering has spent of its limits so far."""

    deadline_s: float
    loop_iterations: int = 0
    produced_chars: int = 0


_rendering: ContextVar[_Rendering | None] = ContextVar("entraflow_rendering", default=None)


@contextmanager
def limits() -> Iterator[None]:
    """Bound what runs inside to one rendering's limits; an enclosing rendering keeps its own."""
    if _rendering.get() is not None:
        yield
        return
    token = _rendering.set(_Rendering(deadline_s=time.monotonic() + MAX_RENDER_S))
    try:
        yield
    finally:
        _rendering.reset(token)


def _check_time() -> None:
    rendering = _rendering.get()
    if rendering is not None and time.monotonic() > rendering.deadline_s:
        raise TemplateLimitError(
            f"rendering took longer than the template limit of {MAX_RENDER_S:g} s"
        )


def _too_long(what: str, limit: int = MAX_VALUE_CHARS) -> TemplateLimitError:
    return TemplateLimitError(f"{what} is over the template limit of {limit:,} characters")


class _Unknown:
    """A value read from the event or an earlier step while a flow is checked, before any run.

    Every operation on it gives it back, so the rest of the template is still checked; it is
    falsy, empty and prints as nothing.
    """

    __slots__ = ()

    def __str__(self) -> str:
        return ""

    def __bool__(self) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __contains__(self, item: object) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return False

    def __lt__(self, other: object) -> bool:
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __hash__(self) -> int:
        return 0


UNKNOWN = _Unknown()


def _any_unknown(values: Iterable[Any]) -> bool:
    return any(isinstance(value, _Unknown) for value in values)


def _printed_size(value: object, limit: int = MAX_VALUE_CHARS, indent: int = 0) -> int:
    """About how many characters `str(value)` takes; the count stops once it passes `limit`.

    Containers are walked, not printed: `[s] * n` holds one string n times and prints it n
    times. With `indent`, each nested item counts a line indented by its depth, as JSON does.
    """
    total = 0
    pending: list[tuple[object, int]] = [(value, 0)]
    while pending and total <= limit:
        item, depth = pending.pop()
        total += depth * indent
        if isinstance(item, str | bytes | bytearray):
            total += len(item)
        elif isinstance(item, Undefined | _Unknown | range | bool) or item is None:
            total += _SHORT_VALUE_CHARS
        elif isinstance(item, int):
            # Decimal digits are about 0.3 per bit.
            total += item.bit_length() // 3 + 1
        elif isinstance(item, Namespace):
            total += _SHORT_VALUE_CHARS
            pending.append((object.__getattribute__(item, "_Namespace__attrs"), depth))
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            if total <= limit:
                pending.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, Collection):
            total += 2 + 2 * len(item)
            if total <= limit:
                pending.extend((part, depth + 1) for part in item)
        else:
            total += _SHORT_VALUE_CHARS
    return total


def _checked_value(value: Any, what: str) -> Any:
    """`value` if it is within the size limits, else raise `TemplateLimitError`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise _too_many_bits(what, value.bit_length())
        return value
    if _printed_size(value) > MAX_VALUE_CHARS:
        raise _too_long(what)
    return value


def _too_many_bits(what: str, bits: int) -> TemplateLimitError:
    return TemplateLimitError(
        f"{what} would have about {bits:,} bits, over the template limit of {MAX_INT_BITS:,} bits"
    )


def _check_estimate(chars: int, what: str) -> None:
    if chars > MAX_VALUE_CHARS:
        raise _too_long(what)


def _check_width(width: object, what: str) -> None:
    if isinstance(width, int) and width > MAX_VALUE_CHARS:
        raise _too_long(f"{what} of {width:,}")


def _check_items(count: object, what: str) -> None:
    if isinstance(count, int) and count > MAX_ITEMS:
        raise TemplateLimitError(
            f"{what} of {count:,} is over the template limit of {MAX_ITEMS:,} items"
        )


def _bounded_range(*args: int) -> range:
    """`range()` for templates: at most `MAX_ITEMS` items."""
    _check_time()
    numbers = range(*args)
    try:
        length = len(numbers)
    except OverflowError:
        length = MAX_ITEMS + 1
    _check_items(length, "a range()")
    return numbers


# --- operators -------------------------------------------------------------------------------

_SEQUENCES = (str, bytes, list, tuple)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would go over a limit, before it is computed."""
    what = f"the result of {operator!r}"
    if operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        # The exponent alone can be small and the result still huge: 9 ** (9 ** 9).
        bits = abs(left).bit_length() * right
        if bits > MAX_INT_BITS:
            raise _too_many_bits(what, bits)
    elif operator == "*":
        if _is_int(left) and _is_int(right):
            bits = left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise _too_many_bits(what, bits)
        elif isinstance(left, _SEQUENCES) and _is_int(right):
            _check_estimate(_printed_size(left) * max(right, 0), what)
        elif _is_int(left) and isinstance(right, _SEQUENCES):
            _check_estimate(_printed_size(right) * max(left, 0), what)
    elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _check_estimate(_printed_size(left) + _printed_size(right), what)
    elif operator == "%" and isinstance(left, str | bytes):
        _check_percent_format(left, right)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# A `%` conversion: mapping key, flags, width, precision, length modifier, conversion type.
_PERCENT_CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)
# A width or precision with more digits than this is over any limit; no need to read it.
_MAX_COUNT_DIGITS = 12


def _check_percent_format(template: str | bytes, arguments: Any) -> None:
    """Refuse `template % arguments` when its widths or repeated arguments go over a limit."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    conversions = 0
    padding = 0
    for match in _PERCENT_CONVERSION.finditer(text):
        if match.group(3) == "%":
            continue
        conversions += 1
        for count in match.group(1, 2):
            if count == "*":
                raise TemplateLimitError(
                    "a '*' width or precision in '%' formatting cannot be checked against "
                    "the template limits; write the number in the format"
                )
            if count:
                padding += _count_of(count)
    _check_width(padding, "a '%' format width")
    # A mapping's values may each be printed many times (`%(a)s%(a)s`).
    repeats = conversions if isinstance(arguments, Mapping) else 1
    _check_estimate(len(text) + padding + repeats * _printed_size(arguments), "the result of '%'")


def _count_of(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_COUNT_DIGITS else MAX_VALUE_CHARS + 1


class _BoundedFormatterMixin(Formatter):
    """`str.format` for templates: widths checked before a field is padded, output counted."""

    _produced_chars = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._produced_chars = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_time()
        for digits in re.findall(r"\d+", format_spec):
            _check_width(_count_of(digits), "a format width or precision")
        formatted = super().format_field(value, format_spec)
        self._produced_chars += len(formatted)
        _check_estimate(self._produced_chars, "the result of format()")
        return formatted


class _BoundedFormatter(_BoundedFormatterMixin, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_BoundedFormatterMixin, SandboxedEscapeFormatter):
    pass


# --- methods and filters ---------------------------------------------------------------------


def _checked_method_arguments(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The arguments of a string method call, refused when its result would go over a limit."""
    owner = getattr(method, "__self__", None)
    if not isinstance(owner, str | bytes):
        return args
    name = getattr(method, "__name__", "")
    what = f"the result of {name}()"
    if name in ("center", "ljust", "rjust", "zfill") and args:
        _check_width(args[0], f"the width {name}() pads to")
    elif name == "expandtabs":
        tab_size = args[0] if args else kwargs.get("tabsize", 8)
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        if _is_int(tab_size):
            _check_estimate(len(owner) + tabs * tab_size, what)
    elif name == "join" and args:
        items = list(args[0])
        _check_estimate(_joined_size(items, owner), what)
        return (items, *args[1:])
    elif name == "replace" and len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _check_estimate(_replaced_size(owner, args[0], args[1], count), what)
    return args


def _joined_size(items: list[Any], separator: object) -> int:
    total = _printed_size(separator) * max(len(items) - 1, 0)
    for item in items:
        if total > MAX_VALUE_CHARS:
            break
        total += _printed_size(item)
    return total


def _replaced_size(text: Any, old: Any, new: Any, count: Any) -> int:
    if not isinstance(text, str | bytes) or type(old) is not type(text):
        return _printed_size(text)
    occurrences = text.count(old)  # type: ignore[arg-type]
    if _is_int(count) and count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * max(_printed_size(new) - len(old), 0)


# Each checks a filter's arguments (the value first, as the filter takes them) and raises
# `TemplateLimitError` when the filter's result would go over a limit.
def _center_filter(value: Any, width: Any = 80) -> None:
    _check_width(width, "the width of the center filter")


def _indent_filter(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> None:
    per_line = len(width) if isinstance(width, str) else width
    if _is_int(per_line):
        lines = str(value).count("\n") + 1
        _check_estimate(_printed_size(value) + lines * per_line, "the result of the indent filter")


def _wordwrap_filter(
    value: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, **_: Any
) -> None:
    if _is_int(width) and width > 0:
        lines = _printed_size(value) // width + 1
        per_line = _printed_size(wrapstring) if wrapstring is not None else 1
        _check_estimate(_printed_size(value) + lines * per_line, "the result of wordwrap")


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent_format(str(value), kwargs or args)


def _join_filter(value: Any, separator: Any = "", attribute: Any = None) -> None:
    _check_estimate(_joined_size(value, separator), "the result of the join filter")


def _replace_filter(value: Any, old: Any, new: Any, count: Any = None) -> None:
    size = _replaced_size(str(value), str(old), str(new), -1 if count is None else count)
    _check_estimate(size, "the result of the replace filter")


def _batch_filter(value: Any, line_count: Any, fill_with: Any = None) -> None:
    _check_items(line_count, "a batch size")


def _slice_filter(value: Any, slices: Any, fill_with: Any = None) -> None:
    _check_items(slices, "a slice count")


def _tojson_filter(value: Any, indent: Any = None) -> None:
    if _is_int(indent):
        _check_width(indent, "a JSON indent")
        size = _printed_size(value, indent=max(indent, 0))
        _check_estimate(size, "the result of tojson")


def _sum_filter(value: Any, attribute: Any = None, start: Any = 0) -> None:
    # Adding lists or tuples copies the sum so far at every item: time grows as the square.
    if not isinstance(start, int | float):
        raise TypeError("the sum filter adds numbers: start must be a number")


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _center_filter,
    "indent": _indent_filter,
    "wordwrap": _wordwrap_filter,
    "format": _format_filter,
    "join": _join_filter,
    "replace": _replace_filter,
    "batch": _batch_filter,
    "slice": _slice_filter,
    "tojson": _tojson_filter,
    "sum": _sum_filter,
}
# Filters that read their whole value to check it: it is read once, into a list.
_LISTED_FILTERS = frozenset({"join", "sum"})


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (the filter `name`) with its arguments checked and its result bounded."""
    check = _FILTER_CHECKS.get(name)
    state_of = _state_for(function)

    def bounded(context: Context, *operands: Any, **kwargs: Any) -> Any:
        _check_time()
        if name in _LISTED_FILTERS and operands and not isinstance(operands[0], _Unknown):
            operands = (list(operands[0]), *operands[1:])
        if check is not None:
            check(*operands, **kwargs)
        if _any_unknown((*operands, *kwargs.values())):
            return UNKNOWN
        result = function(*state_of(context), *operands, **kwargs)
        return _checked_value(result, f"the {name} filter")

    return _taking_context(bounded, function)


def _bounded_test(function: Callable[..., Any]) -> Callable[..., Any]:
    """The test `function`, under the time limit and unknown for an unknown value."""
    state_of = _state_for(function)

    def bounded(context: Context, *operands: Any, **kwargs: Any) -> Any:
        _check_time()
        if _any_unknown((*operands, *kwargs.values())):
            return UNKNOWN
        return function(*state_of(context), *operands, **kwargs)

    return _taking_context(bounded, function)


def _state_for(function: Callable[..., Any]) -> Callable[[Context], tuple[Any, ...]]:
    """What of Jinja's state `function` takes before its value, read from the render context."""
    takes = _PassArg.from_obj(function)
    if takes is _PassArg.context:
        return lambda context: (context,)
    if takes is _PassArg.eval_context:
        return lambda context: (context.eval_ctx,)
    if takes is _PassArg.environment:
        return lambda context: (context.environment,)
    return lambda context: ()


def _taking_context(bounded: Callable[..., Any], function: Callable[..., Any]) -> Any:
    # Jinja folds a filter or test over constants at compile time, outside any rendering's
    # limits, unless it takes the render context: so every one of them takes it.
    functools.update_wrapper(bounded, function)
    return pass_context(bounded)


def _finalize(value: Any) -> Any:
    """Check a value about to be printed by `{{ }}`, wherever its output goes."""
    if isinstance(value, _Unknown):
        return ""
    size = _printed_size(value, MAX_OUTPUT_CHARS)
    if size > MAX_OUTPUT_CHARS:
        raise _too_long("a printed value", MAX_OUTPUT_CHARS)
    rendering = _rendering.get()
    if rendering is not None:
        # Output captured by `{% set %}` blocks and macros is held too, not only what is rendered.
        rendering.produced_chars += size
        if rendering.produced_chars > MAX_VALUE_CHARS:
            raise _too_long("the output of the template's {{ }} in all")
    return value


# --- the environment -------------------------------------------------------------------------


def _environment_call(attribute: str, arguments: list[nodes.Expr], at: nodes.Node) -> nodes.Call:
    call = nodes.Call(nodes.EnvironmentAttribute(attribute), arguments, [], None, None)
    call.set_lineno(at.lineno)
    return call


class _BoundingTransformer(NodeTransformer):
    """Routes what the sandbox does not see through the environment, where it is bounded.

    Loops iterate over `loop_items`; `~` becomes `concat_operands`; list, tuple and dict
    literals pass through `call`, which checks their size (`[x, x]` nested in a loop doubles).
    Wrapped nodes are calls, which Jinja never folds at compile time. Children are transformed
    in place first.
    """

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _environment_call("loop_items", [cast(nodes.Expr, node.iter)], node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("concat_operands", node.nodes, node)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("literal", [node], node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("literal", [node], node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        if node.ctx != "load":
            return node
        return _environment_call("literal", [node], node)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every rendering held to the template limits."""

    # Every operator is intercepted, so none is folded at compile time: `{{ 9 ** (9 ** 9) }}`
    # would otherwise be computed by `flows apply` itself.
    intercepted_binops = frozenset(SandboxedEnvironment.default_binop_table)
    intercepted_unops = frozenset(SandboxedEnvironment.default_unop_table)

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, finalize=_finalize)
        self.globals["range"] = _bounded_range
        # lipsum(n) writes n paragraphs; no flow needs placeholder text.
        del self.globals["lipsum"]
        self.filters = {
            name: _bounded_filter(name, function)
            for name, function in self.filters.items()
            if name not in DENIED_FILTERS
        }
        self.tests = {
            name: _bounded_test(function)  # type: ignore[arg-type]
            for name, function in self.tests.items()
        }

    def _generate(
        self,
        source: nodes.Template,
        name: str | None,
        filename: str | None,
        defer_init: bool = False,
    ) -> str:
        tree = _BoundingTransformer().visit(source)
        tree.set_environment(self)
        return super()._generate(tree, name, filename, defer_init=defer_init)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return attr not in DENIED_ATTRIBUTES and super().is_safe_attribute(obj, attr, value)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        if isinstance(obj, _Unknown):
            return UNKNOWN
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        if isinstance(obj, _Unknown) or isinstance(argument, _Unknown):
            return UNKNOWN
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if _any_unknown((left, right)):
            return UNKNOWN
        _check_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        return _checked_value(result, f"the result of {operator!r}")

    def call_unop(self, context: Context, operator: str, arg: Any) -> Any:
        _check_time()
        if isinstance(arg, _Unknown):
            return UNKNOWN
        return super().call_unop(context, operator, arg)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        if _any_unknown((obj, *args, *kwargs.values())):
            return UNKNOWN
        args = _checked_method_arguments(obj, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        return _checked_value(result, f"the result of {getattr(obj, '__name__', 'a call')}()")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # SandboxedEnvironment's own, with a formatter that checks widths and counts output.
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        formatter: SandboxedFormatter
        if isinstance(owner, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = _BoundedFormatter(self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def concat(self, parts: Iterable[str]) -> str:
        """Join a block's output (`{% set %}`, macros, filter blocks), within the size limit."""
        collected: list[str] = []
        total = 0
        for part in parts:
            total += len(part)
            if total > MAX_VALUE_CHARS:
                raise _too_long("a block's output")
            collected.append(part)
        return "".join(collected)

    def concat_operands(self, *operands: Any) -> str:
        """`a ~ b ~ ...`, within the size limit."""
        texts: list[str] = []
        total = 0
        for operand in operands:
            if isinstance(operand, _Unknown):
                continue
            total += _printed_size(operand)
            if total > MAX_VALUE_CHARS:
                raise _too_long("the result of '~'")
            texts.append(str(operand))
        return "".join(texts)

    def loop_items(self, iterable: Any) -> Iterator[Any]:
        """The items of a `{% for %}`, each counted against the rendering's limits."""
        if isinstance(iterable, _Unknown):
            return iter(())
        return _counted(iterable)

    def literal(self, value: Any) -> Any:
        """A list, tuple or dict literal; `call` has checked its size."""
        return value


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        rendering = _rendering.get()
        if rendering is not None:
            rendering.loop_iterations += 1
            if rendering.loop_iterations > MAX_LOOP_ITERATIONS:
                raise TemplateLimitError(
                    "loops went over the template limit of "
                    f"{MAX_LOOP_ITERATIONS:,} iterations in one rendering"
                )
        _check_time()
        yield item


# --- rendering -------------------------------------------------------------------------------


def check_source(source: str) -> None:
    """Raise `TemplateLimitError` when a template's source is over `MAX_TEMPLATE_CHARS`."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise _too_long("the template", MAX_TEMPLATE_CHARS)


def render_within_limits(template: Template, context: Mapping[str, Any]) -> str:
    """`template` rendered as it streams out, within the output limit."""
    parts: list[str] = []
    total = 0
    for part in template.generate(**context):
        _check_time()
        total += len(part)
        if total > MAX_OUTPUT_CHARS:
            raise _too_long("the rendered value", MAX_OUTPUT_CHARS)
        parts.append(part)
    return "".join(parts)
