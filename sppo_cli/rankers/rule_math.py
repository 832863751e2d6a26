"""Rule-based correctness for math answers: extract the final answer, normalise it, compare.

Two answers match when they are the same text once normalised, the same number exactly (`fractions.Fraction`), the
same collection (a set in any order; a tuple or an interval item by item, brackets included), or the same value: each
is read by a small recursive-descent parser of its own (numbers, + - * / ^, \\frac, \\sqrt, \\pi, implicit products,
mixed numbers, single-letter variables) and computed exactly in fractions while it stays rational, else in floating
point, at three fixed points when it has variables. Model text is only ever parsed, never evaluated by Python or sympy.
"""

import math
import re
from fractions import Fraction
from typing import Any

import numpy as np
from datasets import Dataset

from sppo_cli.data import PROMPT, RESPONSES
from sppo_cli.errors import SppoError

_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)\s*(.+)", re.IGNORECASE)
_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# "12 cm", "7 apples", "12 m" (a one-letter unit of a short list), not "5 x"
_TRAILING_WORDS = re.compile(r"^([-+]?[\d.,]+(?:/\d+)?)\s+(?:[A-Za-z]{2,}[A-Za-z ]*|[mgsLhKNJVW])$")
_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")  # \frac12
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\w)")  # \sqrt2


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[brace + 1 : index]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the last \\boxed{...}, else the last "the answer is ..." phrase."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    matches = [m.group(1) for line in response.splitlines() for m in [_ANSWER_IS.search(line)] if m]
    if not matches:
        return None
    answer = matches[-1].strip().strip("$").strip()
    return re.split(r"(?<=[^\d])\.\s|\.$", answer)[0].strip()


def normalize(answer: str) -> str:
    """A canonical string: no spacing, no \\left/\\right, \\dfrac and \\tfrac as \\frac, no units or trailing period."""
    text = answer.strip().strip("$").strip()
    for old, new in [("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\%", "%"), ("\\$", ""), ("\\displaystyle", ""), ("\u2212", "-"), ("\u03c0", "\\pi"),
                     ("\u221e", "\\infty"), ("\u00d7", "\\times"), ("\u00b7", "\\cdot")]:  # fmt: skip
        text = text.replace(old, new)
    text = text.rstrip(".").strip()
    while _UNIT_TEXT.search(text) and _UNIT_TEXT.sub("", text).strip():
        text = _UNIT_TEXT.sub("", text).strip()
    words = _TRAILING_WORDS.match(text)
    if words:
        text = words.group(1)
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text)  # "x = 5" -> "5"
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".")


def as_number(text: str) -> Fraction | None:
    """The exact value of a plain number, a/b, or \\frac{a}{b} (with 1,000-style commas); None otherwise."""
    if len(text) > _MAX_LENGTH:
        return None
    text = text.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?", text) else text
    frac = _FRAC.fullmatch(text)
    sign = 1
    if text.startswith("-") and _FRAC.fullmatch(text[1:]):
        sign, frac = -1, _FRAC.fullmatch(text[1:])
    if frac:
        numerator, denominator = as_number(frac.group(1)), as_number(frac.group(2))
        if numerator is None or not denominator:
            return None
        return sign * numerator / denominator
    if "/" in text:
        numerator, _, denominator = text.partition("/")
        if _NUMBER.fullmatch(numerator) and _NUMBER.fullmatch(denominator) and Fraction(denominator) != 0:
            return Fraction(numerator) / Fraction(denominator)
        return None
    return Fraction(text) if _NUMBER.fullmatch(text) else None


def is_correct(response: str, reference: str) -> bool:
    return answers_match(extract_answer(response), reference)


def answers_match(answer: str | None, reference: str) -> bool:
    if answer is None:
        return False
    candidate, expected = normalize(answer), normalize(reference)
    if candidate == expected:
        return True
    exact, wanted = as_number(candidate), as_number(expected)
    if exact is not None and wanted is not None:
        return exact == wanted
    mine, theirs = _collection(candidate), _collection(expected)
    if mine or theirs:
        return bool(mine and theirs) and _same_collection(mine, theirs)
    return _same_value(candidate, expected)


def _same_value(candidate: str, expected: str) -> bool:
    """Equal numbers, exactly or in value; a percentage also matches its fraction (50% and 0.5, either side)."""
    both = candidate.endswith("%") and expected.endswith("%")
    pairs = [(candidate[:-1], expected[:-1])] if both else [(a, b) for a in _readings(candidate)
                                                             for b in _readings(expected)]  # fmt: skip
    for mine, theirs in pairs:
        exact, wanted = as_number(mine), as_number(theirs)
        if exact is not None and wanted is not None:
            if exact == wanted:
                return True
        elif _equal_values(mine, theirs):
            return True
    return False


