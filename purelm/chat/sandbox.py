"""The sandbox chat templates render in: the limits (MAX_*), the per-rendering budget of steps,
characters and time, the guards on filters, methods and operators, the Jinja2 environment built on
`ImmutableSandboxedEnvironment`, and the one TemplateError whatever goes wrong becomes."""
from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from ..errors import TemplateError

# --- limits ----------------------------------------------------------------------------------------
MAX_TEMPLATE_CHARS = 1_000_000  # the largest real templates are ~30 KB
MAX_OUTPUT_CHARS = 4_000_000  # a rendered prompt, and any one string made while rendering it
MAX_WORK_CHARS = 32_000_000  # all characters written or created while rendering one prompt
MAX_STEPS = 5_000_000  # loop iterations + calls + filters while rendering one prompt
MAX_SECONDS = 5.0  # wall time for one rendering
MAX_WIDTH = 100_000  # a width, count or repeat argument (as the sandbox's MAX_RANGE)
MAX_INT_BITS = 65_536  # integers a template may compute
MAX_FORMAT_WIDTH_DIGITS = 6  # "%999999d" and "{:>999999}" are refused
MAX_DEPTH = 400  # how deeply a value a template makes may nest


# --- the sandbox ----------------------------------------------------------------------------------
_local = threading.local()


class _Limit(Exception):
    """A template went past one of the limits above."""


class _Raised(Exception):
    """The template called raise_exception(message)."""


class _Budget:
    __slots__ = ("steps", "chars", "deadline", "known", "inputs")

    def __init__(self, inputs: Any = None) -> None:
        self.steps = 0
        self.chars = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        # Sizes of the containers handed to the template (which it cannot change), measured once, so
        # that checking `messages|length` in a loop over the messages does not walk them every time.
        self.inputs = inputs  # keeps them alive: the ids stay theirs
        self.known: dict[int, tuple[int, int]] = {}
        try:
            _index(inputs, self.known)
        except RecursionError:
            pass  # what was not indexed is measured when used

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _Limit(f"it ran past {MAX_STEPS} steps (loop iterations, calls and filters)")
        if not self.steps & 1023 and time.monotonic() > self.deadline:
            raise _Limit(f"it ran longer than {MAX_SECONDS:g} s")

    def produce(self, n: int) -> None:
        self.chars += n
        if self.chars > MAX_WORK_CHARS:
            raise _Limit(f"it wrote or built more than {MAX_WORK_CHARS} characters")


def _budget() -> _Budget | None:
    return getattr(_local, "budget", None)


def _step() -> None:
    b = _budget()
    if b is not None:
        b.step()


