import random

import pytest

from sppo_cli.rankers.rule_math import answers_match, extract_answer, is_correct, normalize


@pytest.mark.parametrize(
    "response, answer",
    [
        ("We add them, so \\boxed{5}.", "5"),
        ("First \\boxed{3}, then correcting: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("The answer is 42.", "42"),
        ("So the final answer is: 7 apples", "7 apples"),
        ("Answer: $x = 2$", "x = 2"),
        ("no final answer here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", ".5"),
        ("-\\frac{1}{4}", "-0.25"),
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("12\\text{ cm}", "12"),
        ("12 cm", "12"),
        ("5.", "5"),
        ("1,000", "1000"),
        ("2.50", "2.5"),
        ("x = 5", "5"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}"),
    ],
)
def test_equal_answers_written_differently(answer, reference):
    assert answers_match(answer, reference)


@pytest.mark.parametrize(
    "answer, reference",
    [("7", "8"), ("\\frac{1}{3}", "0.33"), ("(3,4)", "(4,3)"), ("12", "12 cm^2 + 1"), ("1/0", "0"), (None, "1")],
)
def test_different_answers(answer, reference):
    assert not answers_match(answer, reference)


def test_model_text_is_never_evaluated(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert not is_correct(f"\\boxed{{{code}}}", "0")
    assert not is_correct(f"The answer is {code}", "None")
    assert not marker.exists()


def test_normalize_is_idempotent():
    for text in ["\\left(1, 2\\right)", "\\dfrac{3}{4}\\text{ m}", " 5. "]:
        assert normalize(normalize(text)) == normalize(text)


# (answer, reference, equivalent): the corpus rule:math is cross-checked on against math-verify, the checker trl's
# accuracy reward uses
CORPUS = [
    ("\\sqrt{2}", "\\sqrt{2}", True), ("2^{1/2}", "\\sqrt{2}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("\\sqrt[3]{8}", "2", True), ("\\sqrt{3}", "1.732", False),
    ("\\pi", "\\pi", True), ("π", "\\pi", True), ("2\\pi", "\\pi \\cdot 2", True), ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("3.14", "\\pi", False), ("2\\pi", "\\pi", False),
    ("50\\%", "50", True), ("50\\%", "0.5", True), ("25\\%", "0.5", False),
    ("(1, 2]", "(1,2]", True), ("(1, 2]", "[1, 2]", False), ("[-1, \\infty)", "[-1,\\infty)", True),
    ("(-\\infty, 0)", "(-\\infty, 0]", False),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", True), ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}", False),
    ("(1, 2)", "(1,2)", True), ("(2, 1)", "(1, 2)", False), ("(1, \\frac{1}{2})", "(1, 0.5)", True),
    ("1.5 \\times 10^{3}", "1500", True), ("3 \\times 10^{-2}", "0.03", True), ("2 \\times 10^{3}", "200", False),
    ("2\\frac{1}{2}", "\\frac{5}{2}", True), ("2 \\frac{1}{2}", "2.5", True), ("3\\frac{1}{4}", "3.5", False),
    ("-3", "-3", True), ("−3", "-3", True), ("-3", "3", False), ("−\\frac{1}{2}", "-0.5", True),
    ("x = 5", "5", True), ("\\frac{1}{2}", "0.5", True), ("1/3", "0.333", False), ("10,000", "10000", True),
    ("x^2+1", "1+x^2", True), ("2x", "x \\cdot 2", True), ("x^2", "2x", False),
]  # fmt: skip
# Where the two differ on purpose: math-verify reads "12.5%" as 0.125 only, and does not read 1.5e3
DIFFERENT_ON_PURPOSE = [("12.5%", "12.5", True), ("1.5e3", "1500", True)]


@pytest.mark.parametrize("answer, reference, equivalent", CORPUS + DIFFERENT_ON_PURPOSE)
def test_rule_math_on_the_corpus(answer, reference, equivalent):
    assert answers_match(answer, reference) == equivalent


@pytest.mark.parametrize("answer, reference, equivalent", CORPUS)
def test_math_verify_agrees_on_the_corpus(answer, reference, equivalent):
    math_verify = pytest.importorskip("math_verify")
    assert math_verify.verify(math_verify.parse(f"${reference}$"), math_verify.parse(f"${answer}$")) == equivalent


def test_several_answer_lines_the_last_counts():
    response = "The answer is 4.\nWait, recheck.\nThe answer is 5."
    assert extract_answer(response) == "5" and is_correct(response, "5") and not is_correct(response, "4")


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("2^{31}", "2147483647"),  # off by one, though within floating point's tolerance
        ("10^9+8", "1000000007"),
        ("5 x", "5"),  # a variable, not a unit
        ("10^{300}10^{10}", "\\infty"),  # overflow is not infinity
        ("(-8)^{1/3}", "-2"),  # no real power
        ("(x-5)^{1/2}", "\\sqrt{x-5}"),
        ("1" * 5000, "1"),
        ("9^9^9^9", "1"),
        ("(10^{1000})^{1000}", "1"),
        ("1e99999999", "1"),  # read exactly, 10^99999999 would take minutes: too large, like any such value
        ("*".join(["1e999"] * 22), "1"),
        ("(1e999+1)/(3e998+7)+(1e999+1)/(3e998+7)", "1"),
        ("0.5\\%", "50\\%"),  # two percentages compare as they are
    ],
)
def test_wrong_or_unreadable_answers_are_wrong(answer, reference):
    assert not answers_match(answer, reference)


@pytest.mark.parametrize("answer, reference", [("2^{31}", "2147483648"), ("0.5", "50\\%"), ("10^{-3}", "0.001"),
                                               ("1", "100\\%"), ("4^{256}", "2^{512}"), ("12 m", "12")])
def test_exact_values_and_percentages_either_side(answer, reference):
    assert answers_match(answer, reference) and answers_match(reference, answer)


def _random_expression(rng, depth=3):
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(["0", "1", "2", "8", "0.5", "1e3", "1e999", "1e-999", "x", "y", "\\pi", "\\infty", "99999"])
    a, b = _random_expression(rng, depth - 1), _random_expression(rng, depth - 1)
    return rng.choice([f"{a}+{b}", f"{a}-{b}", f"{a}*{b}", f"{a}/{b}", f"-{a}", f"({a})^{{{b}}}", f"{a}^{b}",
                       f"\\frac{{{a}}}{{{b}}}", f"\\sqrt{{{a}}}", f"\\sqrt[{a}]{{{b}}}", f"({a}, {b}]",
                       f"\\{{{a}, {b}\\}}", f"{a}\\%", f"{a} {b}", f"{a}{b}", f"{a})", f"{{{a}"])  # fmt: skip


def test_the_checker_never_raises_on_model_text():
    """Random expressions, many malformed, over the parser's own grammar: every one is judged, none raises."""
    rng = random.Random(0)
    for _ in range(2000):
        text = _random_expression(rng)
        for reference in ("1", "-2", "x+1", "\\{1, 2\\}", "(0, \\infty)", _random_expression(rng)):
            assert isinstance(answers_match(text, reference), bool)
            assert isinstance(is_correct(f"\\boxed{{{text}}}", reference), bool)
