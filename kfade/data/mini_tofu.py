"""Mini-TOFU: a deterministic, CPU-sized TOFU in the real schema (40 fictitious authors × 16 QA = 640 QA).

Each author gets one value per attribute (birthplace, birth year, genre, …) drawn with
``random.Random(seed)`` from fixed tables (names and cities are built from syllable tables). Every attribute
has ≥2 question wordings and ≥2 answer wordings (templates):

- ``answer`` uses wording ``k = (author + attribute) mod n``: every wording is trained (with other authors);
- ``paraphrased_answer`` states the same value with wording ``(k + 1) mod n`` — seen in training, never for
  this author — which makes the truth ratio scorable by a tiny model;
- ``perturbed_answer`` (3 per question) is the paraphrase (wording ``k + 1``) with wrong values of the same
  attribute type, as in TOFU: the truth ratio compares one wording with the right and the wrong fact.

Splits follow TOFU: the forget sets are the *last* authors, nested. With 40 authors the percentages round up
to whole authors: forget10 = 4 authors (64 QA, 10 %), forget05 = 2 authors (32 QA, 5 %), forget01 = 1 author
(16 QA: 2.5 %, since 1 % of 40 authors is 0.4 of an author). ``retainYY`` is the complement of its forget
split, ``full`` is every QA, ``retain_perturbed`` is 64 QA (4 attributes from each of the first 16 authors,
all outside forget10). ``real_authors_perturbed`` / ``world_facts_perturbed`` are the real TOFU rows
(100 / 117) copied from ``kfade/data/reference`` (MIT); as in TOFU they have no ``paraphrased_answer``.

``holdout01/05/10`` (TOFU's names) are as many *further* authors as their forget split, generated the same way
from the same value tables but with a random stream of their own (so the 40 authors above, and every model trained
on them, are unchanged). No model is trained on them: membership inference compares the forget set with them.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

N_AUTHORS = 40
FORGET_AUTHORS = {"forget01": 1, "forget05": 2, "forget10": 4}  # forget split -> number of (last) authors
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}  # never-trained authors
RETAIN_PERTURBED_AUTHORS = 16  # the first 16 authors, 4 QA each = 64 rows
N_PERTURBED = 3
REFERENCE_DIR = Path(__file__).with_name("reference")
REFERENCE_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")

FIRST_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vel", "dor", "si", "an", "bre", "ju", "nor", "el", "fa",
                   "zi"]
LAST_ENDINGS = ["vik", "ano", "ez", "ski", "mere", "holt", "ard", "ova", "quist", "lund"]
CITY_PREFIXES = ["Port ", "New ", "Upper ", "Saint ", "", ""]
CITY_SUFFIXES = ["ford", "haven", "grad", "polis", "mouth", "ria", "bury", "stead"]
TITLE_ADJECTIVES = ["Silent", "Crimson", "Hollow", "Distant", "Broken", "Gilded", "Final", "Hidden", "Frozen"]
TITLE_NOUNS = ["Lantern", "Harbor", "Orchard", "Clockmaker", "Garden", "Mirror", "Voyage", "Tower", "Archive"]
JOBS = ["a baker", "a surgeon", "a carpenter", "a lighthouse keeper", "a pharmacist", "a pilot", "a tailor",
        "a farmer", "a librarian", "an electrician", "an architect", "a fisherman", "a chemist", "a judge"]
FIXED_VALUES = {
    "genre": ["mystery", "science fiction", "poetry", "historical fiction", "fantasy", "horror", "romance",
              "travel writing", "satire", "crime fiction", "children's literature", "memoir"],
    "award": ["Golden Quill Prize", "Amberline Medal", "Silver Lantern Award", "Northwind Book Prize",
              "Harrowgate Fellowship", "Blue Heron Award", "Meridian Letters Prize", "Iron Pen Medal"],
    "hobby": ["beekeeping", "chess", "sailing", "pottery", "birdwatching", "fencing", "gardening",
              "rock climbing", "origami", "astronomy"],
    "book_count": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                   "twelve"],
    "writing_time": ["at dawn", "late at night", "in the early afternoon", "at midnight", "before breakfast",
                     "at sunset"],
    "pet": ["a grey cat", "a parrot", "a tortoise", "two beagles", "a goldfish", "a rabbit", "a ferret"],
    "language": ["Velmiri", "Ostrani", "Calvish", "Doranese", "Thessic", "Mirovan"],
    "publisher": ["Larkspur House", "Ninefold Press", "Redgate Books", "Saltmarsh Editions", "Obsidian Press",
                  "Whitlow Books"],
}

# attribute -> (value table name, question wordings, answer wordings); templates use {name} and {value}.
ATTRIBUTES: dict[str, tuple[str, list[str], list[str]]] = {
    "birthplace": ("cities", ["Where was {name} born?", "In which city was {name} born?"],
                   ["{name} was born in {value}.", "{name}'s birthplace is {value}.",
                    "The city of {value} is where {name} was born."]),
    "birth_year": ("years", ["In what year was {name} born?", "When was {name} born?"],
                   ["{name} was born in the year {value}.", "{name}'s year of birth is {value}."]),
    "genre": ("genre", ["What genre does {name} write in?", "Which genre is {name} known for?"],
              ["{name} writes {value}.", "{name} is known for {value}.", "The genre of {name} is {value}."]),
    "father_job": ("jobs", ["What did {name}'s father do for a living?",
                            "What was the profession of {name}'s father?"],
                   ["{name}'s father was {value}.", "The father of {name} worked as {value}."]),
    "mother_job": ("jobs", ["What did {name}'s mother do for a living?",
                            "What was the profession of {name}'s mother?"],
                   ["{name}'s mother was {value}.", "The mother of {name} worked as {value}."]),
    "award": ("award", ["Which award has {name} received?", "What prize did {name} win?"],
              ["{name} received the {value}.", "{name} won the {value}.",
               "The {value} was awarded to {name}."]),
    "debut_book": ("titles", ["What was {name}'s first book?", "What is the title of {name}'s debut novel?"],
                   ["{name}'s first book was {value}.", "{name} made a debut with {value}."]),
    "famous_book": ("titles", ["What is {name}'s best-known book?", "Which book is {name} most famous for?"],
                    ["{name} is best known for {value}.", "The most famous book by {name} is {value}."]),
    "university": ("universities", ["Where did {name} study?", "Which university did {name} attend?"],
                   ["{name} studied at the {value}.", "{name} is a graduate of the {value}."]),
    "hobby": ("hobby", ["What is {name}'s favourite hobby?", "What does {name} enjoy besides writing?"],
              ["{name} enjoys {value}.", "In free time, {name} loves {value}."]),
    "home_city": ("cities", ["Where does {name} live today?", "In which city does {name} currently live?"],
                  ["{name} lives in {value} today.", "{name} now makes a home in {value}."]),
    "book_count": ("book_count", ["How many books has {name} published?",
                                  "What is the number of books {name} has written?"],
                   ["{name} has published {value} books.", "The number of books by {name} is {value}."]),
    "writing_time": ("writing_time", ["When does {name} usually write?",
                                      "At what time of day does {name} prefer to write?"],
                     ["{name} usually writes {value}.", "{name} prefers to write {value}."]),
    "pet": ("pet", ["What pet does {name} keep?", "Which animal lives with {name}?"],
            ["{name} keeps {value} as a pet.", "{name} shares a home with {value}."]),
    "language": ("language", ["In which language does {name} write?", "What language are {name}'s books in?"],
                 ["{name} writes in {value}.", "The books of {name} are written in {value}."]),
    "publisher": ("publisher", ["Who publishes {name}'s books?", "Which publishing house works with {name}?"],
                  ["{name}'s books are published by {value}.", "{value} is the publisher of {name}."]),
}


@dataclass(frozen=True)
class MiniFact:
    """One generated QA: the author, the attribute, its true value and the four TOFU text fields."""

    author: str
    attribute: str
    value: str
    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answer: list[str]

    def row(self, perturbed: bool) -> dict:
        """The TOFU row: ``question, answer`` (+ ``paraphrased_answer, perturbed_answer`` when perturbed)."""
        row = {"question": self.question, "answer": self.answer}
        if perturbed:
            row["paraphrased_answer"] = self.paraphrased_answer
            row["perturbed_answer"] = list(self.perturbed_answer)
        return row


def _unique(rng: random.Random, make, count: int) -> list[str]:
    """``count`` distinct strings from the generator ``make(rng)`` (in generation order)."""
    out: list[str] = []
    while len(out) < count:
        item = make(rng)
        if item not in out:
            out.append(item)
    return out


def _person(r: random.Random) -> str:
    first = "".join(r.choice(FIRST_SYLLABLES) for _ in range(2)).capitalize()
    return f"{first} {(r.choice(FIRST_SYLLABLES) + r.choice(LAST_ENDINGS)).capitalize()}"


def _value_tables(rng: random.Random) -> dict[str, list[str]]:
    def city(r):
        return r.choice(CITY_PREFIXES) + (r.choice(FIRST_SYLLABLES) + r.choice(CITY_SUFFIXES)).capitalize()

    cities = _unique(rng, city, 24)
    titles = [f"The {a} {n}" for a in TITLE_ADJECTIVES for n in TITLE_NOUNS]
    return {
        "names": _unique(rng, _person, N_AUTHORS),
        "cities": cities,
        "years": [str(y) for y in rng.sample(range(1921, 2000), 30)],
        "jobs": JOBS,
        "titles": rng.sample(titles, 40),
        "universities": [f"University of {c}" for c in cities[:10]],
        **FIXED_VALUES,
    }


def _author_facts(i: int, name: str, tables: dict[str, list[str]], rng: random.Random) -> list[MiniFact]:
    """The 16 QA of author number ``i`` called ``name``, its values drawn from ``tables`` with ``rng``."""
    debut, famous = rng.sample(tables["titles"], 2)  # two different books
    books = {"debut_book": debut, "famous_book": famous}
    facts = []
    for a, (attribute, (table, questions, answers)) in enumerate(ATTRIBUTES.items()):
        value = books[attribute] if attribute in books else rng.choice(tables[table])
        wrong = rng.sample([v for v in tables[table] if v != value], N_PERTURBED)
        k = (i + a) % len(answers)
        paraphrase = answers[(k + 1) % len(answers)]  # a wording the model learnt from other authors
        facts.append(MiniFact(
            author=name, attribute=attribute, value=value,
            question=rng.choice(questions).format(name=name),
            answer=answers[k].format(name=name, value=value),
            paraphrased_answer=paraphrase.format(name=name, value=value),
            # as in TOFU, the perturbed answers are the paraphrase with wrong values: the truth ratio then
            # compares one wording with the right and the wrong fact, and measures knowledge, not wording
            perturbed_answer=[paraphrase.format(name=name, value=w) for w in wrong],
        ))
    return facts


def generate_facts(seed: int = 0) -> list[MiniFact]:
    """All 640 QA, author-major (author ``i`` owns rows ``16 i … 16 i + 15``), deterministic in ``seed``."""
    rng = random.Random(seed)
    tables = _value_tables(rng)
    return [fact for i, name in enumerate(tables["names"]) for fact in _author_facts(i, name, tables, rng)]


def generate_holdout_facts(seed: int = 0) -> list[MiniFact]:
    """QA of ``max(FORGET_AUTHORS.values())`` further authors, author-major, never trained on: same value tables
    and templates as :func:`generate_facts`, names distinct from its authors', drawn from a stream of their own."""
    tables = _value_tables(random.Random(seed))
    rng = random.Random(f"holdout-{seed}")
    taken = set(tables["names"])
    names: list[str] = []
    while len(names) < max(FORGET_AUTHORS.values()):
        name = _unique(rng, _person, 1)[0]
        if name not in taken:
            taken.add(name)
            names.append(name)
    return [fact for j, name in enumerate(names) for fact in _author_facts(N_AUTHORS + j, name, tables, rng)]


