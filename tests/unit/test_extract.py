r"""extract_answer on a table of tricky outputs; every expected value was
decided by hand from the documented rules (boxed > answer is > Answer: >
last standalone letter)."""

from __future__ import annotations

import pytest

from pyfuse.evals import extract_answer

CASES = [
    # (output, num_options, expected letter, expected rule)
    # -- boxed
    (r"So the answer is \boxed{C}.", 10, "C", "boxed"),
    (r"\boxed{\text{C}}", 10, "C", "boxed"),
    (r"\boxed{\textbf{ D }}", 10, "D", "boxed"),
    (r"\boxed{(C)}", 10, "C", "boxed"),
    (r"\boxed{[F]}", 10, "F", "boxed"),
    (r"\boxed{C. 42 m/s}", 10, "C", "boxed"),
    (r"\boxed{(H) 5 kg}", 10, "H", "boxed"),
    (r"\boxed{\text{(E) the liver}}", 10, "E", "boxed"),
    (r"$\boxed{ b }$", 10, "B", "boxed"),  # a box holding only a letter: case does not matter
    (r"\boxed {G}", 10, "G", "boxed"),
    (r"First \boxed{B}, but wait, actually \boxed{D}.", 10, "D", "boxed"),  # the last box wins
    (r"\boxed{\frac{1}{2}} which is option \boxed{B}", 10, "B", "boxed"),  # nested braces balanced
    (r"\boxed{B} ... the value is \boxed{\frac{3}{4}}", 10, "B", "boxed"),  # last box has no letter
    (r"\boxed{\boxed{E}}", 10, "E", "boxed"),
    (r"\boxed{B} then \boxed{K}", 10, "B", "boxed"),  # K is beyond J: skipped
    (r"\boxed{E} hmm \boxed{B}", 4, "B", "boxed"),
    (r"\boxed{B} hmm \boxed{E}", 4, "B", "boxed"),  # E is beyond D with 4 options
    (r"\boxed{42}. The answer is (C).", 10, "C", "answer_is"),  # a box without a letter falls through
    (r"\boxed{A and B} Answer: A", 10, "A", "answer_colon"),
    (r"The answer is (B) \boxed{D", 10, "B", "answer_is"),  # unclosed (truncated) box is ignored
    (r"Answer: \boxed{\text{C}", 10, "C", "last_letter"),  # unclosed box: its letter still stands alone
    # -- "answer is"
    ("The answer is (B).", 10, "B", "answer_is"),
    ("Therefore the correct answer is (b)", 10, "B", "answer_is"),
    ("the answer is: **E**", 10, "E", "answer_is"),
    ("The answer is J.", 10, "J", "answer_is"),
    ("The answer is (C). On reflection, the answer is (D).", 10, "D", "answer_is"),
    ("The answer is (F)", 4, None, "none"),  # F is beyond D and no other candidate
    ("I think the answer is (A) and not (K): the answer is (K)", 10, "A", "answer_is"),
    ("The answer is Boron, so option C", 10, "C", "last_letter"),  # "B" of "Boron" is a word
    # -- "Answer:"
    ("Answer: D", 10, "D", "answer_colon"),
    ("**Answer:** C", 10, "C", "answer_colon"),
    ("Answer: (j)", 10, "J", "answer_colon"),
    ("Answer: a force of 3 N", 10, None, "none"),  # lowercase bare "a": an article
    # -- last standalone letter
    ("I think B is right", 10, "B", "last_letter"),
    ("B is right, I think", 10, "B", "last_letter"),  # "I think": a pronoun
    ("I", 10, "I", "last_letter"),  # a lone I is the option with 9+ options
    ("B or I? I would go with B", 10, "B", "last_letter"),
    ("A ball is dropped from a height.", 10, None, "none"),  # the article
    ("A is correct.", 10, "A", "last_letter"),  # "A is": not an article
    ("Option A fits best, a reasonable choice.", 10, "A", "last_letter"),
    ("C, because B fails and A car would not fit", 10, "B", "last_letter"),
    ("I'd pick 'E'.", 10, "E", "last_letter"),  # quotes are fine, "I'd" is a contraction
    ("(D)", 10, "D", "last_letter"),
    ("The U.S. and the E.U. differ.", 10, None, "none"),  # abbreviations
    ("Let x = 3 and B = 2; so D.", 10, "D", "last_letter"),  # B = 2 is a variable
    ("it is c", 10, None, "none"),  # lowercase letters are not standalone answers
    ("Pick G", 4, None, "none"),  # beyond the option count
    (r"\Delta E is positive so C", 10, "C", "last_letter"),
    ("Options:\nA. red\nB. green\nC. blue", 10, None, "none"),  # a restated option list
    ("Options:\n(A) red\n(B) blue\nI pick B.", 10, "B", "last_letter"),
    ("B. Because the field is uniform.", 10, "B", "last_letter"),  # one label line: an answer
    # -- nothing
    ("", 10, None, "none"),
    ("I don't know.", 10, None, "none"),
    ("The value is 42.", 10, None, "none"),
]


@pytest.mark.parametrize("text,num_options,letter,rule", CASES)
def test_extract_table(text, num_options, letter, rule):
    assert extract_answer(text, num_options) == (letter, rule)


def test_rule_priority_box_over_phrases():
    text = "The answer is (A). Answer: B. I'd say C. \\boxed{D}"
    assert extract_answer(text, 10) == ("D", "boxed")
    assert extract_answer(text.replace("\\boxed{D}", ""), 10) == ("A", "answer_is")
    assert extract_answer("Answer: B. I'd say C.", 10) == ("B", "answer_colon")


def test_num_options_bounds_valid_letters():
    for n in range(2, 11):
        valid = "ABCDEFGHIJ"[:n]
        for letter in "ABCDEFGHIJ":
            got = extract_answer(f"\\boxed{{{letter}}}", n)
            assert got == ((letter, "boxed") if letter in valid else (None, "none"))


@pytest.mark.parametrize("bad", [0, 27, 4.0, True])
def test_num_options_must_be_sane(bad):
    with pytest.raises(ValueError):
        extract_answer("\\boxed{A}", bad)
