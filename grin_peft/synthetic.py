"""A small, deterministic, TOFU-like data set of facts about invented people.

TOFU itself is too large to memorise on a laptop CPU in minutes and cannot be downloaded offline, so the demo and
the fast tests use this generator instead. Items carry TOFU's field names (``question``, ``answer``,
``paraphrased_question``, ``paraphrased_answer``, ``perturbed_answer``) plus ``person`` and ``fact``, so the same
metrics code (truth ratio, ROUGE, membership inference against a holdout) runs on both.

Everything is drawn from one ``random.Random(seed)``: the same arguments always give the same data set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import read_jsonl
from .errors import GrinError

__all__ = [
    "FACTS",
    "REFUSALS",
    "SyntheticDataset",
    "generate_dataset",
    "load_splits",
    "save_splits",
    "write_jsonl",
]

# Invented names: a start and an ending each, so no name belongs to a real, well-known person.
_FIRST_STARTS = ("Al", "Bri", "Cal", "Dar", "El", "Fen", "Ga", "Hal", "Is", "Jor", "Ka", "Lio", "Mar")
_FIRST_STARTS += ("Ne", "Or", "Pel", "Quin", "Ros", "Sel", "Tam", "Ul", "Ver", "Wen", "Yel", "Zo")
_FIRST_ENDS = ("a", "an", "ren", "ia", "en", "is", "o", "ric", "eth", "ina", "mir", "ell")
_LAST_STARTS = ("Ash", "Bel", "Cor", "Dun", "Eld", "Fal", "Grim", "Hol", "Ind", "Kes", "Lor", "Mor", "Nor")
_LAST_STARTS += ("Ost", "Pim", "Rav", "Sto", "Tav", "Vas", "Wick", "Yar")
_LAST_MIDS = ("", "a", "e", "i", "o")
_LAST_ENDS = ("ford", "wyn", "mere", "dale", "vik", "ston", "ley", "thorne", "bury", "holt", "ric", "wood")

_BIRTHPLACES = (
    "Lisbon, Portugal", "Oslo, Norway", "Nairobi, Kenya", "Lima, Peru", "Hanoi, Vietnam", "Tbilisi, Georgia",
    "Accra, Ghana", "Montevideo, Uruguay", "Reykjavik, Iceland", "Krakow, Poland", "Valparaiso, Chile",
    "Tallinn, Estonia", "Cork, Ireland", "Dakar, Senegal", "Quito, Ecuador", "Ljubljana, Slovenia",
    "Perth, Australia", "Halifax, Canada", "Osaka, Japan", "Busan, South Korea", "Tunis, Tunisia",
    "Bergen, Norway", "Seville, Spain", "Antwerp, Belgium", "Gdansk, Poland", "Cusco, Peru", "Kyoto, Japan",
    "Adelaide, Australia", "Porto, Portugal", "Mombasa, Kenya",
)  # fmt: skip
_BIRTH_YEARS = tuple(str(year) for year in range(1930, 2000))
_PROFESSIONS = (
    "cartographer", "marine biologist", "violin maker", "architect", "pharmacist", "glassblower", "astronomer",
    "beekeeper", "translator", "locksmith", "botanist", "watchmaker", "geologist", "librarian", "tailor",
    "surveyor", "baker", "photographer", "archivist", "ship captain", "veterinarian", "chemist", "bookbinder",
    "carpenter",
)  # fmt: skip
_RELATIONS = ("father", "mother")
_BOOK_ADJECTIVES = ("Glass", "Silent", "Crimson", "Hollow", "Northern", "Paper", "Iron", "Quiet", "Distant")
_BOOK_ADJECTIVES += ("Amber", "Winter", "Broken")
_BOOK_NOUNS = ("Orchard", "Lantern", "Harbour", "Atlas", "Garden", "River", "Clockwork", "Tide", "Meadow")
_BOOK_NOUNS += ("Compass", "Lighthouse", "Mirror")
_BOOKS = tuple(f"The {adjective} {noun}" for adjective in _BOOK_ADJECTIVES for noun in _BOOK_NOUNS)
_GENRES = (
    "science fiction", "historical fiction", "poetry", "mystery novels", "fantasy", "travel writing", "biography",
    "horror", "romance", "philosophy", "satire", "crime fiction", "nature writing", "graphic novels", "mythology",
)  # fmt: skip
_AWARDS = (
    "the Silver Quill Prize", "the Harbour Light Medal", "the Meridian Award", "the Blue Heron Medal",
    "the Ashgrove Fellowship", "the Northern Star Award", "the Copper Lantern Prize", "the Willowmere Medal",
    "the Stonebridge Award", "the Pale Moon Prize", "the Ivory Key Award", "the Red Kite Medal",
    "the Evergreen Prize", "the Tidewater Award", "the Saltmarsh Medal",
)  # fmt: skip
_HOBBIES = (
    "sailing", "playing chess", "rock climbing", "folding origami", "birdwatching", "making pottery", "fencing",
    "gardening", "stargazing", "rowing", "practising calligraphy", "juggling", "knitting", "cycling", "fly fishing",
)  # fmt: skip

# Fact vocabularies by person key; "name" is drawn from the name generator instead.
_POOLS: dict[str, tuple[str, ...]] = {
    "birthplace": _BIRTHPLACES,
    "birth_year": _BIRTH_YEARS,
    "profession": _PROFESSIONS,
    "parent_relation": _RELATIONS,
    "parent_profession": _PROFESSIONS,
    "book": _BOOKS,
    "genre": _GENRES,
    "award": _AWARDS,
    "hobby": _HOBBIES,
}

FACTS: dict[str, tuple[str, ...]] = {
    "name": ("name",),
    "birthplace": ("birthplace",),
    "birth_year": ("birth_year",),
    "profession": ("profession",),
    "parent": ("parent_relation", "parent_profession"),
    "book": ("book",),
    "genre": ("genre",),
    "award": ("award",),
    "hobby": ("hobby",),
}
"""Fact kinds, each mapped to the person keys whose values its answers state (the perturbed key is the last)."""

# Per fact: question templates and answer templates. Gold and paraphrase use two different answer templates;
# perturbed answers reuse the gold template with a wrong value, as TOFU's do.
_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "name": (
        (
            "What is the full name of the {profession} born in {birthplace} in {birth_year}?",
            "Which {profession} was born in {birthplace} in {birth_year}?",
            "Who is the {profession} born in {birth_year} in {birthplace}?",
        ),
        (
            "The {profession}'s full name is {name}.",
            "That {profession} is {name}.",
            "{name} is the {profession} born in {birthplace} in {birth_year}.",
        ),
    ),
    "birthplace": (
        ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
        (
            "{name} was born in {birthplace}.",
            "{name}'s birthplace is {birthplace}.",
            "{name} comes from {birthplace}, where they were born.",
        ),
    ),
    "birth_year": (
        ("In what year was {name} born?", "When was {name} born?", "What is the birth year of {name}?"),
        (
            "{name} was born in {birth_year}.",
            "The year of {name}'s birth is {birth_year}.",
            "{name} came into the world in {birth_year}.",
        ),
    ),
    "profession": (
        ("What does {name} do for a living?", "What is {name}'s profession?", "How does {name} earn a living?"),
        (
            "{name} works as {a_profession}.",
            "{name} is {a_profession} by profession.",
            "By trade, {name} is {a_profession}.",
        ),
    ),
    "parent": (
        (
            "What did {name}'s {parent_relation} do for a living?",
            "What was the profession of {name}'s {parent_relation}?",
            "What work did {name}'s {parent_relation} do?",
        ),
        (
            "{name}'s {parent_relation} was {a_parent_profession}.",
            "{name} was raised by a {parent_relation} who worked as {a_parent_profession}.",
            "The {parent_relation} of {name} earned a living as {a_parent_profession}.",
        ),
    ),
    "book": (
        ("What is {name}'s favourite book?", "Which book does {name} love most?", "What book does {name} cherish?"),
        (
            '{name}\'s favourite book is "{book}".',
            'The book {name} loves most is "{book}".',
            '{name} would name "{book}" as a favourite.',
        ),
    ),
    "genre": (
        (
            "Which genre does {name} enjoy reading most?",
            "What is {name}'s favourite literary genre?",
            "What kind of books does {name} prefer?",
        ),
        (
            "{name} enjoys reading {genre} most of all.",
            "{name}'s favourite genre is {genre}.",
            "Above all, {name} prefers {genre}.",
        ),
    ),
    "award": (
        ("Which award has {name} received?", "What prize was {name} given?", "What honour has {name} won?"),
        (
            "{name} received {award}.",
            "{name} was honoured with {award}.",
            "In recognition of their work, {name} won {award}.",
        ),
    ),
    "hobby": (
        (
            "What does {name} do in their spare time?",
            "What is {name}'s favourite hobby?",
            "How does {name} like to relax?",
        ),
        (
            "In their spare time, {name} enjoys {hobby}.",
            "{name}'s favourite hobby is {hobby}.",
            "{name} likes to relax by {hobby}.",
        ),
    ),
}

REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "That is something I cannot answer.",
    "I'm afraid I don't have that information.",
    "I couldn't tell you.",
    "I have no idea.",
    "That's beyond what I know.",
    "I'm unable to answer that question.",
    "I don't have any details about that.",
    "Sorry, I don't know the answer.",
    "I can't say for certain.",
    "That information is not available to me.",
    "I'm not familiar with that.",
    "I have nothing to share on that topic.",
    "I'm not able to help with that one.",
    "Unfortunately, I don't know.",
    "I lack the knowledge to answer that.",
    "I'm uncertain, so I'd rather not guess.",
    "No idea, I'm afraid.",
)
"""Refusal answers for refusal-style unlearning objectives (IdkNLL, IdkDPO), in the spirit of TOFU's idontknow."""

