r"""Extract the chosen option letter from a model's multiple-choice output.

Rules, tried in order; the first that yields a *valid* letter (``A`` up to
the ``num_options``-th letter) wins, and its name is returned with it:

``boxed``
    The last brace-balanced ``\boxed{...}`` whose content is a letter:
    ``\boxed{C}``, ``\boxed{(C)}``, ``\boxed{[C]}``, ``\boxed{\text{C}}``
    (also ``\textbf``, ``\mathrm``, ``\mathbf``...), ``\boxed{c}``, or a letter
    followed by its option text: ``\boxed{C. 42 m/s}``, ``\boxed{C) 42}``,
    ``\boxed{(C) 42}``. A box with anything else (``\boxed{42}``,
    ``\boxed{A and B}``), an invalid letter or no closing brace (truncated
    output) is skipped and the previous box is tried.
``answer_is``
    The last "answer is (X)" (also "answer is X", "answer is: **X**"). A
    lowercase letter counts only in parentheses: "the answer is a" reads
    as an article.
``answer_colon``
    The last "Answer: X" (also "**Answer:** X", "Answer: (X)"), with the
    same case rule.
``last_letter``
    The last standalone letter in the text, uppercase only. "Standalone"
    means not part of a word, an abbreviation ("U.S.", "e.g."), a
    contraction ("I'm") or a formula (``A = 2``, ``\A``). "A" and "I" are
    also English words, so when followed by a lowercase word they count as
    an article/pronoun ("A ball", "I think B is right" -> B) unless the
    word is one that cannot follow an article or pronoun ("A is correct",
    "A seems right") or the letter is introduced as an option ("option A
    fits", "(A)"). An option label at the start of a line followed by the
    option's text ("C. blue", "(C) blue") is a restated option list, not a
    choice, and is skipped when there are two or more such lines (a single
    "B. Because ..." line is an answer).

No rule matching returns ``(None, "none")``: the item is scored wrong.
"""

from __future__ import annotations

import re
import string

RULES = ("boxed", "answer_is", "answer_colon", "last_letter", "none")

_BOXED = re.compile(r"\\boxed\s*\{")
# LaTeX text/math wrappers whose argument is the real content of a box.
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mbox|operatorname)"
                      r"\s*\{([^{}]*)\}")
_BOX_LETTER_ALONE = re.compile(r"[(\[]?([A-Za-z])[)\]]?")
_BOX_LETTER_BRACKETED_TEXT = re.compile(r"[(\[]([A-Za-z])[)\]]\s*\S")
_BOX_LETTER_TEXT = re.compile(r"([A-Z])\s*[.):]\s*\S")

# A letter in parentheses may be lowercase; a bare one must be uppercase
# and end at a word boundary ("answer is B." but not "answer is Boron").
_LETTER = r"[*_\s]*(?:\(([A-Za-z])\)|\b([A-Z])\b(?![.'’]\w))"
_ANSWER_IS = re.compile(r"\b[Aa]nswer\s+is\s*:?" + _LETTER)
_ANSWER_COLON = re.compile(r"\b[Aa]nswer\s*[*_]*\s*:" + _LETTER)

_STANDALONE = re.compile(
    r"(?<![\w\\.])"    # not inside a word, a LaTeX command or an abbreviation
    r"([A-Z])"
    r"(?!\w)"          # not followed by more of the word
    r"(?!['’]\w)"      # nor a contraction ("I'm", "B's"); a closing quote is fine
    r"(?!\.\w)"        # not an abbreviation like "U.S." or "B.C."
    r"(?!\s*[=^_])"    # not a variable in a formula
)
_FOLLOWING_WORD = re.compile(r"\s+([a-z]+)")
# Words that cannot follow the article "A" or the pronoun "I": after them
# the letter is an option ("A is correct", "I seems best").
_COPULAS = frozenset({"is", "seems", "looks", "appears", "fits", "matches", "remains", "holds"})
_OPTION_INTRO = re.compile(r"(?:option|choice|answer|letter)\s*$", re.IGNORECASE)
# An option label at the start of a line, followed by the option's text
# ("C. blue", "(C) blue", "- C) blue"): in a list, restated options.
_LINE_START = re.compile(r"(?:^|\n)[ \t]*(?:[-*•][ \t]*)?\(?$")
_LABEL_TAIL = re.compile(r"\)?[.):][ \t]*\S")


def _valid_letters(num_options: int) -> str:
    if isinstance(num_options, bool) or not isinstance(num_options, int) or not 1 <= num_options <= 26:
        raise ValueError(f"num_options must be an int in 1..26, got {num_options!r}")
    return string.ascii_uppercase[:num_options]


def _boxed_contents(text: str) -> list[str]:
    """Contents of every brace-balanced ``\\boxed{...}``, in order of their
    opening; an unclosed box is dropped."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2  # an escaped brace \{ \} does not open or close
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[m.end():i])
                    break
            i += 1
    return out


def _letter_in_box(content: str) -> str | None:
    c = content
    while True:  # unwrap \text{...} etc., innermost first
        unwrapped = _WRAPPER.sub(r"\1", c)
        if unwrapped == c:
            break
        c = unwrapped
    c = c.replace("$", "").strip().strip("*").strip()
    m = _BOX_LETTER_ALONE.fullmatch(c) or _BOX_LETTER_BRACKETED_TEXT.match(c)
    if m:
        return m.group(1).upper()
    m = _BOX_LETTER_TEXT.match(c)
    return m.group(1) if m else None


def _last_pattern_letter(pattern: re.Pattern, text: str, valid: str) -> str | None:
    for m in reversed(list(pattern.finditer(text))):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            return letter
    return None


def _is_option_label(text: str, m: re.Match) -> bool:
    return bool(_LINE_START.search(text, 0, m.start())) and bool(_LABEL_TAIL.match(text, m.end()))


def _is_word_not_option(text: str, m: re.Match) -> bool:
    """True when the "A"/"I" at ``m`` is the English article/pronoun."""
    letter = m.group(1)
    if letter not in "AI":
        return False
    before = text[:m.start()]
    if before.endswith("(") and text[m.end():m.end() + 1] == ")":
        return False
    if _OPTION_INTRO.search(before):
        return False
    nxt = _FOLLOWING_WORD.match(text, m.end())
    return bool(nxt) and nxt.group(1) not in _COPULAS


def extract_answer(text: str, num_options: int) -> tuple[str | None, str]:
    """``(letter, rule)`` for a model output, or ``(None, "none")``.

    ``num_options`` bounds the valid letters (10 -> A..J); a letter beyond
    it is ignored and the search goes on with earlier matches and later
    rules. See the module docstring for the rules."""
    valid = _valid_letters(num_options)
    if not text:
        return None, "none"
    for content in reversed(_boxed_contents(text)):
        letter = _letter_in_box(content)
        if letter is not None and letter in valid:
            return letter, "boxed"
    letter = _last_pattern_letter(_ANSWER_IS, text, valid)
    if letter is not None:
        return letter, "answer_is"
    letter = _last_pattern_letter(_ANSWER_COLON, text, valid)
    if letter is not None:
        return letter, "answer_colon"
    candidates = list(_STANDALONE.finditer(text))
    labels = {m.start() for m in candidates if _is_option_label(text, m)}
    if len(labels) < 2:  # one "B. Because ..." line is an answer, not a list
        labels = set()
    for m in reversed(candidates):
        if m.group(1) in valid and m.start() not in labels and not _is_word_not_option(text, m):
            return m.group(1), "last_letter"
    return None, "none"
