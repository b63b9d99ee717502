"""
The model's python tool: a small, safe calculator.

When the model writes `<|python_start|>expr<|python_end|>`, the engine evaluates `expr`
here and feeds the result back as `<|output_start|>result<|output_end|>`. The model only
ever needs arithmetic (GSM8K-style word problems) and counting letters in a string
(SpellingBee), so that is all this evaluates:

- numbers (ints, decimals, thousands commas such as 1,234), + - * / // % **, unary
  minus/plus, parentheses;
- string literals, `+` between strings, `str * int`, and `<str>.count(<str>)`.

How it stays safe and cheap, without `eval` and without signals:

- the text is parsed with `ast.parse` and the tree is *walked* by a tiny interpreter
  that knows only the node types above; anything else (names, calls other than
  `.count`, attributes, subscripts, lambdas, comprehensions, f-strings, ...) is refused
  before anything is evaluated, so `__import__('os')` or `().__class__.__bases__`
  never get near Python's object model;
- every value is bounded: |numbers| <= 10**100, strings <= 4096 characters, and `**`
  is checked *before* it is computed (so 9**9**9 and "a"*10**9 are refused in O(1));
- the expression's length, node count and nesting depth are capped, so the whole
  evaluation is a few hundred cheap operations; a wall-clock deadline checked at every
  node is a second line of defence. It needs no SIGALRM, which only works in the main
  thread (the reference's approach fails inside a web server's worker threads).

`calculate` never raises: it returns the result's text or "Error: ..." so the model
sees what went wrong. `evaluate` is the raising variant, for callers that want the value.
There is no shared mutable state, so both are thread-safe.
"""
from __future__ import annotations

import ast
import math
import operator
import re
import time

MAX_EXPR_CHARS = 500       # the model's tool calls are one short line
MAX_NODES = 256            # AST nodes in the parsed expression
MAX_DEPTH = 100            # nesting depth of the AST (a+b+c+... nests one level per term)
MAX_ABS_NUMBER = 10 ** 100
MAX_STR_CHARS = 4096
MAX_SECONDS = 1.0          # wall-clock budget, checked at every node (the limits above make it ~µs)

Number = int | float
Value = int | float | str


class CalculatorError(ValueError):
    """The expression is not something the calculator evaluates; the message says why."""


# -----------------------------------------------------------------------------
# Pre-processing: thousands separators