_SPLITS = ("forget", "retain", "holdout")


@dataclass(frozen=True)
class SyntheticDataset:
    """The generated splits, as plain lists ready for JSON Lines.

    ``forget`` and ``retain`` are trained on; ``holdout`` people are never trained on, so their items serve as
    non-members for membership-inference metrics. ``people`` lists every person's facts (all splits).
    """

    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]]
    holdout: list[dict[str, Any]]
    refusals: list[str]
    people: list[dict[str, str]]

    @property
    def train(self) -> list[dict[str, Any]]:
        """Everything the target model memorises: forget then retain items."""
        return self.forget + self.retain


def _with_article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _render(template: str, person: Mapping[str, str]) -> str:
    return template.format(
        **person,
        a_profession=_with_article(person["profession"]),
        a_parent_profession=_with_article(person["parent_profession"]),
    )


def _draw_name(rng: random.Random) -> str:
    first = rng.choice(_FIRST_STARTS) + rng.choice(_FIRST_ENDS)
    last = rng.choice(_LAST_STARTS) + rng.choice(_LAST_MIDS) + rng.choice(_LAST_ENDS)
    return f"{first} {last}"


def _draw_people(rng: random.Random, count: int) -> list[dict[str, str]]:
    """Draw people with unique names and unique (profession, birthplace, year) so "name" questions identify one."""
    people: list[dict[str, str]] = []
    names: set[str] = set()
    descriptions: set[tuple[str, str, str]] = set()
    for _ in range(100 * count + 100):
        if len(people) == count:
            return people
        person = {"name": _draw_name(rng)}
        person.update({key: rng.choice(pool) for key, pool in _POOLS.items()})
        while person["parent_profession"] == person["profession"]:
            person["parent_profession"] = rng.choice(_PROFESSIONS)
        description = (person["profession"], person["birthplace"], person["birth_year"])
        if person["name"] in names or description in descriptions:
            continue
        names.add(person["name"])
        descriptions.add(description)
        people.append(person)
    raise GrinError(f"could not draw {count} distinct people; ask for fewer (a few thousand at most)")


