"""The category descriptions file: category -> class word and defect phrases (spec 4.1).

FiLo's prompts and its Grounding DINO caption are built from short per-category defect
descriptions. They are the user's data (this project does not ship the authors' LLM-written
text), given as JSON:

    {"bottle": {"class_word": "bottle",
                "descriptions": ["cracked large", "missing cap"],
                "grounding_descriptions": ["cracked large", "missing cap"]}}

class_word is optional (default: spec 4.1's rule, e.g. pcb1 -> "pcb"); grounding_descriptions
is optional (default: the descriptions). Phrases keep their case and spacing: Grounding DINO's
anomaly-box test compares them case-sensitively with lower-cased phrases (a reference quirk).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fbclip_edge.errors import FBClipError

#: Spec 4.1: categories whose class word is not the category name.
CLASS_WORDS: dict[str, str] = {
    "pcb1": "pcb",
    "pcb2": "pcb",
    "pcb3": "pcb",
    "pcb4": "pcb",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
}
_KEYS = ("class_word", "descriptions", "grounding_descriptions")
#: A starter file for the MVTec AD and VisA categories, written for this project (not the
#: authors' text): short, lower-case, visual phrases. Copy it and adapt it to your parts.
STARTER_FILE = Path(__file__).with_name("starter_descriptions.json")
_EXAMPLE = '{"class_word": "bottle", "descriptions": ["cracked large", "missing cap"]}'


@dataclass(frozen=True)
class CategoryData:
    """One category's entry: class word, prompt phrases and the Grounding DINO copy."""

    category: str
    class_word: str
    descriptions: tuple[str, ...]
    grounding_descriptions: tuple[str, ...]


def default_class_word(category: str) -> str:
    """'_' -> ' ', then pcb1..4 -> 'pcb', macaroni1/2 -> 'macaroni' (spec 4.1)."""
    name = category.replace("_", " ")
    return CLASS_WORDS.get(name, name)


def _phrases(category: str, key: str, value: object, where: str) -> tuple[str, ...]:
    """A non-empty list of non-empty strings, or a one-line error naming the fix."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise FBClipError(
            f"{where}: category '{category}' {key} must be a list of strings, got "
            f'{type(value).__name__}; write e.g. "{key}": ["cracked large", "missing cap"]'
        )
    if not value:
        raise FBClipError(
            f"{where}: category '{category}' has an empty {key} list; add at least one "
            "defect phrase"
        )
    if any(not item.strip() for item in value):
        raise FBClipError(
            f"{where}: category '{category}' {key} has an empty phrase (it would match every "
            "Grounding DINO box); remove it"
        )
    return tuple(value)


def parse_entry(category: str, entry: object, where: str = "descriptions") -> CategoryData:
    """Validate one category's entry."""
    if not isinstance(entry, Mapping):
        raise FBClipError(
            f"{where}: category '{category}' must map to an object, got "
            f'{type(entry).__name__}; write "{category}": {_EXAMPLE}'
        )
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise FBClipError(
            f"{where}: category '{category}' has unknown keys {unknown}; use {list(_KEYS)}"
        )
    if "descriptions" not in entry:
        raise FBClipError(
            f"{where}: category '{category}' has no descriptions; write \"{category}\": {_EXAMPLE}"
        )
    class_word = entry.get("class_word", default_class_word(category))
    if not isinstance(class_word, str) or not class_word.strip():
        raise FBClipError(
            f"{where}: category '{category}' class_word must be a non-empty string, got "
            f'{class_word!r}; e.g. "class_word": "{default_class_word(category)}"'
        )
    descriptions = _phrases(category, "descriptions", entry["descriptions"], where)
    grounding = entry.get("grounding_descriptions", entry["descriptions"])
    return CategoryData(
        category=category,
        class_word=class_word,
        descriptions=descriptions,
        grounding_descriptions=_phrases(category, "grounding_descriptions", grounding, where),
    )


def parse_descriptions(data: object, where: str = "descriptions") -> dict[str, CategoryData]:
    """Validate a whole table (the loaded JSON), keeping its category order."""
    if not isinstance(data, Mapping) or not data:
        raise FBClipError(
            f"{where}: expected a non-empty JSON object mapping category -> entry, e.g. "
            f'{{"bottle": {_EXAMPLE}}}'
        )
    table: dict[str, CategoryData] = {}
    for category, entry in data.items():
        if not isinstance(category, str) or not category:
            raise FBClipError(f"{where}: category names must be non-empty strings")
        table[category] = parse_entry(category, entry, where)
    return table


def load_descriptions(path: str | Path) -> dict[str, CategoryData]:
    """Read and validate a descriptions JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FBClipError(f"descriptions file not found: {path}; check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FBClipError(
            f"{path} is not valid JSON ({type(error).__name__}: {error}); fix the file"
        ) from None
    return parse_descriptions(data, str(path))


def category_data(
    table: Mapping[str, CategoryData], category: str, where: str = "descriptions"
) -> CategoryData:
    """The entry of one category, or a one-line error naming the missing category."""
    found = table.get(category)
    if found is None:
        known = ", ".join(sorted(table)) or "none"
        raise FBClipError(
            f"{where}: no entry for category '{category}' (has: {known}); add "
            f'"{category}": {_EXAMPLE}'
        )
    return found


def share_by_class_word(table: Mapping[str, CategoryData]) -> dict[str, CategoryData]:
    """The reference's prompt-table quirk (spec 4.1): categories sharing a class word use the
    prompt descriptions of the LAST such category in table order (VisA: macaroni1 gets
    macaroni2's); Grounding DINO keeps each category's own list."""
    last: dict[str, CategoryData] = {}
    for data in table.values():
        last[data.class_word] = data
    return {
        name: CategoryData(
            category=data.category,
            class_word=data.class_word,
            descriptions=last[data.class_word].descriptions,
            grounding_descriptions=data.grounding_descriptions,
        )
        for name, data in table.items()
    }