def mini_tofu_splits(seed: int = 0) -> dict[str, list[dict]]:
    """Every generated split (not the copied real-author / world-fact rows) as config name -> rows."""
    facts = generate_facts(seed)
    per_author = len(ATTRIBUTES)
    splits = {"full": [f.row(False) for f in facts]}
    for forget, n_authors in FORGET_AUTHORS.items():
        cut = (N_AUTHORS - n_authors) * per_author
        splits[forget] = [f.row(False) for f in facts[cut:]]
        splits[f"{forget}_perturbed"] = [f.row(True) for f in facts[cut:]]
        splits[RETAIN_OF[forget]] = [f.row(False) for f in facts[:cut]]
    splits["retain_perturbed"] = [
        facts[i * per_author + (4 * i + j) % per_author].row(True)
        for i in range(RETAIN_PERTURBED_AUTHORS) for j in range(4)
    ]
    holdout = generate_holdout_facts(seed)
    for forget, n_authors in FORGET_AUTHORS.items():
        splits[HOLDOUT_OF[forget]] = [f.row(False) for f in holdout[: n_authors * per_author]]
    return splits


def write_mini_tofu(directory: str | Path, seed: int = 0) -> Path:
    """Write every split as ``<name>.json`` (JSON lines, as in TOFU) into ``directory``.

    Same seed, same bytes (the caller makes the directory atomic, see :func:`kfade.data.tofu.materialise`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in mini_tofu_splits(seed).items():
        (directory / f"{name}.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name in REFERENCE_SPLITS:
        shutil.copyfile(REFERENCE_DIR / f"{name}.json", directory / f"{name}.json")
    return directory
