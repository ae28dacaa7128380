"""Math answer checking: extraction, tricky formats, adversarial answers, malformed input, threads, real GSM8K."""

from __future__ import annotations

import gc
import threading
import time
from fractions import Fraction

import pytest

from qempo_lite.data import load_math
from qempo_lite.errors import QempoError
from qempo_lite.rewards import (
    MAX_COMPLETION_CHARS,
    as_number,
    extract_answer,
    hedge_categories,
    malformed_count,
    math_correct,
    math_reward,
    reset_malformed_count,
)

P = pytest.param


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{\\frac{1}{\\sqrt{2}}} units", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("first \\boxed{3}, finally \\boxed{4", None),  # the final answer was cut off: no answer
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


# ------------------------------------------------------------ adversarial answers
# Each case: (completion, gold, expected verdict, id = the one-line reason). In online RL a hedge
# that scores is the policy's favourite exploit, so gaming attempts must score 0 and honest
# answers, however they are phrased, must still score 1.

# Hedges inside the stated answer: a bound, a range, an approximation, doubt or a negation scores 0.
HEDGE_INSIDE = [
    P("So \\boxed{7 \\text{ or more}}", "7", False, id="'7 or more' is a lower bound, not 7"),
    P("The answer is at least 7.", "7", False, id="'at least 7' is a bound"),
    P("The answer is more than 7.", "8", False, id="'more than 7' is a bound"),
    P("The answer is no more than 7.", "7", False, id="'no more than 7' is a bound"),
    P("The answer is between 6 and 8.", "6", False, id="'between 6 and 8' is a range"),
    P("\\boxed{6 \\text{ to } 8}", "6", False, id="'6 to 8' is a range"),
    P("\\boxed{6–8}", "8", False, id="an en-dash range"),
    P("The answer is approximately 7.", "7", False, id="'approximately' is not an exact answer"),
    P("The answer is about 7.", "7", False, id="'about' is an approximation"),
    P("The answer is around 7.", "7", False, id="'around' is an approximation"),
    P("The answer is roughly 7.", "7", False, id="'roughly' is an approximation"),
    P("\\boxed{\\approx 7}", "7", False, id="\\approx inside the box (math-verify drops it)"),
    P("\\boxed{\\sim 7}", "7", False, id="\\sim inside the box"),
    P("\\boxed{~7}", "7", False, id="a tilde before the number"),
    P("\\boxed{7+}", "7", False, id="'7+' is open-ended"),
    P("\\boxed{\\geq 7}", "7", False, id="\\geq 7 is a bound"),
    P("\\boxed{x \\ge 7}", "7", False, id="an inequality is not a value"),
    P("\\boxed{< 8}", "7", False, id="'< 8' is a bound"),
    P("\\boxed{7 \\pm 1}", "7", False, id="7 ± 1 is a range"),
    P("\\boxed{7?}", "7", False, id="a question mark is doubt"),
    P("\\boxed{7 \\text{ maybe}}", "7", False, id="'maybe' is doubt"),
    P("\\boxed{\\text{probably } 7}", "7", False, id="'probably' is doubt"),
    P("\\boxed{\\text{up to } 7}", "7", False, id="'up to' is a bound"),
    P("\\boxed{7\\text{-ish}}", "7", False, id="'-ish' is an approximation"),
    P("\\boxed{7 \\text{ (approx.)}}", "7", False, id="'(approx.)' is an approximation"),
    P("\\boxed{\\text{not } 8}", "7", False, id="a negation is not an answer"),
    P("The answer is not 7.", "7", False, id="'not 7' denies the gold"),
    P("\\boxed{7 \\text{ if } x > 0}", "7", False, id="a conditional answer"),
    P("\\boxed{7, \\ldots}", "7", False, id="a trailing \\ldots"),
    P("The answer is 7...", "7", False, id="trailing dots"),
    P("\\boxed{\\text{beyond } 7}", "7", False, id="an unknown word before the number"),
    P("\\boxed{7 \\text{ onwards}}", "7", False, id="an unlisted hedge word math-verify would drop"),
    P("\\boxed{7 \\text{ give or take}}", "7", False, id="'give or take'"),
    P("\\boxed{7 \\text{ at least}}", "7", False, id="'at least' after the number"),
    P("\\boxed{7 \\text{ or so}}", "7", False, id="'or so'"),
    P("\\boxed{7\\text{ or fewer}}", "7", False, id="'or fewer'"),
    P("\\boxed{\\text{over } 7}", "8", False, id="'over 7' is a bound"),
    P("\\boxed{7 \\text{ max}}", "7", False, id="'max' is a bound"),
    P("The answer is 7 apples or more.", "7", False, id="a unit word does not hide 'or more'"),
    P("\\boxed{\\text{7 or more}}", "7", False, id="'or more' inside one \\text"),
    P("\\boxed{7 \\vee 8}", "7", False, id="\\vee between values"),
    P("\\boxed{\\textbf{at least } 7}", "7", False, id="'at least' in bold"),
    P("\\boxed{\\overline{7}}", "7", False, id="an unlisted LaTeX command with a numeric gold"),
    P("\\boxed{\\min(7, 8)}", "7", False, id="a min of candidates"),
    P("The answer is seven or 8.", "8", False, id="a word and a number joined by 'or'"),
    P("\\boxed{\\frac{1}{2} \\text{ roughly}}", "\\frac{1}{2}", False, id="'roughly' with a LaTeX gold"),
    P("\\boxed{\\frac{1}{2} \\text{ or } \\frac{1}{3}}", "\\frac{1}{2}", False, id="two LaTeX candidates"),
    P("#### approximately 7", "7", False, id="a hedge word after ####"),
]

# Several candidates, in one answer or in neighbouring answers: 0 whichever of them is the gold.
CANDIDATES = [
    P("\\boxed{7 \\text{ or } 8}", "7", False, id="two values joined by 'or' (first is gold)"),
    P("\\boxed{7 \\text{ or } 8}", "8", False, id="two values joined by 'or' (second is gold)"),
    P("\\boxed{7, 8}", "7", False, id="a comma list in the box"),
    P("\\boxed{\\{7, 8\\}}", "8", False, id="a set of two candidates"),
    P("\\boxed{7 \\lor 8}", "7", False, id="logical or"),
    P("\\boxed{7; 8}", "7", False, id="a semicolon list"),
    P("\\boxed{7 \\text{ and } 8}", "8", False, id="'7 and 8'"),
    P("\\boxed{7 \\& 8}", "8", False, id="'7 & 8'"),
    P("\\boxed{7|8}", "7", False, id="a bar between values"),
    P("\\boxed{7 \\\\ 8}", "8", False, id="two values on two LaTeX lines"),
    P("\\boxed{7}\\,\\text{or}\\,\\boxed{8}", "8", False, id="'or' between boxes with LaTeX spacing"),
    P("The answer is 7 or 8.", "8", False, id="'or' after 'the answer is'"),
    P("The answers are 7 and 8.", "7", False, id="plural answers"),
    P("\\boxed{7} or \\boxed{8}", "8", False, id="two boxes joined by 'or'"),
    P("\\boxed{8} or \\boxed{7}", "7", False, id="two boxes joined by 'or', gold last"),
    P("\\boxed{7}, \\boxed{8}", "8", False, id="two boxes joined by a comma"),
    P("\\boxed{7}\\boxed{8}", "8", False, id="two adjacent boxes"),
    P("\\boxed{7}/\\boxed{8}", "8", False, id="two boxes joined by a slash"),
    P("$7$ or $\\boxed{8}$", "8", False, id="a number and a box joined by 'or'"),
    P("Either \\boxed{7} or \\boxed{8}.", "8", False, id="'either ... or'"),
    P("It is either 7 or 8.", "8", False, id="no statement: the last number follows 'or'"),
    P("The answer is 7, or maybe 8.", "7", False, id="a second candidate after the answer"),
    P("The answer is 7 (or 8).", "7", False, id="a candidate in parentheses"),
    P("\\boxed{7}. Or 8.", "7", False, id="'Or' opens the next sentence"),
    P("#### 7 or 8", "8", False, id="'or' after ####"),
    P("#### 7, 8", "7", False, id="a list after ####"),
    P("Answer: 7/8", "7", False, id="7/8 is a fraction, neither 7 nor 8"),
    P("The answer is 1,8.", "18", False, id="'1,8' is two numbers, not a thousands separator"),
    P("\\boxed{7} to \\boxed{9}", "9", False, id="a range of two boxes"),
    P("The answer is between 6 and \\boxed{8}.", "8", False, id="a boxed upper end of a range"),
    P("It goes from 6 to \\boxed{8}.", "8", False, id="'from 6 to' before the box"),
]

# Hedges just before, just after, or in the sentence of an otherwise clean answer: 0.
AROUND = [
    P("The answer is at least \\boxed{7}.", "7", False, id="'at least' before the box"),
    P("It is approximately \\boxed{7}.", "7", False, id="'approximately' before the box"),
    P("Roughly speaking, the answer is \\boxed{7}.", "7", False, id="'roughly' in the answer's sentence"),
    P("\\boxed{7} or more", "7", False, id="'or more' after the box"),
    P("\\boxed{7} apples or more", "7", False, id="'or more' after a unit word"),
    P("\\boxed{7}, give or take.", "7", False, id="'give or take' after the box"),
    P("Maybe \\boxed{7}.", "7", False, id="'maybe' before the box"),
    P("I'm not sure, but the answer is \\boxed{7}.", "7", False, id="'not sure' in the sentence"),
    P("$x \\approx \\boxed{7}$", "7", False, id="\\approx before the box"),
    P("$x \\geq \\boxed{7}$", "7", False, id="\\geq before the box"),
    P("Is it \\boxed{7}?", "7", False, id="a question mark after the box"),
    P("The answer is 7, approximately.", "7", False, id="'approximately' after the answer"),
    P("My best guess is \\boxed{7}.", "7", False, id="'guess' in the sentence"),
    P("\\boxed{7} (probably).", "7", False, id="'(probably)' after the box"),
    P("It could also be \\boxed{7}.", "7", False, id="'could also be'"),
    P("\\boxed{7}-ish", "7", False, id="'-ish' after the box"),
    P("\\boxed{7}+", "7", False, id="'+' after the box"),
    P("\\boxed{7}^{+}", "7", False, id="a superscript '+' after the box"),
    P("$\\boxed{7} \\pm 1$", "7", False, id="'± 1' after the box"),
    P("The answer is \\boxed{12}. Maybe 15.", "12", False, id="'Maybe' opens the next sentence"),
    P("\\boxed{7} if the shop is open", "7", False, id="a condition after the box"),
    P("\\boxed{7}\\text{ or more}", "7", False, id="'or more' in \\text after the box"),
    P("\\text{at least } \\boxed{7}", "7", False, id="'at least' in \\text before the box"),
]

# The last answer stated wins, whatever phrase states it; confirmations are not answers.
LAST_WINS = [
    P("The answer is 12.\nChecking again...\nFinal answer: 15", "15", True, id="a later 'Final answer:' wins"),
    P("The answer is 12.\nChecking again...\nFinal answer: 15", "12", False, id="the earlier 'answer is' loses"),
    P("\\boxed{12}\nWait, I made an error. The answer is 15.", "15", True, id="a later phrase beats an earlier box"),
    P("\\boxed{12}\nWait, I made an error. The answer is 15.", "12", False, id="the earlier box loses"),
    P("The answer is 15.\n#### 12", "12", True, id="a later #### wins"),
    P("#### 12\nActually, the answer is 15.", "15", True, id="a later phrase beats ####"),
    P("#### 12\nActually, the answer is 15.", "12", False, id="#### loses to a later phrase"),
    P("\\boxed{12} hmm, no: \\boxed{15}", "12", False, id="the earlier of two boxes loses"),
    P("Final answer: 12\n\nLet me recheck: 3 * 5 = 15, so \\boxed{15}", "15", True,
      id="a later box beats 'Final answer:'"),
    P("A: 12\nOn reflection the final answer is 15", "15", True, id="a phrase beats an earlier A: line"),
    P("\\boxed{15}. The answer is correct.", "15", True, id="a confirmation is not a new answer"),
    P("The answer is \\boxed{15}. To check that the answer is right: 3 * 5 = 15.", "15", True,
      id="'the answer is right' is not a new answer"),
    P("\\boxed{12}\nHmm, the answer is not 12.", "12", False, id="a retraction after the box"),
    P("first \\boxed{12}, finally \\boxed{15", "12", False, id="a cut-off final box is not an earlier one"),
    P("The answer is 12. Hmm, no.\nFinal Answer: The final answer is 15. I hope it is correct.", "15", True,
      id="Minerva format after a discarded answer"),
    P("**Answer:** 12\n\nRechecking.\n\n**Final answer:** 15", "15", True, id="markdown statements, last wins"),
    P("The answer to part (a) is 12, and the answer to part (b) is 15.", "15", True,
      id="'the answer to ... is' is a statement"),
    P("\\boxed{15}\n\n(As instructed, the final answer is in \\boxed{}.)", "15", True,
      id="an empty box restating the instruction is ignored"),
]

# Scale words multiply: 5 thousand is 5000, 2 dozen is 24.
SCALE = [
    P("The answer is 5 thousand.", "5000", True, id="'5 thousand' is 5000"),
    P("The answer is 5 thousand.", "5", False, id="'5 thousand' is not 5"),
    P("The answer is 2 dozen.", "24", True, id="'2 dozen' is 24"),
    P("The answer is 2 dozen.", "2", False, id="'2 dozen' is not 2"),
    P("\\boxed{1.5 \\text{ million}}", "1500000", True, id="a decimal million"),
    P("The answer is $3 billion.", "3000000000", True, id="currency and billion"),
    P("The answer is a dozen.", "12", True, id="'a dozen' is 12"),
    P("The answer is half a dozen eggs.", "6", True, id="'half a dozen' is 6"),
    P("The answer is 2 hundred thousand.", "200000", True, id="chained scale words multiply"),
    P("The answer is 1 1/2 dozen.", "18", True, id="a mixed number of dozens"),
    P("The answer is 5 thousand dollars.", "5000", True, id="scale word then unit"),
    P("She earns 5 thousand.", "5000", True, id="no statement: the last number keeps its scale word"),
    P("\\boxed{4 \\text{ trillion}}", "4000000000000", True, id="trillion"),
    P("The answer is 3 dozens.", "36", True, id="plural scale word"),
]

# Mixed numbers: 1 1/2 is 1.5, in text, LaTeX, words and unicode.
MIXED = [
    P("The answer is 1 1/2.", "1.5", True, id="'1 1/2' is 1.5"),
    P("The answer is 1 1/2.", "3/2", True, id="'1 1/2' equals the fraction gold"),
    P("The answer is 1 1/2.", "1", False, id="'1 1/2' is not 1"),
    P("The answer is 1 1/2.", "0.5", False, id="'1 1/2' is not a half"),
    P("\\boxed{1\\frac{1}{2}}", "1.5", True, id="LaTeX mixed number"),
    P("It takes 2 and 1/2 hours, so the answer is 2 and 1/2 hours.", "2.5", True, id="'2 and 1/2'"),
    P("The answer is 2 and a half.", "2.5", True, id="'2 and a half'"),
    P("The answer is 1½ cups.", "1.5", True, id="a unicode vulgar fraction"),
    P("The answer is -1 1/2.", "-1.5", True, id="a negative mixed number"),
    P("The answer is 3 3/4 cups.", "3.75", True, id="mixed number with a unit"),
    P("The answer is 12 15/3.", "17", False, id="an improper fractional part is not a mixed number"),
    P("The answer is 1 1/2.", "1 1/2", True, id="a mixed-number gold"),
    P("\\boxed{2 \\frac{1}{4}}", "\\frac{9}{4}", True, id="LaTeX mixed number against a LaTeX gold"),
]

# Scientific notation: e-notation, × 10^n, \times 10^{n}.
SCIENTIFIC = [
    P("The answer is 1.5e6.", "1500000", True, id="e notation"),
    P("The answer is 1.5E+06.", "1500000", True, id="E+06 notation"),
    P("\\boxed{1.5 \\times 10^{6}}", "1500000", True, id="\\times 10^{6}"),
    P("The answer is 1.5 × 10^6.", "1500000", True, id="unicode times"),
    P("\\boxed{2.5 \\cdot 10^{-3}}", "0.0025", True, id="negative exponent with \\cdot"),
    P("\\boxed{10^{6}}", "1000000", True, id="a bare power of ten"),
    P("The answer is 3e-2.", "0.03", True, id="small e notation"),
    P("The answer is 1.5e6.", "150000", False, id="the exponent matters"),
    P("The answer is 1.2 x 10^3 dollars.", "1200", True, id="'x 10^3' and a unit"),
]

# Commas, currency, percent, units and markup around an honest number: 1; a wrong number: 0.
FORMATTING = [
    P("The answer is $1,800.00.", "1800", True, id="currency, thousands separator, cents"),
    P("The answer is 1,800 dollars.", "1800", True, id="thousands separator and unit"),
    P("\\boxed{18\\%}", "18", True, id="percent sign read as a unit"),
    P("The answer is 18 percent.", "18", True, id="'percent' read as a unit"),
    P("The answer is 18 cm^2.", "18", True, id="a squared unit"),
    P("\\boxed{18^\\circ}", "18", True, id="degrees"),
    P("The answer is €18.", "18", True, id="euro sign"),
    P("The answer is £1,250.", "1250", True, id="pound sign with thousands"),
    P("The answer is -$5.", "-5", True, id="sign before currency"),
    P("The answer is −5.", "-5", True, id="unicode minus"),
    P("The answer is **18**.", "18", True, id="markdown bold"),
    P("The answer is \\(18\\).", "18", True, id="inline math delimiters"),
    P("\\boxed{\\$18}", "18", True, id="escaped dollar in a box"),
    P("\\boxed{18\\text{ cm}}", "18", True, id="\\text unit"),
    P("\\boxed{18\\,\\mathrm{km/h}}", "18", True, id="thin space and \\mathrm unit with a slash"),
    P("\\boxed{1{,}800}", "1800", True, id="LaTeX thousands separator"),
    P("The answer is x = 18.", "18", True, id="an assignment"),
    P("The answer is 18.0", "18", True, id="a trailing .0"),
    P("\\boxed{18 \\text{ dollars}}", "18", True, id="\\text{dollars}"),
    P("The answer is 17.", "18", False, id="a wrong number stays wrong"),
    P("The answer is 1000001.", "1000000", False, id="integer golds are exact"),
]

# LaTeX forms, and MATH golds whose own answer contains a list, ± or text.
LATEX = [
    P("\\boxed{\\frac{3}{4}}", "0.75", True, id="\\frac"),
    P("\\boxed{\\dfrac34}", "0.75", True, id="compact \\dfrac34"),
    P("\\boxed{\\tfrac{3}{4}}", "3/4", True, id="\\tfrac against a slash gold"),
    P("\\boxed{\\sqrt{324}}", "18", True, id="a root via math-verify"),
    P("\\boxed{\\frac{36}{2}}", "18", True, id="an unreduced fraction"),
    P("\\boxed{2^{4}}", "16", True, id="a power via math-verify"),
    P("\\[\\boxed{18}\\]", "18", True, id="display math"),
    P("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", True, id="a set gold allows a list"),
    P("\\boxed{1 \\pm \\sqrt{2}}", "1 \\pm \\sqrt{2}", True, id="a ± gold allows ±"),
    P("\\boxed{(-\\infty, 3]}", "(-\\infty, 3]", True, id="an interval gold allows its comma"),
    P("\\boxed{\\text{Monday}}", "\\text{Monday}", True, id="a text gold"),
    P("\\boxed{|x|}", "|x|", True, id="an absolute-value gold allows its bars"),
    P("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True, id="equal surds"),
    P("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False, id="different surds"),
]

# Honest answers stated in varied ways: 1 (no hedge is read into ordinary reasoning).
HONEST = [
    P("Janet sells 16 - 3 - 4 = 9 eggs and makes 9 * $2 = $18 every day.\n#### 18", "18", True, id="GSM8K style"),
    P("Therefore, Janet makes \\boxed{18} dollars every day.", "18", True, id="a box mid-sentence with a unit"),
    P("The final answer is $\\boxed{18}$. I hope it is correct.", "18", True, id="Minerva format"),
    P("Answer: 18", "18", True, id="an Answer: line"),
    P("**Final Answer:** 18", "18", True, id="markdown Final Answer"),
    P("The answer is 18 because 9 × 2 = 18.", "18", True, id="a reason after the answer"),
    P("She sells 9 eggs at $2 each, so 9 * 2 = 18", "18", True, id="no statement: the last number"),
    P("Either way, the answer is \\boxed{18}.", "18", True, id="'either way' is not a hedge"),
    P("\\boxed{18}. Or equivalently, eighteen dollars.", "18", True, id="'or equivalently' adds no candidate"),
    P("The difference between 20 and 2 is \\boxed{18}.", "18", True, id="'between' earlier in the sentence"),
    P("She has 3 more than Tom, so \\boxed{18}.", "18", True, id="'more than' earlier in the sentence"),
    P("So the answer is 18 (9 eggs at $2 each).", "18", True, id="a parenthetical reason"),
    P("The answer is 7 more apples.", "7", True, id="'more' alone is not a bound"),
    P("The answer is 5 times.", "5", True, id="'times' as a unit"),
    P("\\boxed{7 \\text{ exactly}}", "7", True, id="'exactly' is not a hedge"),
    P("The answer is 2 and a half hours.", "2.5", True, id="mixed number in words with a unit"),
    P("Between them they have \\boxed{18} apples.", "18", True, id="'Between' opening the sentence"),
    P("It takes about 3 hours each way, so the total is \\boxed{6}.", "6", True, id="'about' in the reasoning"),
    P("The answer is \\boxed{7} and not 8.", "7", True, id="ruling out another value is not a hedge"),
    P("Q: how many?\nA: 12", "12", True, id="an A: line"),
    P("He has 3 cats and 12 dogs.", "12", True, id="no statement: last number after 'and' with a word between"),
    P("The answer is 18 dollars.\n\nThe answer is consistent with the total.", "18", True,
      id="a later confirming phrase does not replace the answer"),
    P("The answer is that she has 18 dollars left.", "18", True,
      id="'the answer is that' falls back to the last number"),
    P("The answer is $18. She also keeps 3 eggs.", "18", True, id="a currency $ followed by another sentence"),
    P("Therefore, the answer is $\\boxed{18}$.", "18", True, id="box in inline math"),
    P("The total cost is $18.00.", "18", True, id="no statement: a price"),
    P("The answer is: 18 dollars per day.", "18", True, id="a rate unit"),
    P("#### $18", "18", True, id="currency after ####"),
    P("The answer is 18.\n\nI hope this helps!", "18", True, id="a closing line"),
    P("The final answer is 18 apples, which is 3 more than before.", "18", True,
      id="a relative clause with another number"),
    P("The answer is 18 dollars. Or in other words, eighteen.", "18", True, id="'Or in other words' adds no candidate"),
    P("#### Final Answer\nThe total is 18 dollars.", "18", True,
      id="a markdown '#### Final Answer' heading is not a statement"),
    P("**Final Answer**\n\n18", "18", True, id="a bold heading then the number"),
]


@pytest.mark.parametrize("completion, gold, expected", HEDGE_INSIDE)
def test_hedges_inside_the_answer_score_zero(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", CANDIDATES)
def test_several_candidates_score_zero(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", AROUND)
def test_hedges_around_the_answer_score_zero(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", LAST_WINS)
def test_the_last_stated_answer_wins(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", SCALE)
def test_scale_words_multiply(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", MIXED)
def test_mixed_numbers(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", SCIENTIFIC)
def test_scientific_notation(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", FORMATTING)
def test_formatting_around_a_number(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", LATEX)
def test_latex_forms_and_golds_that_contain_a_hedge_token(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize("completion, gold, expected", HONEST)
def test_honest_answers_in_varied_phrasings_score_one(completion, gold, expected):
    assert math_correct(completion, gold) is expected


@pytest.mark.parametrize(
    "answer, value",
    [
        ("5 thousand", Fraction(5000)),
        ("2 dozen eggs", Fraction(24)),
        ("half a dozen", Fraction(6)),
        ("1 1/2", Fraction(3, 2)),
        ("1\\frac{1}{2}", Fraction(3, 2)),
        ("2 and a half hours", Fraction(5, 2)),
        ("1.5e6", Fraction(1_500_000)),
        ("2.5 \\times 10^{-3}", Fraction(1, 400)),
        ("$1,800.00", Fraction(1800)),
        ("-$5", Fraction(-5)),
        ("7 or more", None),
        ("7 apples at least", None),
        ("12 15/3", None),
        ("18 eggs at $2", None),
    ],
)
def test_as_number(answer, value):
    assert as_number(answer) == value


def test_hedge_categories_of_answers_and_golds():
    assert hedge_categories("7 \\text{ or more}") == {"or"}
    assert hedge_categories("at least 7") == {"bound"}
    assert hedge_categories("1,800") == set()  # a thousands separator is not a list
    assert hedge_categories("2 and 1/2") == set()  # a mixed number is not two values
    assert hedge_categories("1 \\pm \\sqrt{2}") == {"pm"}  # a MATH gold may contain one
    assert hedge_categories("\\approx 7?") == {"approx", "doubt"}


def test_malformed_completions_score_zero_and_are_counted():
    reset_malformed_count()
    well_formed = ["The answer is 17.", "\\boxed{\\frac{1}{2}}", "The answer is 18"]
    assert [math_correct(c, "18") for c in well_formed] == [False, False, True]
    assert malformed_count() == 0
    hedged = ["The answer is at least 18.", "\\boxed{18} or \\boxed{19}"]  # well formed, wrong: not counted
    assert [math_correct(c, "18") for c in hedged] == [False, False]
    assert malformed_count() == 0
    malformed = [None, "", "   ", "no digits here", ["not", "messages"], "x" * MAX_COMPLETION_CHARS + " 18",
                 "\\boxed{9^{9^{9}}}", "So \\boxed{18"]
    started = time.perf_counter()
    assert [math_correct(c, "18") for c in malformed] == [False] * len(malformed)
    assert time.perf_counter() - started < 2.0
    assert malformed_count() == len(malformed)
    reset_malformed_count()
    assert malformed_count() == 0


@pytest.mark.parametrize(
    "flood",
    [
        "answer is *" * 18_000,  # many empty "answer is" statements
        "the answer is 7 or more " * 8_000,  # many statements on one line
        "A: " * 60_000,
        "\\boxed{" * 25_000,  # unclosed boxes
        "\\boxed{1}, " * 18_000 + "\\boxed{7}",
        "the answer is correct. " * 8_000,
        "#### " * 40_000,
        "1 or " * 40_000,
        "x" * 199_990 + " 7",
    ],
    ids=["empty-phrases", "phrases-one-line", "a-lines", "unclosed-boxes", "box-list", "confirmations",
         "hashes", "numbers", "one-long-word"],
)
def test_completions_built_to_be_slow_are_graded_fast(flood):
    # What is timed is the grading (a backtracking pattern takes minutes on these), not a collection of the
    # test process's heap that the grading's allocations may trigger (over 1 s once a full suite has run).
    gc.disable()
    try:
        started = time.perf_counter()
        math_correct(flood, "7")
        elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    assert elapsed < 1.0


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
def gsm8k(real_data):
    return load_math(real_data / "gsm8k" / "test.jsonl")


def _body(solution: str) -> str:
    """A GSM8K worked solution without its final ``#### x`` line."""
    return solution.rsplit("####", 1)[0].rstrip()


def test_human_gsm8k_solutions_are_judged_correct(gsm8k):
    """Real solutions, written by people and graded correct: the checker must agree on every one."""
    golds, solutions = gsm8k["answer"], gsm8k["solution"]
    n = len(golds)
    assert n == 1319
    variants = {
        "#### line": [math_correct(s, g) for s, g in zip(solutions, golds)],
        "sentence": [math_correct(f"{_body(s)}\nThe answer is {g}.", g) for s, g in zip(solutions, golds)],
        "formatted": [math_correct(f"{_body(s)}\nThe answer is ${int(g):,}.", s) for s, g in zip(solutions, golds)],
        "boxed": [math_correct(f"{_body(s)}\nSo the final answer is $\\boxed{{{g}}}$.", s) for s, g in zip(solutions, golds)],
    }
    wrong = {name: [i for i, ok in enumerate(verdicts) if not ok] for name, verdicts in variants.items()}
    assert wrong == {name: [] for name in variants}  # 1319 of 1319 in each way of stating the answer


def test_honest_and_gaming_statements_of_every_gsm8k_gold(gsm8k):
    """Each real gold stated honestly in several ways scores 1; hedged or beaten by a later answer, 0."""
    golds, solutions = gsm8k["answer"], gsm8k["solution"]
    honest = [
        "{b}\nTherefore, the answer is $\\boxed{{{g}}}$.",
        "{b}\n**Final Answer:** {c}",
        "{b}\nThe final answer is {g}. I hope it is correct.",
        "{b}\nThe answer is \\boxed{{{c}}} dollars.",
    ]
    gaming = [
        "{b}\nThe answer is at least {g}.",
        "{b}\n\\boxed{{{g} \\text{{ or more}}}}",
        "{b}\n\\boxed{{{h}}} or \\boxed{{{g}}}",
        "{b}\nThe answer is between {h} and {g}.",
        "{b}\nThe answer is approximately {g}.",
        "{b}\nThe answer is {g}.\nFinal answer: {h}",
    ]
    for templates, expected in ((honest, True), (gaming, False)):
        for template in templates:
            wrong = []
            for solution, gold in zip(solutions, golds):
                text = template.format(b=_body(solution), g=gold, c=f"{int(gold):,}", h=int(gold) + 1)
                if math_correct(text, gold) is not expected:
                    wrong.append(gold)
            assert wrong == [], (template, wrong[:5])


def test_grading_a_gsm8k_solution_takes_well_under_a_millisecond(gsm8k):
    golds, solutions = gsm8k["answer"], gsm8k["solution"]
    started = time.perf_counter()
    assert all(math_correct(s, g) for s, g in zip(solutions, golds))
    assert (time.perf_counter() - started) / len(golds) < 1e-3  # measured about 30 µs on a 2-core CPU


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