def _index(o: Any, known: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(size, depth) of `o` as _measure counts them, recorded for each container in it."""
    if isinstance(o, str):
        return len(o) + 1, 1
    if isinstance(o, Mapping):
        items: Iterable[Any] = [x for pair in o.items() for x in pair]
    elif isinstance(o, (list, tuple)):
        items = o
    else:
        return 1 + (o.bit_length() // 3 if isinstance(o, int) else 0), 1
    size, depth = 1 + len(o), 0
    for x in items:
        s, d = _index(x, known)
        size, depth = size + s, max(depth, d)
    known[id(o)] = size, depth + 1
    return size, depth + 1


def _measure(obj: Any, limit: int = MAX_OUTPUT_CHARS) -> tuple[int, int]:
    """(size, depth) of a value: characters of its strings plus one per item, and how deeply it nests.
    A structure that holds one part many times is counted as if written out, in time proportional to
    its distinct parts; counting stops past `limit`."""
    from jinja2.utils import Namespace

    b = _budget()
    known = b.known if b is not None else {}
    memo: dict[int, tuple[int, int]] = {}
    visits = 0

    def walk(o: Any, level: int) -> tuple[int, int]:
        nonlocal visits
        if isinstance(o, str):
            return len(o) + 1, 1
        if isinstance(o, int) and not isinstance(o, bool):
            return 1 + o.bit_length() // 3, 1
        if isinstance(o, Mapping):
            parts: Any = [x for pair in o.items() for x in pair]
        elif isinstance(o, (list, tuple, set, frozenset)):
            parts = o
        elif isinstance(o, Namespace):
            parts = list(getattr(o, "_Namespace__attrs", {}).values())
        else:
            return 1, 1
        seen = known.get(id(o)) or memo.get(id(o))
        if seen is not None:
            return seen
        if level > MAX_DEPTH:
            raise _Limit(f"a value nests more than {MAX_DEPTH} deep")
        visits += 1
        if not visits & 1023 and b is not None:
            b.step()  # measuring counts as work too
        size, depth = 1 + len(parts), 0
        for x in parts:
            s, d = walk(x, level + 1)
            size, depth = size + s, max(depth, d)
            if size > limit:
                break
        memo[id(o)] = size, depth + 1
        return size, depth + 1

    return walk(obj, 0)


def _check_size(value: Any, what: str = "a value") -> None:
    if isinstance(value, str):
        if len(value) > MAX_OUTPUT_CHARS:
            raise _Limit(f"{what} is longer than {MAX_OUTPUT_CHARS} characters")
    elif not isinstance(value, (int, float, bool, type(None))) and _measure(value)[0] > MAX_OUTPUT_CHARS:
        raise _Limit(f"{what} is larger than {MAX_OUTPUT_CHARS} characters written out")


def _check_width(value: Any, what: str) -> None:
    if isinstance(value, int) and not -MAX_WIDTH <= value <= MAX_WIDTH:
        raise _Limit(f"{what} {value} is past the limit of {MAX_WIDTH}")


def _check_estimate(n: float, what: str) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise _Limit(f"{what} would make more than {MAX_OUTPUT_CHARS} characters")


_DIGITS = "\\d{" + str(MAX_FORMAT_WIDTH_DIGITS) + ",}"
_PERCENT_WIDTH = re.compile("%[-#0 +]*(?:" + _DIGITS + "|\\*)|%[^%a-zA-Z]*\\." + _DIGITS)
_BRACE_WIDTH = re.compile("\\{[^{}]*:[^{}]*" + _DIGITS)


def _check_format(fmt: Any, kind: str) -> None:
    if isinstance(fmt, str) and (_PERCENT_WIDTH if kind == "%" else _BRACE_WIDTH).search(fmt):
        raise _Limit(f"a format width of {MAX_FORMAT_WIDTH_DIGITS}+ digits in {fmt[:40]!r}")


def _account(result: Any, *inputs: Any) -> Any:
    """Count a new string toward the work budget (not one handed back unchanged); refuse a string or
    a structure larger than MAX_OUTPUT_CHARS written out."""
    if isinstance(result, str):
        if len(result) > MAX_OUTPUT_CHARS:
            raise _Limit(f"a string of {len(result)} characters (more than {MAX_OUTPUT_CHARS})")
        if not any(result is x for x in inputs):
            b = _budget()
            if b is not None:
                b.produce(len(result))
    elif not isinstance(result, (int, float, bool, type(None))) and not any(result is x for x in inputs):
        _check_size(result, "a value made")
    return result


def _replace_estimate(s: Any, old: Any, new: Any, count: Any = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        hits = len(s) + 1 if not old else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        _check_estimate(len(s) + hits * max(0, len(new) - len(old)), "replace()")


def _join_estimate(sep: Any, items: Any) -> None:
    if isinstance(sep, str) and isinstance(items, Sequence) and not isinstance(items, str):
        _check_estimate(len(sep) * len(items) + _measure(items)[0], "join()")


def _indent_estimate(s: Any, width: Any = 4, *args: Any, **kwargs: Any) -> None:
    if isinstance(s, str):
        _check_width(width, "indent width")
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_estimate(len(s) + (s.count("\n") + 1) * max(pad, 0), "indent()")


def _wordwrap_estimate(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None,
                       *args: Any, **kwargs: Any) -> None:
    _check_width(width, "wordwrap width")
    if isinstance(s, str):
        lines = len(s) // max(width if isinstance(width, int) else 1, 1) + s.count("\n") + 1
        _check_estimate(len(s) + lines * len(wrapstring if isinstance(wrapstring, str) else "\n"), "wordwrap()")


def _tojson_estimate(x: Any, ensure_ascii: Any = False, indent: Any = None, *args: Any, **kwargs: Any) -> None:
    pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    _check_width(pad, "tojson indent")
    size, depth = _measure(x)
    _check_estimate(size * (6 if ensure_ascii else 1) + size * max(pad, 0) * depth, "tojson")


def _int_check(value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str) and len(value) > 4300:  # CPython's own limit for int(str) since 3.11
        raise _Limit("int() of a string of more than 4300 digits")


# Filters whose arguments can ask for far more output than their input: checked before they run.
_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": lambda value, width=80, *a, **k: _check_width(width, "center width"),
    "indent": _indent_estimate,
    "wordwrap": _wordwrap_estimate,
    "replace": lambda s, old="", new="", count=None, *a, **k: _replace_estimate(s, old, new, count),
    "join": lambda value, d="", *a, **k: _join_estimate(d, value),
    "format": lambda value, *a, **k: _check_format(value, "%"),
    "batch": lambda value, linecount=1, *a, **k: _check_width(linecount, "batch size"),
    "slice": lambda value, slices=1, *a, **k: _check_width(slices, "slice count"),
    "truncate": lambda s, length=255, *a, **k: _check_width(length, "truncate length"),
    "tojson": _tojson_estimate,
    "int": _int_check,
    "round": lambda value, precision=0, *a, **k: _check_width(precision, "round precision"),
}

# str methods the same way (a template calls them as methods).
_METHOD_CHECKS: dict[str, Callable[..., None]] = {
    "center": lambda s, width=0, *a: _check_width(width, "width"),
    "ljust": lambda s, width=0, *a: _check_width(width, "width"),
    "rjust": lambda s, width=0, *a: _check_width(width, "width"),
    "zfill": lambda s, width=0, *a: _check_width(width, "width"),
    "expandtabs": lambda s, tabsize=8, *a: (_check_width(tabsize, "tab size"),
                                            _check_estimate(len(s) + s.count("\t") * max(tabsize, 0)
                                                            if isinstance(tabsize, int) else 0, "expandtabs()")),
    "replace": lambda s, old="", new="", count=-1, *a: _replace_estimate(s, old, new, count),
    "join": lambda s, items=(), *a: _join_estimate(s, items),
    "translate": lambda s, table=None, *a: _check_estimate(
        len(s) * max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        if isinstance(table, Mapping) else 0, "translate()"),
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    from jinja2.utils import _PassArg

    skip = 1 if _PassArg.from_obj(func) is not None else 0  # context/environment comes first
    check = _FILTER_CHECKS.get(name)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        _step()
        values = args[skip:]
        for v in values:
            _check_size(v, f"the input of |{name}")
        for v in kwargs.values():
            _check_size(v, f"an argument of |{name}")
        if check is not None:
            check(*values, **kwargs)
        return _account(func(*args, **kwargs), *values)

    if hasattr(func, "jinja_pass_arg"):
        guarded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
    guarded.__name__ = getattr(func, "__name__", name)
    return guarded


def _raise_exception(message: Any = "") -> None:
    raise _Raised(str(message))


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 1000:
        raise _Limit("strftime_now() takes a format string of at most 1000 characters")
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: plain json.dumps (Jinja's own escapes HTML), with its options."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_environment():
    """The Jinja environment of transformers' `_compile_jinja_template`, with the guards above."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    from jinja2.utils import pass_context
    from jinja2.visitor import NodeTransformer

    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise TemplateError(f"jinja2 {jinja2.__version__} has known sandbox escapes; purelm needs jinja2 >= 3.1.6")

    class GenerationTag(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for masks;
        rendering ignores it)."""

        tags = {"generation"}

        def parse(self, parser):  # type: ignore[no-untyped-def]
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Guard(NodeTransformer):
        """Route every loop through the step budget, every literal through the output count and
        every `~` through a size check."""

        def visit_For(self, node: nodes.For) -> nodes.Node:
            self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "_purelm_loop", [], [], None, None, lineno=node.lineno)
            return node

        def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Node:
            return nodes.Filter(nodes.Const(node.data, lineno=node.lineno), "_purelm_text", [], [], None, None,
                                lineno=node.lineno)

        def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
            self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_purelm_concat", [], [], None, None,
                                lineno=node.lineno)

        # A list, tuple or dict written in the template may hold one value many times, and nesting
        # such literals would build a structure exponentially larger written out (and to compare, hash
        # or print) than in memory: each is measured as it is made.
        def _literal(self, node: nodes.Expr) -> nodes.Node:
            self.generic_visit(node)
            return nodes.Filter(node, "_purelm_literal", [], [], None, None, lineno=node.lineno)

        visit_List = visit_Dict = _literal

        def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
            return self._literal(node) if node.ctx == "load" else self.generic_visit(node)

    @pass_context
    def loop_guard(context: Any, iterable: Any) -> Any:
        budget = _budget()
        if budget is None:
            return iterable

        def counted():
            for item in iterable:
                budget.step()
                yield item
        return counted()

    @pass_context
    def text(context: Any, data: str) -> str:
        return data

    @pass_context
    def literal(context: Any, value: Any) -> Any:
        _check_size(value, "a list, tuple or dict")
        return value

    @pass_context
    def concat(context: Any, parts: list) -> str:
        _step()
        _check_estimate(sum(len(p) if isinstance(p, str) else _measure(p)[0] for p in parts), "~")
        return _account("".join(str(p) for p in parts), *parts)

    @pass_context
    def finalize(context: Any, value: Any) -> str:
        _check_size(value, "an output value")
        out = value if isinstance(value, str) else str(value)
        if len(out) > MAX_OUTPUT_CHARS:
            raise _Limit(f"an output value is longer than {MAX_OUTPUT_CHARS} characters")
        b = _budget()
        if b is not None:
            b.produce(len(out))
        return out

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source, name, filename):  # type: ignore[no-untyped-def,override]
            return Guard().visit(super()._parse(source, name, filename))

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # The sandbox's own answer is an undefined value that fails only when used further, so
            # `{{ ''.__class__ }}` rendered as nothing; refuse at once instead.
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _step()
            _check_binop(operator, left, right)
            return _account(self.binop_table[operator](left, right), left, right)

        def wrap_str_format(self, value: Any) -> Any:
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            fmt = value.__self__

            def format_guard(*args: Any, **kwargs: Any) -> str:
                _check_format(fmt, "{}")
                return _account(wrapped(*args, **kwargs), fmt)
            return format_guard

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _step()
            # Jinja passes the variables of enclosing loops and blocks along (for context functions).
            given = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}
            for v in (*args, *given.values()):
                _check_size(v, "an argument")
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                check = _METHOD_CHECKS.get(getattr(__obj, "__name__", ""))
                if check is not None:
                    check(owner, *args, **given)
            return _account(super().call(__context, __obj, *args, **kwargs), owner, *args, *given.values())

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, finalize=finalize,
                  extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.globals.pop("lipsum", None)  # up to n paragraphs of filler text: nothing a chat needs
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(_purelm_loop=loop_guard, _purelm_text=text, _purelm_concat=concat, _purelm_literal=literal)
    return env


def _check_binop(op: str, left: Any, right: Any) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if op == "**" and is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
        if right * abs(left).bit_length() > MAX_INT_BITS:
            raise _Limit(f"{left} ** {right} is larger than {MAX_INT_BITS} bits")
    elif op == "*":
        if is_int(left) and is_int(right):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Limit(f"a product larger than {MAX_INT_BITS} bits")
        else:
            seq, n = (left, right) if is_int(right) else (right, left) if is_int(left) else (None, 0)
            if isinstance(seq, (str, list, tuple)) and n > 0:
                _check_estimate((len(seq) if isinstance(seq, str) else _measure(seq)[0]) * n, "repeating a sequence")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        _check_estimate(_measure(left)[0] + _measure(right)[0], "+")
    elif op == "%" and isinstance(left, str):
        _check_format(left, "%")
        _check_size(right, "a % argument")


_ENV = None
_ENV_LOCK = threading.Lock()


def _environment():
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            _ENV = _make_environment()
    return _ENV


def _template_error(exc: BaseException, where: str) -> TemplateError:
    """One clear TemplateError for whatever a template raised; `kind` says which kind of failure."""
    from jinja2.exceptions import TemplateSyntaxError
    from jinja2.sandbox import SecurityError

    if isinstance(exc, _Raised):
        kind, message = "raised", f"{where} refused the conversation: {exc}"
    elif isinstance(exc, SecurityError):
        kind, message = "security", (f"{where} tried something the sandbox forbids ({exc}); a model file is "
                                     f"untrusted input: this template may be hostile (use a built-in one instead)")
    elif isinstance(exc, _Limit):
        kind, message = "limit", f"{where} was stopped: {exc}"
    elif isinstance(exc, TemplateSyntaxError):
        kind, message = "syntax", f"{where} has a syntax error on line {exc.lineno}: {exc.message}"
    elif isinstance(exc, RecursionError):
        kind, message = "limit", f"{where} nests or recurses too deeply"
    elif isinstance(exc, MemoryError):
        kind, message = "limit", f"{where} ran out of memory"
    else:
        kind, message = "error", f"{where} failed: {type(exc).__name__}: {exc}"
    error = TemplateError(message)
    error.kind = kind  # type: ignore[attr-defined]
    return error
