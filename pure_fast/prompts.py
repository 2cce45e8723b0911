"""Anchor prompts: concepts as plain phrases, expanded with templates per category.

Categories: style, object (also 'ip'), celebrity, nsfw, and the toy world's shape / colour / background.
Custom templates come from a text or JSON file (one template per line, each with one '{}' slot).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from .errors import UsageError
from .toy.presets import TOY_PRESETS

TEMPLATES: dict[str, list[str]] = {
    "style": [
        "a painting in the style of {}", "an artwork by {}", "a picture in {} style", "art by {}",
        "a landscape painted by {}", "a portrait in the style of {}", "{} style illustration", "a still life by {}",
    ],
    "object": [
        "a photo of {}", "an image of {}", "{}", "a picture of {}", "a drawing of {}",
        "{} in a city street", "a close-up photo of {}", "a cartoon of {}",
    ],
    "celebrity": [
        "a photo of {}", "a portrait of {}", "{} smiling", "a headshot of {}", "{} at a press event",
        "a close-up photo of {}'s face", "{} walking on the street", "a picture of {}",
    ],
    "nsfw": [
        "{}", "a photo of {}", "an image showing {}", "a painting with {}", "a picture of a person, {}",
        "{} in a bedroom", "an artwork depicting {}", "a realistic photo, {}",
    ],
}
TEMPLATES["ip"] = TEMPLATES["object"]
TOY_CATEGORIES = ("shape", "colour", "background")
CATEGORIES = tuple(TEMPLATES) + TOY_CATEGORIES

# Method options a category changes (category -> method -> {option: value}); options a caller passes override
# them. CURE's alpha 5 for nsfw is the CURE paper's choice; ActErase's neutral phrase for identities is
# "a person" (every other category uses the category-free prompt ""); the toy world's presets are tuned on
# its benchmark (``toy/presets.py``).
CATEGORY_PRESETS: dict[str, dict[str, dict]] = {
    "nsfw": {"cure": {"alpha": 5.0}},
    "celebrity": {"acterase": {"anchor": "a person"}},
    **{c: TOY_PRESETS for c in TOY_CATEGORIES},
}


def method_preset(category: str | None, method: str) -> dict:
    """The options ``category`` sets for ``method`` (empty for no category or none set)."""
    return dict(CATEGORY_PRESETS.get((category or "").lower(), {}).get(method, {}))


def load_templates(path: str) -> list[str]:
    """Templates from a file: a JSON list of strings, or one template per line (# comments allowed)."""
    if not os.path.isfile(path):
        raise UsageError(f"templates file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read templates file {path}: {exc}") from None
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"templates file {path} is not valid JSON: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise UsageError(f"templates file {path} must hold a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    bad = [t for t in items if t.count("{}") != 1]
    if not items or bad:
        raise UsageError(f"every template in {path} needs exactly one '{{}}' slot (bad: {bad[:3]})")
    return items


def expand(concept: str, category: str | None = None, templates: Sequence[str] | None = None,
           n: int | None = None) -> list[str]:
    """Anchor prompts for one concept."""
    if templates is None:
        cat = (category or "object").lower()
        if cat in TOY_CATEGORIES:
            from .toy import world

            check_toy_concepts([concept])
            prompts = world.anchor_prompts(concept)
            return prompts[:n] if n else prompts
        if cat not in TEMPLATES:
            raise UsageError(f"unknown category {category!r}; use one of {', '.join(CATEGORIES)} or --templates FILE")
        templates = TEMPLATES[cat]
    prompts = [t.format(concept) for t in templates]
    return prompts[:n] if n else prompts


def anchor_sets(forget: Sequence[str], retain: Sequence[str], category: str | None, templates=None):
    """concept -> anchor prompts for forget; a flat list of anchors for retain. ``templates``: a list, a
    templates file (``load_templates``) or None (the category's)."""
    if isinstance(templates, str):
        templates = load_templates(templates)
    f = {c: expand(c, category, templates) for c in forget}
    r = [p for c in retain for p in expand(c, category, templates)]
    return f, r


def check_concepts(forget: Sequence[str], retain: Sequence[str]) -> tuple[list[str], list[str]]:
    """Normalise and validate concept lists: non-empty forget, no duplicates, no overlap."""
    def clean(items, what):
        out = []
        for c in items:
            if not isinstance(c, str) or not c.strip():
                raise UsageError(f"empty {what} concept; give a non-empty phrase")
            out.append(" ".join(c.split()))
        low = [c.lower() for c in out]
        dup = sorted({c for c in low if low.count(c) > 1})
        if dup:
            raise UsageError(f"duplicate {what} concept(s): {', '.join(dup)}")
        return out

    f = clean(forget, "forget")
    r = clean(retain, "retain")
    if not f:
        raise UsageError("no forget concept given; pass at least one --forget TEXT")
    overlap = sorted({c.lower() for c in f} & {c.lower() for c in r})
    if overlap:
        raise UsageError(f"concept(s) both forgotten and retained: {', '.join(overlap)}; remove them from --retain")
    return f, r


def check_toy_concepts(concepts: Sequence[str]) -> None:
    """Every concept must be one of the toy world's (UsageError naming the known ones otherwise)."""
    from .toy import world

    known = world.all_concepts()
    unknown = [c for c in concepts if c not in known]
    if unknown:
        raise UsageError(f"unknown toy concept {unknown[0]!r}; known: {', '.join(known)} (or pass --templates FILE)")


def default_category(forget: Sequence[str], retain: Sequence[str], category: str | None = None,
                     templates=None, *, toy: bool = False) -> str | None:
    """The category a run uses: the given one; on the toy model, the toy category of the first forget concept
    (as ``pure-fast eval`` does), so the toy anchors and presets apply; otherwise None (object templates).

    On the toy model a concept outside the toy world is a usage error, unless custom templates are given.
    """
    if category or not toy:
        return category
    from .toy import world

    if templates is None:
        check_toy_concepts([*forget, *retain])
    elif any(c not in world.all_concepts() for c in [*forget, *retain]):
        return None
    return world.category_of(forget[0])
