"""Math answer checking: extraction, tricky formats, malformed input, threads, real GSM8K."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import pytest

from qempo_lite.data import load_math
from qempo_lite.errors import QempoError
from qempo_lite.rewards import (
    MAX_COMPLETION_CHARS,
    extract_answer,
    malformed_count,
    math_correct,
    math_reward,
    reset_malformed_count,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{\\frac{1}{\\sqrt{2}}} units", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("first \\boxed{3}, finally \\boxed{4", "3"),  # the last *complete* box
        ("She makes 9 * 2 = $18.\n#### 18", "18"),
        ("So the final answer is 3.5. Done.", "3.5"),
        ("The answer is: $1,800.", "$1,800"),
        ("The answer is \\boxed{7} and not 8.", "7"),
        ("Work...\nAnswer: 42 apples\nThanks", "42 apples"),
        ("Q: what?\nA: 12", "12"),
        ("He has 3 cats and 12 dogs.", "12"),
        ("Pay $1,250, then go.", "1,250"),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        # commas, dollar signs, units, percent, decimals
        ("The answer is 1,800.", "1800", True),
        ("The answer is $1,800.00", "#### 1800", True),
        ("Total: \\boxed{1{,}800}", "1800", True),
        ("It costs 18 dollars.", "18", True),
        ("Final length: 18 cm", "18", True),
        ("The answer is 18%.", "18", True),
        ("The answer is 18.0", "18", True),
        ("The answer is -$5", "-5", True),
        ("x = 5", "5", True),
        ("\\boxed{18}", 18, True),
        ("The answer is 17.", "18", False),
        ("The answer is 1000001", "1000000", False),
        ("The answer is 18 eggs at $2 each", "36", False),
        # fractions and LaTeX
        ("The answer is 3/4", "0.75", True),
        ("\\boxed{\\frac{3}{4}}", "0.75", True),
        ("\\boxed{0.333333}", "\\frac{1}{3}", True),
        ("\\boxed{0.33}", "\\frac{1}{3}", False),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "so $\\boxed{\\frac{\\sqrt{2}}{2}}$", True),
        ("\\boxed{\\sqrt{2}}", "\\sqrt 2", True),
        ("\\boxed{[1, 2)}", "\\boxed{[1,2)}", True),
        ("\\boxed{(1, 2]}", "\\boxed{[1,2)}", False),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
        ("\\boxed{2x}", "2", False),
        ("\\boxed{\\text{(C)}}", "C", True),
        ("\\boxed{\\text{Monday}}", "\\text{Monday}", True),
        # nested braces in the gold MATH solution
        ("\\boxed{\\frac{3}{2}}", "Hence $\\boxed{\\frac{\\frac{9}{2}}{3}}$.", True),
        # no answer, empty, None, wrong types
        ("I am not sure.", "18", False),
        ("", "18", False),
        (None, "18", False),
        (42, "42", False),
    ],
)
def test_math_correct_tricky_formats(completion, gold, expected):
    assert math_correct(completion, gold) is expected


def test_malformed_completions_score_zero_and_are_counted():
    reset_malformed_count()
    well_formed = ["The answer is 17.", "\\boxed{\\frac{1}{2}}", "The answer is 18"]
    assert [math_correct(c, "18") for c in well_formed] == [False, False, True]
    assert malformed_count() == 0
    malformed = [None, "", "   ", "no digits here", ["not", "messages"], "x" * MAX_COMPLETION_CHARS + " 18", "\\boxed{9^{9^{9}}}"]
    started = time.perf_counter()
    assert [math_correct(c, "18") for c in malformed] == [False] * len(malformed)
    assert time.perf_counter() - started < 2.0
    assert malformed_count() == len(malformed)
    reset_malformed_count()
    assert malformed_count() == 0


def test_latex_checks_work_off_the_main_thread():
    # math-verify's timer is SIGALRM, which raises ValueError outside the main thread.
    verdicts, errors = [], []

    def worker():
        try:
            verdicts.append(math_correct("\\boxed{\\frac{3}{4}}", "0.75"))
            verdicts.append(math_correct("\\boxed{(x+1)^2}", "x^2+2x+1"))
            verdicts.append(math_correct("\\boxed{\\sqrt{3}}", "\\sqrt{2}"))
        except BaseException as err:  # noqa: BLE001 - any escape is the failure under test
            errors.append(err)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert not errors and verdicts == [True, True, False]


def test_math_reward_takes_strings_and_conversational_completions():
    completions = [
        "\\boxed{3}",
        [{"role": "assistant", "content": "The answer is 3."}],
        [{"role": "assistant", "content": "The answer is 4."}],
        None,
    ]
    assert math_reward(completions, ["3"] * 4) == [1.0, 1.0, 0.0, 0.0]
    # GRPOTrainer calls reward functions with keywords only, plus every dataset column.
    rewards = math_reward(
        prompts=[[{"role": "user", "content": "1+2?"}]] * 2,
        completions=[[{"role": "assistant", "content": "\\boxed{3}"}]] * 2,
        completion_ids=[[1], [2]],
        answer=["3", "4"],
        solution=["#### 3", "#### 4"],
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0]


def test_math_reward_needs_one_answer_per_completion():
    with pytest.raises(QempoError, match="got 2 completions and 1 answers"):
        math_reward(["1", "2"], ["1"])
    with pytest.raises(QempoError, match="got 1 completions and a string"):
        math_reward(["1"], "1")


# ------------------------------------------------------------------- real GSM8K golds


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    return load_math(shared_data / "gsm8k" / "test.jsonl")


def _body(solution: str) -> str:
    """A GSM8K worked solution without its final ``#### x`` line."""
    return solution.rsplit("####", 1)[0].rstrip()


