"""A small synthetic English corpus for the tiny models' tokenizer and
pre-training: what pyfuse's models see (MMLU-Pro-style multiple-choice
questions, persona chat, arithmetic with digits and LaTeX). Deterministic
for a given seed."""

from __future__ import annotations

import random

from ..data.mmlu import LETTERS

__all__ = ["SUBJECTS", "chat_corpus", "synthetic_corpus"]

# {subject: [(question, answer, wrong answers)]}: the facts the corpus's
# multiple-choice questions are drawn from (bench/bench_eval.py asks them too).
SUBJECTS = {
    "astronomy": [
        ("Which planet is known as the red planet?", "Mars",
         ["Venus", "Jupiter", "Saturn", "Mercury", "Neptune", "Uranus", "Pluto", "Earth", "the Moon"]),
        ("What is the closest star to the Earth?", "the Sun",
         ["Sirius", "Vega", "Polaris", "Betelgeuse", "Rigel", "Altair", "Deneb", "Antares", "Spica"]),
        ("How many planets orbit the Sun?", "8",
         ["7", "9", "10", "12", "6", "5", "11", "4", "3"]),
    ],
    "chemistry": [
        ("What is the chemical symbol for gold?", "Au",
         ["Ag", "Gd", "Go", "Fe", "Pb", "Cu", "Zn", "Sn", "Al"]),
        ("Which gas do plants absorb from the air?", "carbon dioxide",
         ["oxygen", "nitrogen", "helium", "hydrogen", "argon", "neon", "methane", "ozone", "steam"]),
        ("What is the pH of pure water at room temperature?", "7",
         ["0", "1", "3", "5", "9", "11", "13", "14", "2"]),
    ],
    "history": [
        ("In which year did the Second World War end?", "1945",
         ["1939", "1918", "1950", "1944", "1941", "1960", "1914", "1929", "1968"]),
        ("Who was the first president of the United States?", "George Washington",
         ["Thomas Jefferson", "Abraham Lincoln", "John Adams", "James Madison",
          "Benjamin Franklin", "Andrew Jackson", "James Monroe", "John Jay", "Paul Revere"]),
    ],
    "math": [
        ("What is the value of $\\frac{1}{2} + \\frac{1}{4}$?", "$\\frac{3}{4}$",
         ["$\\frac{1}{6}$", "$\\frac{2}{6}$", "$\\frac{1}{8}$", "$1$", "$\\frac{2}{3}$",
          "$\\frac{5}{4}$", "$\\frac{1}{3}$", "$\\frac{3}{8}$", "$2$"]),
        ("What is the derivative of $x^2$?", "$2x$",
         ["$x$", "$x^3$", "$2$", "$\\frac{x^3}{3}$", "$2x^2$", "$x^2$", "$0$", "$4x$", "$\\sqrt{x}$"]),
    ],
    "biology": [
        ("Which organ pumps blood through the body?", "the heart",
         ["the liver", "the lungs", "the brain", "the kidney", "the stomach", "the skin",
          "the spleen", "the bladder", "the pancreas"]),
        ("What is the basic unit of life?", "the cell",
         ["the atom", "the organ", "the tissue", "the gene", "the protein", "the molecule",
          "the virus", "the ribosome", "the membrane"]),
    ],
}

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
          "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter"]
_HOBBIES = ["hiking", "painting", "cooking", "reading", "chess", "gardening", "swimming",
            "playing the guitar", "baking bread", "running", "knitting", "photography",
            "bird watching", "cycling", "fishing", "writing poems"]
_PETS = ["a dog", "two cats", "a parrot", "a rabbit", "three goldfish", "a turtle", "no pets"]
_JOBS = ["a teacher", "a nurse", "an engineer", "a baker", "a farmer", "a pilot", "a student",
         "a doctor", "a librarian", "a musician", "a chef", "a carpenter"]
_FOODS = ["pizza", "sushi", "pasta", "tacos", "salad", "soup", "curry", "pancakes", "ice cream"]
_PLACES = ["the mountains", "the beach", "a small town", "the city", "a farm", "an island",
           "the forest", "the desert"]

def _mcq(rng: random.Random) -> tuple[str, str]:
    subject = rng.choice(sorted(SUBJECTS))
    question, answer, wrong = rng.choice(SUBJECTS[subject])
    n_options = rng.choice([4, 4, 5, 10])
    options = [answer] + rng.sample(wrong, n_options - 1)
    rng.shuffle(options)
    letter = LETTERS[options.index(answer)]
    lines = [f"The following is a multiple choice question about {subject}.",
             f"Question: {question}", "Options:"]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    prompt = "\n".join(lines)
    return prompt, letter


def _persona(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    facts = [f"My name is {name}.", f"I work as {rng.choice(_JOBS)}.",
             f"I love {rng.choice(_HOBBIES)}.", f"I have {rng.choice(_PETS)}.",
             f"My favorite food is {rng.choice(_FOODS)}.", f"I live near {rng.choice(_PLACES)}."]
    rng.shuffle(facts)
    return " ".join(facts[: rng.randint(3, 6)])


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"Compute ${a} {op if op != '*' else chr(92) + 'times'} {b}$. The answer is \\boxed{{{value}}}."


def synthetic_corpus(n_docs: int = 600, seed: int = 0) -> list[str]:
    """English-ish documents covering what pyfuse's models see.

    Multiple-choice questions in the MMLU-Pro prompt format (``Question: ...
    Options: A. ... Answer: \\boxed{C}``, 4 to 10 options), persona chat
    turns, arithmetic with digits and LaTeX (``\\frac``, ``\\boxed{}``).
    Deterministic for a given ``(n_docs, seed)`` (``random.Random(seed)``).
    """
    rng = random.Random(seed)
    docs: list[str] = []
    for i in range(n_docs):
        kind = i % 4
        if kind == 0:
            prompt, letter = _mcq(rng)
            docs.append(f"{prompt}\nAnswer: Let's think step by step. The answer is \\boxed{{{letter}}}.")
        elif kind == 1:
            a, b = _persona(rng), _persona(rng)
            docs.append(f"Persona: {a}\nUser: Hi! {b} What do you like to do on weekends?\n"
                        f"Assistant: Hello! I enjoy {rng.choice(_HOBBIES)} and eating {rng.choice(_FOODS)}. "
                        f"Do you also like {rng.choice(_HOBBIES)}?")
        elif kind == 2:
            docs.append(" ".join(_arithmetic(rng) for _ in range(rng.randint(1, 3))))
        else:
            n = rng.randint(1, 9999)
            docs.append(f"There are {n} apples in {rng.choice(_PLACES)}. {rng.choice(_NAMES)} eats "
                        f"{n % 10} of them on day {rng.randint(1, 31)}, leaving {n - n % 10}. "
                        f"The final answer is $\\boxed{{{n - n % 10}}}$.")
    return docs


def chat_corpus(n: int = 64, seed: int = 0) -> list[dict]:
    """Chat-format records (``{"messages": [...]}``, mlx-lm's ChatDataset).

    Half are multiple-choice questions answered with ``\\boxed{X}``, half
    persona chat; some carry a system message."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        if i % 2 == 0:
            prompt, letter = _mcq(rng)
            messages += [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": f"The answer is \\boxed{{{letter}}}."}]
        else:
            messages += [{"role": "user", "content": f"{_persona(rng)} Tell me about yourself."},
                         {"role": "assistant", "content": _persona(rng)}]
        records.append({"messages": messages})
    return records