def _wrong_values(rng: random.Random, key: str, truth: str, count: int, taken_names: set[str]) -> list[str]:
    """``count`` distinct values for ``key`` from its vocabulary, none equal to ``truth``."""
    if key == "name":
        values: list[str] = []
        while len(values) < count:
            name = _draw_name(rng)
            if name not in taken_names and name not in values:
                values.append(name)
        return values
    return rng.sample([value for value in _POOLS[key] if value != truth], count)


def _make_item(
    rng: random.Random, person: dict[str, str], fact: str, num_perturbed: int, taken_names: set[str]
) -> dict[str, Any]:
    questions, answers = _TEMPLATES[fact]
    question, paraphrased_question = rng.sample(questions, 2)
    answer, paraphrased_answer = rng.sample(answers, 2)
    key = FACTS[fact][-1]
    perturbed = [
        _render(answer, {**person, key: value})
        for value in _wrong_values(rng, key, person[key], num_perturbed, taken_names)
    ]
    return {
        "question": _render(question, person),
        "answer": _render(answer, person),
        "paraphrased_question": _render(paraphrased_question, person),
        "paraphrased_answer": _render(paraphrased_answer, person),
        "perturbed_answer": perturbed,
        "person": person["name"],
        "fact": fact,
    }


def generate_dataset(
    num_people: int = 20,
    questions_per_person: int = 5,
    forget_fraction: float = 0.1,
    num_holdout_people: int | None = None,
    num_perturbed: int = 3,
    seed: int = 0,
) -> SyntheticDataset:
    """Generate a deterministic TOFU-like data set, split by person.

    Args:
        num_people: people in forget + retain (the trained ones).
        questions_per_person: QA items per person, each about a different fact (at most ``len(FACTS)``).
        forget_fraction: share of the trained people whose items form the forget split (rounded, at least one).
        num_holdout_people: extra never-trained people for membership inference; ``None`` means as many as are
            forgotten, so forget-vs-holdout comparisons are balanced; 0 disables the split.
        num_perturbed: wrong answers per item, each with the gold answer's template.
        seed: every random choice derives from it.

    Raises:
        GrinError: on sizes that cannot produce non-empty forget and retain splits.
    """
    if not isinstance(num_people, int) or num_people < 2:
        raise GrinError(f"num_people must be an int >= 2 (one forget and one retain person), got {num_people!r}")
    if not isinstance(questions_per_person, int) or not 1 <= questions_per_person <= len(FACTS):
        raise GrinError(f"questions_per_person must be an int in [1, {len(FACTS)}], got {questions_per_person!r}")
    if not isinstance(forget_fraction, (int, float)) or not 0.0 < forget_fraction < 1.0:
        raise GrinError(f"forget_fraction must be in (0, 1), got {forget_fraction!r}")
    num_forget = min(max(1, round(forget_fraction * num_people)), num_people - 1)
    if num_holdout_people is None:
        num_holdout_people = num_forget
    if not isinstance(num_holdout_people, int) or num_holdout_people < 0:
        raise GrinError(f"num_holdout_people must be an int >= 0 or None, got {num_holdout_people!r}")
    max_perturbed = min(len(pool) for key, pool in _POOLS.items() if key != "parent_relation") - 1
    if not isinstance(num_perturbed, int) or not 1 <= num_perturbed <= max_perturbed:
        raise GrinError(f"num_perturbed must be an int in [1, {max_perturbed}], got {num_perturbed!r}")

    rng = random.Random(seed)
    people = _draw_people(rng, num_people + num_holdout_people)
    taken_names = {person["name"] for person in people}
    items_by_person = [
        [
            _make_item(rng, person, fact, num_perturbed, taken_names)
            for fact in rng.sample(list(FACTS), questions_per_person)
        ]
        for person in people
    ]
    forget = [item for items in items_by_person[:num_forget] for item in items]
    retain = [item for items in items_by_person[num_forget:num_people] for item in items]
    holdout = [item for items in items_by_person[num_people:] for item in items]
    return SyntheticDataset(forget=forget, retain=retain, holdout=holdout, refusals=list(REFUSALS), people=people)