def test_human_gsm8k_solutions_are_judged_correct(gsm8k):
    """Real solutions, written by people and graded correct: the checker must agree (target >= 99%)."""
    golds, solutions = gsm8k["answer"], gsm8k["solution"]
    n = len(golds)
    assert n == 1319
    variants = {
        "#### line": [math_correct(s, g) for s, g in zip(solutions, golds)],
        "sentence": [math_correct(f"{_body(s)}\nThe answer is {g}.", g) for s, g in zip(solutions, golds)],
        "formatted": [math_correct(f"{_body(s)}\nThe answer is ${int(g):,}.", s) for s, g in zip(solutions, golds)],
        "boxed": [math_correct(f"{_body(s)}\nSo the final answer is $\\boxed{{{g}}}$.", s) for s, g in zip(solutions, golds)],
    }
    rates = {name: sum(verdicts) / n for name, verdicts in variants.items()}
    agreement = sum(a == b for a, b in zip(variants["#### line"], variants["sentence"])) / n
    assert all(rate >= 0.99 for rate in rates.values()), rates
    assert agreement >= 0.99


def test_gsm8k_latex_answers_go_through_math_verify(gsm8k):
    golds, solutions = gsm8k["answer"][:150], gsm8k["solution"][:150]
    # "g + 0" is not one number, so neither the numeric nor the string path decides it.
    verdicts = [math_correct(f"{_body(s)}\n\\boxed{{\\frac{{2 \\cdot {g}}}{{2}} + 0}}", g) for s, g in zip(solutions, golds)]
    assert sum(verdicts) / len(verdicts) >= 0.99


def test_another_problems_solution_is_judged_wrong(gsm8k):
    golds, solutions = gsm8k["answer"], gsm8k["solution"]
    n = len(golds)
    verdicts, truths = [], []
    for i in range(n):
        j = (i + 1) % n  # the next problem's solution, graded against this problem's gold
        verdicts.append(math_correct(f"{_body(solutions[j])}\nThe answer is {golds[j]}.", golds[i]))
        truths.append(Fraction(golds[i]) == Fraction(golds[j]))
    different = [v for v, same in zip(verdicts, truths) if not same]
    assert len(different) > 1200  # most neighbours have different answers
    assert sum(not v for v in different) / len(different) >= 0.99
    assert sum(v == t for v, t in zip(verdicts, truths)) / n >= 0.99
