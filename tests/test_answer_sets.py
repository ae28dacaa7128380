"""The set-of-answers reward: one accepted answer, normalised, scores 1; lists, hedges and non-answers score 0."""

import pytest

from qempo_lite.errors import QempoError
from qempo_lite.rewards.answer_sets import found_answers, normalise, set_correct, set_reward

FRUITS = ["apple", "cherry", "peach", "passion fruit", "lime"]
COLOURS = ["green", "lime", "sky blue", "blue"]


@pytest.mark.parametrize("reply", ["Apple", "apple.", "An apple.", "  APPLE!  ", "Apples.", "cherries", "Peaches",
                                   "Passion fruit.", "A ripe peach", "\"cherry\""])
def test_one_accepted_answer_is_correct(reply):
    assert set_correct(reply, FRUITS)


@pytest.mark.parametrize("reply", [
    "Apple, cherry.",            # a list
    "apple or peach",            # a list by its words
    "apple and peach",
    "apple/peach",
    "Maybe apple.",              # hedges
    "I think a peach",
    "Probably cherry",
    "Something like a lime",
    "banana",                    # not in the set
    "",                          # nothing
    "   ",
    "The answer that most people would give here is apple",  # not a short reply
    "apple\npeach",              # two lines, two answers
])
def test_lists_hedges_and_wrong_answers_score_zero(reply):
    assert not set_correct(reply, FRUITS)


def test_the_whole_reply_or_the_longest_match_names_one_answer():
    assert found_answers("Sky blue.", COLOURS) == {"sky blue"}  # not also "blue"
    assert set_correct("Sky blue.", COLOURS)
    assert found_answers("green lime", COLOURS) == {"green", "lime"}
    assert not set_correct("green lime", COLOURS)  # two different answers


def test_normalise_keeps_letters_and_digits_and_drops_articles():
    assert normalise("The  Nile-River!") == "nile river"
    assert normalise("Ａpple") == "apple"  # NFKC: full-width letters
    assert normalise("7.") == "7"


def test_non_text_completions_score_zero_and_chat_messages_are_read():
    assert not set_correct(None, FRUITS)
    assert not set_correct(42, FRUITS)
    assert set_correct([{"role": "assistant", "content": "Lime."}], FRUITS)


def test_reward_function_reads_the_answers_column():
    completions = [[{"role": "assistant", "content": "Apple."}], [{"role": "assistant", "content": "pear"}]]
    assert set_reward(completions, answers=[FRUITS, FRUITS], prompts=["p", "p"]) == [1.0, 0.0]
    with pytest.raises(QempoError, match="one list of accepted answers per completion"):
        set_reward(completions, answers=["apple", "pear"])
    with pytest.raises(QempoError, match="one list of accepted answers per completion"):
        set_reward(completions, answers=[FRUITS])