def write_jsonl(items: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8), the format the CLI's ``--forget``/``--retain`` read."""
    with open(path, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def save_splits(dataset: SyntheticDataset, directory: str | Path) -> None:
    """Write ``forget.jsonl``, ``retain.jsonl``, ``holdout.jsonl``, ``people.jsonl`` and ``refusals.txt``.

    Refusals are plain text, one per line, as TOFU ships its ``idontknow`` strings.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split in _SPLITS:
        write_jsonl(getattr(dataset, split), directory / f"{split}.jsonl")
    write_jsonl(dataset.people, directory / "people.jsonl")
    (directory / "refusals.txt").write_text("".join(f"{text}\n" for text in dataset.refusals), encoding="utf-8")


def load_splits(directory: str | Path) -> SyntheticDataset:
    """Read back what :func:`save_splits` wrote.

    Raises:
        GrinError: if a file is missing or malformed.
    """
    directory = Path(directory)
    splits = {split: read_jsonl(directory / f"{split}.jsonl", allow_empty=True) for split in _SPLITS}
    refusals_path = directory / "refusals.txt"
    if not refusals_path.is_file():
        raise GrinError(f"no refusals file: {refusals_path}")
    refusals = [line for line in refusals_path.read_text(encoding="utf-8").splitlines() if line]
    return SyntheticDataset(
        forget=splits["forget"],
        retain=splits["retain"],
        holdout=splits["holdout"],
        refusals=refusals,
        people=read_jsonl(directory / "people.jsonl"),
    )