# A string literal (single or double quoted, with escapes): commas inside stay as they are.
_STRING_LITERAL = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""", re.DOTALL)
# 1,234 or 12,345,678.9 -- a 1-3 digit head then groups of exactly three digits.
_GROUPED_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?![\w,])")


def strip_thousands_commas(expr: str) -> str:
    """'1,234 * 2' -> '1234 * 2'; commas inside string literals are left alone."""
    out, pos = [], 0
    for m in _STRING_LITERAL.finditer(expr):
        out.append(_GROUPED_NUMBER.sub(lambda g: g.group(0).replace(",", ""), expr[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_GROUPED_NUMBER.sub(lambda g: g.group(0).replace(",", ""), expr[pos:]))
    return "".join(out)


# -----------------------------------------------------------------------------
# Static checks on the tree (before evaluating anything)

_ALLOWED_NODES = (
    ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call, ast.Attribute, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
)


def _check_tree(tree: ast.Expression) -> None:
    nodes = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise CalculatorError(f"expression is too complex (more than {MAX_NODES} parts)")
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression is nested too deeply (more than {MAX_DEPTH} levels)")
        if not isinstance(node, _ALLOWED_NODES):
            raise CalculatorError(f"{_describe(node)} is not supported; use numbers, + - * / // % **, "
                                  "parentheses, and \"text\".count(\"x\")")
        if isinstance(node, ast.Attribute) and node.attr != "count":
            raise CalculatorError(f"attribute .{node.attr} is not supported (only \"text\".count(...))")
        if isinstance(node, ast.Call):
            _check_call(node)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _check_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Attribute) or node.func.attr != "count":
        raise CalculatorError("function calls are not supported (only \"text\".count(...))")
    if node.keywords or not 1 <= len(node.args) <= 3 or any(isinstance(a, ast.Starred) for a in node.args):
        raise CalculatorError(".count() takes a substring and optional start/end positions")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    return {ast.Subscript: "indexing", ast.Lambda: "lambda", ast.Compare: "comparison",
            ast.BoolOp: "and/or", ast.JoinedStr: "f-string", ast.Tuple: "a tuple (comma)",
            ast.List: "a list", ast.Dict: "a dict", ast.Set: "a set"}.get(type(node), type(node).__name__)


# -----------------------------------------------------------------------------
# The interpreter

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


class _Interpreter:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def eval(self, node: ast.AST) -> Value:
        if time.monotonic() > self.deadline:
            raise CalculatorError(f"took longer than {MAX_SECONDS}s")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            return _check_value(_constant(node.value))
        if isinstance(node, ast.UnaryOp):
            x = self.eval(node.operand)
            if not _is_number(x):
                raise CalculatorError("unary minus/plus needs a number")
            return _check_value(-x if isinstance(node.op, ast.USub) else +x)
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.Call):
            return self._count(node)
        # e.g. a bare `"abc".count` that is not called
        raise CalculatorError(f"{_describe(node)} is not supported")

    def _binop(self, node: ast.BinOp) -> Value:
        a, b = self.eval(node.left), self.eval(node.right)
        op = type(node.op)
        if isinstance(a, str) or isinstance(b, str):
            return _string_binop(op, a, b)
        if op is ast.Pow:
            _check_power(a, b)
        try:
            result = _BINOPS[op](a, b)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result is too large") from None
        return _check_value(result)

    def _count(self, node: ast.Call) -> int:
        assert isinstance(node.func, ast.Attribute)
        haystack = self.eval(node.func.value)
        if not isinstance(haystack, str):
            raise CalculatorError(".count() works on strings only")
        args = [self.eval(a) for a in node.args]
        if not isinstance(args[0], str) or not all(type(a) is int for a in args[1:]):
            raise CalculatorError(".count() takes a string, then optional integer start/end")
        return haystack.count(*args)


def _constant(value: object) -> Value:
    if type(value) in (int, float, str):  # not bool, complex, bytes, None, Ellipsis
        return value  # type: ignore[return-value]
    raise CalculatorError(f"the literal {value!r} is not supported (numbers and strings only)")


def _is_number(x: object) -> bool:
    return type(x) in (int, float)


def _check_value(x: object) -> Value:
    if isinstance(x, str):
        if len(x) > MAX_STR_CHARS:
            raise CalculatorError(f"string longer than {MAX_STR_CHARS} characters")
        return x
    if type(x) is complex:
        raise CalculatorError("result is a complex number")
    if type(x) is float and not math.isfinite(x):
        raise CalculatorError("result is not a finite number")
    if type(x) in (int, float):
        if abs(x) > MAX_ABS_NUMBER:
            raise CalculatorError("number is too large (limit 1e100)")
        return x  # type: ignore[return-value]
    raise CalculatorError(f"unsupported value of type {type(x).__name__}")


def _check_power(base: Number, exp: Number) -> None:
    """Refuse a ** b whose result would exceed the bound, before computing it.

    log10|a**b| = b * log10|a| (whatever the signs: 0.5 ** -400 grows too); bases 0
    and ±1 never grow (0 ** -1 divides by zero, which pow reports itself)."""
    if base in (0, 1, -1):
        return
    if exp * math.log10(abs(base)) > math.log10(MAX_ABS_NUMBER):
        raise CalculatorError(f"{base!r} ** {exp!r} is too large (limit 1e100)")


def _string_binop(op: type, a: Value, b: Value) -> str:
    if op is ast.Add and isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > MAX_STR_CHARS:
            raise CalculatorError(f"string longer than {MAX_STR_CHARS} characters")
        return a + b
    if op is ast.Mult:
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if isinstance(s, str) and type(n) is int:
            if len(s) * max(n, 0) > MAX_STR_CHARS:  # checked before building the string
                raise CalculatorError(f"string longer than {MAX_STR_CHARS} characters")
            return s * n
    raise CalculatorError(f"unsupported operation {_SYMBOL[op]} between {type(a).__name__} and {type(b).__name__}")


# -----------------------------------------------------------------------------
# Public API

def evaluate(expr: str) -> Value:
    """Evaluate `expr` and return its value; raises `CalculatorError` saying why if it
    is not a supported, bounded expression."""
    if not isinstance(expr, str):
        raise CalculatorError("expression must be text")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    text = strip_thousands_commas(expr.strip())
    if not text:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"not a valid expression ({type(e).__name__})") from None
    _check_tree(tree)
    return _Interpreter(time.monotonic() + MAX_SECONDS).eval(tree)


def format_value(value: Value) -> str:
    """Text the model sees: ints as is, integral floats without '.0' (48/2 -> '24', as
    in GSM8K's annotations), other floats with 12 significant digits (0.1+0.2 -> '0.3')."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


def calculate(expr: str) -> str:
    """Evaluate `expr` for the model's tool; never raises. Returns the formatted value,
    or "Error: <reason>" when the expression is refused."""
    try:
        return format_value(evaluate(expr))
    except CalculatorError as e:
        return f"Error: {e}"
    except Exception as e:  # defence in depth: a bug here must not kill generation
        return f"Error: {type(e).__name__}"