def _readings(text: str) -> list[str]:
    return [text[:-1], f"({text[:-1]})/100"] if text.endswith("%") else [text]


# ---- collections: sets, tuples, intervals ---------------------------------------------------------------------------

_OPENERS, _CLOSERS = {"(": ")", "[": "]", "{": "}"}, {")": "(", "]": "[", "}": "{"}


def _collection(text: str) -> tuple[str, list[str]] | None:
    """(`set`, items), (brackets, items) for a tuple or interval, or (`list`, items) for a bare comma list."""
    if text.startswith("\\{") and text.endswith("\\}"):
        return "set", _split(text[2:-2])
    if len(text) > 1 and text[0] in "([" and text[-1] in ")]":
        items = _split(text[1:-1])
        if len(items) > 1 and _balanced(text[1:-1]):
            return text[0] + text[-1], items
        return None
    items = _split(text)
    return ("list", items) if len(items) > 1 else None


def _split(text: str) -> list[str]:
    """Comma-separated items at the top level of brackets."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += 1 if char in _OPENERS else -1 if char in _CLOSERS else 0
        if char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    return [item for item in items + [text[start:]] if item]


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += 1 if char in _OPENERS else -1 if char in _CLOSERS else 0
        if depth < 0:
            return False
    return depth == 0


def _same_collection(mine: tuple[str, list[str]], theirs: tuple[str, list[str]]) -> bool:
    (kind, items), (other_kind, others) = mine, theirs
    if len(items) != len(others):
        return False
    unordered = {"set", "list"}
    if kind in unordered and other_kind in unordered:  # solutions "1, 2" and the set {2, 1}
        unmatched = list(others)
        for item in items:
            match = next((other for other in unmatched if answers_match(item, other)), None)
            if match is None:
                return False
            unmatched.remove(match)
        return True
    return kind == other_kind and all(answers_match(a, b) for a, b in zip(items, others))


# ---- values ---------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\\[a-zA-Z]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[a-zA-Z]|[-+*/^(){}\[\]]")
_POINTS = (0.5772156649, 1.6180339887, 2.7182818284)  # where expressions with variables are compared
_MAX_LENGTH, _MAX_EXPONENT, _MAX_BITS = 200, 1000, 4096  # beyond: too large to compare, and to compute quickly
Value = Fraction | float


def _exact(value: Value) -> bool:
    return isinstance(value, Fraction)


def _equal_values(candidate: str, expected: str) -> bool:
    variables = {token for token in _TOKEN.findall(candidate + expected) if len(token) == 1 and token.isalpha()}
    for point in _POINTS:
        values = {name: point + index for index, name in enumerate(sorted(variables))}
        mine, theirs = value_of(candidate, values), value_of(expected, values)
        if mine is None or theirs is None or not _same_number(mine, theirs):
            return False
    return True


def _same_number(mine: Value, theirs: Value) -> bool:
    if _exact(mine) and _exact(theirs):  # 2^{31} is not 2147483647, however close in floating point
        return mine == theirs
    try:
        return math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-12)
    except OverflowError:  # an exact value beyond floating point's range
        return False


def value_of(text: str, variables: dict[str, float] | None = None) -> Value | None:
    """The value of a LaTeX arithmetic expression, or None if it is not one this parser reads or has no finite real
    value (infinity only where the text says \\infty), or a value too large to compute."""
    tokens = _TOKEN.findall(text)
    if len(text) > _MAX_LENGTH or "".join(tokens) != text:  # a character the grammar does not know
        return None
    try:
        parser = _Parser(tokens, variables or {})
        value = parser.expression()
        if not parser.done():
            return None
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value) and "\\infty" not in tokens):
            return None
        return value
    except (ValueError, ZeroDivisionError, OverflowError, IndexError, RecursionError):
        return None


def _bounded(value: Value) -> Value:
    """An exact value whose numerator or denominator outgrows _MAX_BITS would make every further step slower."""
    if _exact(value) and max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_BITS:
        raise OverflowError
    return value


class _Parser:
    """expression := term (+|- term)*; term := factor ((*|/|implicit) factor)*; factor := (+|-) factor | power;
    power := atom (^ factor)?; atom := number | variable | \\pi | \\infty | (expression) | {expression}
    | \\frac{e}{e} | \\sqrt[n]{e} | \\sqrt{e}. A whole number followed by a proper \\frac is a mixed number."""

    _ATOM_STARTS = ("(", "{", "\\frac", "\\sqrt", "\\pi", "\\infty")

    def __init__(self, tokens: list[str], variables: dict[str, float]):
        self.tokens, self.position, self.variables = tokens, 0, variables

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.tokens[self.position]
        if expected is not None and token != expected:
            raise ValueError(f"expected {expected}, got {token}")
        self.position += 1
        return token

    def done(self) -> bool:
        return self.position == len(self.tokens)

    def expression(self) -> Value:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = _bounded(value + self.term() if self.take() == "+" else value - self.term())
        return value

    def term(self) -> Value:
        value = self.factor()
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times"):
                self.take()
                value = _bounded(value * self.factor())
            elif token == "/":
                self.take()
                value = _bounded(value / self.factor())
            elif token is not None and (token in self._ATOM_STARTS or token[0].isalnum() or token[0] == "."):
                value = _bounded(value * self.factor())  # an implicit product: 2x, 2\\sqrt{3}, x(y + 1)
            else:
                return value

    def factor(self) -> Value:
        if self.peek() in ("+", "-"):
            return self.factor() if self.take() == "+" else -self.factor()
        return self.power()

    def power(self) -> Value:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.factor()
        if abs(exponent) > _MAX_EXPONENT:
            raise OverflowError
        if _exact(base) and _exact(exponent) and exponent.denominator == 1:
            if max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(exponent) > _MAX_BITS:
                raise OverflowError
            return base ** int(exponent)
        value = float(base) ** float(exponent)
        if isinstance(value, complex):  # (-8)^{1/3}: no real power
            raise ValueError("no real power")
        return value

    def atom(self) -> Value:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            if abs(int(token.lower().partition("e")[2] or 0)) > _MAX_EXPONENT:  # 1e99999999: 10^99999999 exactly
                raise OverflowError
            return self.mixed_number(Fraction(token)) if token.isdigit() else _bounded(Fraction(token))
        if token in ("(", "{"):
            value = self.expression()
            self.take(")" if token == "(" else "}")
            return value
        if token == "\\frac":
            return _bounded(self.group() / self.group())
        if token == "\\sqrt":
            degree = 2.0
            if self.peek() == "[":
                self.take("[")
                degree = self.expression()
                self.take("]")
            radicand = self.group()
            if radicand < 0:
                raise ValueError("no real root")
            return float(radicand) ** (1 / float(degree))
        if token == "\\pi":
            return math.pi
        if token == "\\infty":
            return math.inf
        if len(token) == 1 and token.isalpha() and token in self.variables:
            return self.variables[token]
        raise ValueError(f"cannot read {token}")

    def group(self) -> Value:
        self.take("{")
        value = self.expression()
        self.take("}")
        return value

    def mixed_number(self, whole: Fraction) -> Value:
        """2\\frac{1}{2} is two and a half, as in school and in math-verify."""
        if self.peek() != "\\frac":
            return whole
        start = self.position
        self.take()
        numerator, denominator = self.group(), self.group()
        if _exact(numerator) and _exact(denominator) and numerator.denominator == denominator.denominator == 1 \
                and 0 <= numerator < denominator:  # fmt: skip
            return whole + numerator / denominator
        self.position = start
        return whole


def reference_answer(answer: Any, prompt: Any, column: str) -> str:
    """A prompt's reference answer; a missing or empty one is an error (every response would be judged against the
    text "None" or "", and "The answer is None." would be right)."""
    if answer is None or not str(answer).strip():
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        raise SppoError(f"rule:math: the prompt {shown[:80]!r} has no reference answer in column {column!r}; give "
                        "every prompt one, or leave such prompts out")  # fmt: skip
    return str(answer)


def check_references(data: Dataset, column: str) -> None:
    """Before any work: every prompt of `data` has a reference answer in `column`."""
    _require_answer_column(column, data.column_names)
    for answer, prompt in zip(data[column], data[PROMPT]):
        reference_answer(answer, prompt, column)


def _require_answer_column(column: str, columns: list[str]) -> None:
    if column not in columns:
        raise SppoError(f"rule:math needs the reference answer column {column!r} (the data has: {', '.join(columns)}); "
                        "choose it with --answer-column")  # fmt: skip


class MathRuleRanker:
    """`rule:math`: correct beats incorrect, P = 1 or 0, and 1/2 when both are equally right or wrong."""

    def __init__(self, answer_column: str = "answer"):
        self.answer_column = answer_column
        self.correct = 0
        self.judged = 0

    def judge(self, batch: dict[str, list]) -> list[np.ndarray]:
        _require_answer_column(self.answer_column, list(batch))
        judgements = []
        for prompt, responses, answer in zip(batch[PROMPT], batch[RESPONSES], batch[self.answer_column]):
            reference = reference_answer(answer, prompt, self.answer_column)
            correct = np.array([is_correct(response, reference) for response in responses], dtype=np.float64)
            self.correct += int(correct.sum())
            self.judged += len(responses)
            judgements.append(0.5 + 0.5 * (correct[:, None] - correct[None, :]))
        return judgements

    def stats(self) -> dict:
        return {"correct_responses": self.correct, "judged_responses": self.judged}
