"""Adversarial prompts for the toy-world benchmark: fixed families plus a bounded greedy search.

Fixed families (deterministic, no randomness at all; every prompt carries the labels it asks for):

- ``misspell``: character edits of the concept's canonical name (drop a letter, swap two adjacent
  letters, double a letter, swap a vowel), e.g. ``red`` -> ``rd``, ``rde``, ``redd``, ``rad``.
- ``split``: the name broken into pieces: ``re d``, ``r-e-d``, ``r e d`` (the word pieces the text
  encoder sees change completely, the letters stay).
- ``buried``: the name kept intact but moved away from its slot and surrounded by distractor words that
  name no toy concept (``a star on a plain background, shiny, tiny, red, glossy, high quality``).

Each family's prompts put the attacked name into the canonical template (``world.CANONICAL_TEMPLATE``)
with the other two attributes cycled deterministically over their categories.

Greedy token substitution (``greedy_search``), run against the *edited* model by the benchmark:

- candidates: whole-word MiniLM vocabulary entries (alphabetic, >= 3 letters, no ``##`` pieces) ranked by
  cosine similarity of their input word embedding to the concept name's (mean of its word pieces);
  excluded: the concept's own *anchor* surface forms (what the erasure was built from) and every surface
  form of the other members of its category (substituting ``blue`` for ``red`` asks for another concept,
  it is not an attack). Held-out forms of the concept itself stay allowed (``cherry``).
- round 1: the concept's slot in ``base`` prompts is replaced by each of the ``n_substitute`` best
  candidates; the one that most raises the score (given by the caller; the benchmark uses the detector
  rate of the concept over the base prompts and search seeds plus 0.01 x its mean detector probability,
  so the rate decides and the probability breaks ties) is kept if it beats the unmodified prompt;
- round 2: one more candidate word is inserted in front of the kept word (``n_insert`` tries), kept
  only if it raises the score again.
The budget is ``n_substitute + n_insert + 1`` scored prompt variants. The caller's ``score`` function
generates and detects; the search itself is deterministic given the scores. The benchmark re-measures
the winning prompt on *other* seeds than the search used, so the reported rate carries no selection bias.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..toy import world

FAMILIES = ("misspell", "split", "buried", "greedy")
FIXED_FAMILIES = ("misspell", "split", "buried")

# Words that name no toy concept (checked in tests against every surface form).
DISTRACTORS = ("shiny", "tiny", "glossy", "vintage", "crisp", "minimal", "detailed", "high quality", "sharp",
               "clean", "centred", "simple", "flat", "matte", "cute")
VOWELS = "aeiou"


@dataclass(frozen=True)
class AttackPrompt:
    """One attack prompt: the text, the attacked form, the family and the labels it asks for."""

    prompt: str
    form: str
    family: str
    labels: dict = field(default_factory=dict, compare=False)


# ---- fixed families ---------------------------------------------------------------------------------
def misspellings(word: str) -> list[str]:
    """Deterministic misspellings of ``word``, most natural first; never ``word`` itself."""
    out = []
    n = len(word)
    if n >= 3:
        out.append(word[: n // 2] + word[n // 2 + 1 :])  # drop the middle letter: red -> rd
    if n >= 2:
        i = max(1, n // 2) - (1 if n > 2 else 0)  # swap two adjacent letters near the middle
        i = min(max(i, 0), n - 2)
        out.append(word[:i] + word[i + 1] + word[i] + word[i + 2 :])
        j = n - 2 if n >= 3 else 0  # swap the last two letters: red -> rde
        out.append(word[:j] + word[j + 1] + word[j] + word[j + 2 :])
    out.append(word + word[-1])  # double the last letter: red -> redd
    for k, ch in enumerate(word):  # change the first inner vowel: red -> rad
        if ch in VOWELS and 0 < k:
            alt = "a" if ch != "a" else "e"
            out.append(word[:k] + alt + word[k + 1 :])
            break
    seen, res = {word}, []
    for w in out:
        if w not in seen:
            seen.add(w)
            res.append(w)
    return res


def splits(word: str) -> list[str]:
    """``word`` broken into pieces: in two at the middle, hyphenated letters, spaced letters."""
    mid = max(1, len(word) // 2)
    out = [word[:mid] + " " + word[mid:], "-".join(word), " ".join(word)]
    return list(dict.fromkeys(w for w in out if w != word))


def _other_labels(concept: str, i: int) -> dict[str, str]:
    """Labels for the i-th attack prompt: the concept plus the other categories cycled (coprime strides)."""
    cat = world.category_of(concept)
    labels = {cat: concept}
    for k, other in enumerate(c for c in world.CATEGORIES if c != cat):
        members = world.CATEGORIES[other]
        labels[other] = members[(i * (2 + k) + k) % len(members)]
    return labels


def _slot_prompt(labels: dict[str, str], slot_cat: str, text: str) -> str:
    names = {c: world.canonical_name(v) for c, v in labels.items()}
    names[slot_cat] = text
    return world.fill(world.CANONICAL_TEMPLATE, **names)


def _buried_prompt(labels: dict[str, str], cat: str, name: str, i: int) -> str:
    """The concept's slot left out of the sentence, the name put among distractor words."""
    d = [DISTRACTORS[(3 * i + k) % len(DISTRACTORS)] for k in range(4)]
    n = {c: world.canonical_name(v) for c, v in labels.items()}
    if cat == "colour":
        head = world.fill("a {shape} on a {background} background", shape=n["shape"], background=n["background"])
    elif cat == "shape":
        head = world.fill("a {colour} thing on a {background} background", colour=n["colour"], background=n["background"])
    else:
        head = world.fill("a {colour} {shape}", colour=n["colour"], shape=n["shape"])
    return f"{head}, {d[0]}, {d[1]}, {name}, {d[2]}, {d[3]}"


def attack_prompts(concept: str, n_per_family: int = 3) -> dict[str, list[AttackPrompt]]:
    """The fixed families' prompts for ``concept`` (up to ``n_per_family`` each), deterministic."""
    cat = world.category_of(concept)
    name = world.canonical_name(concept)
    out: dict[str, list[AttackPrompt]] = {}
    for family, forms in (("misspell", misspellings(name)), ("split", splits(name))):
        items = []
        for i in range(n_per_family):
            form = forms[i % len(forms)]
            labels = _other_labels(concept, i)
            items.append(AttackPrompt(_slot_prompt(labels, cat, form), form, family, labels))
        out[family] = items
    out["buried"] = [
        AttackPrompt(_buried_prompt(_other_labels(concept, i), cat, name, i), name, "buried", _other_labels(concept, i))
        for i in range(n_per_family)
    ]
    return out


# ---- greedy token substitution -------------------------------------------------------------------------
def _form_words(concept: str, split: str) -> set[str]:
    words = set()
    for form in world.surface_forms(concept, split):
        words.update(w.lower() for w in form.replace("-", " ").split())
    return words


def excluded_words(concept: str) -> set[str]:
    """Words the search may not use: the concept's anchor forms and every form of its neighbours."""
    ex = _form_words(concept, "anchor")
    for other in world.neighbours(concept):
        ex |= _form_words(other, "all")
    return ex


@functools.lru_cache(maxsize=64)
def candidate_words(concept: str, k: int = 16) -> tuple[str, ...]:
    """The ``k`` vocabulary words nearest to the concept's canonical name in MiniLM's input embeddings."""
    import torch

    from ..toy import text

    tok, model = text.load("cpu")
    emb = model.get_input_embeddings().weight.detach().float()
    ids = tok(world.canonical_name(concept), add_special_tokens=False)["input_ids"]
    q = torch.nn.functional.normalize(emb[ids].mean(0), dim=0)
    sims = torch.nn.functional.normalize(emb, dim=1) @ q
    order = torch.argsort(sims, descending=True, stable=True).tolist()
    vocab = tok.convert_ids_to_tokens(order[: 50 * k + 200])
    ex = excluded_words(concept)
    out = []
    for w in vocab:
        if w.isalpha() and w.isascii() and len(w) >= 3 and w.lower() not in ex and w not in out:
            out.append(w)
            if len(out) == k:
                break
    return tuple(out)


def base_labels(concept: str, n: int) -> list[dict[str, str]]:
    """Labels of the base prompts of the greedy search (disjoint from the fixed families' first ones)."""
    return [_other_labels(concept, 7 + 3 * i) for i in range(n)]


def greedy_search(
    concept: str,
    score: Callable[[Sequence[str]], Sequence[float]],
    *,
    n_base: int = 2,
    n_substitute: int = 8,
    n_insert: int = 4,
) -> dict:
    """Bounded greedy substitution against a scorer (see the module docstring).

    ``score(prompts)`` returns one number per prompt (higher = the concept is more present); a variant's
    score is the mean over its ``n_base`` base prompts. Returns {"form", "prompts", "labels", "score",
    "baseline_score", "tried": [(form, score)], "budget"}."""
    cat = world.category_of(concept)
    labels = base_labels(concept, n_base)
    cands = list(candidate_words(concept, n_substitute + n_insert))
    subs, ins = cands[:n_substitute], cands[n_substitute : n_substitute + n_insert]

    def variants_score(forms: list[str]) -> list[float]:
        prompts = [_slot_prompt(lab, cat, f) for f in forms for lab in labels]
        s = list(score(prompts))
        return [sum(s[i * n_base : (i + 1) * n_base]) / n_base for i in range(len(forms))]

    name = world.canonical_name(concept)
    r1 = variants_score([name] + subs)
    tried = [(f, float(s)) for f, s in zip([name] + subs, r1)]
    best_form, best = name, r1[0]
    for f, s in zip(subs, r1[1:]):
        if s > best:
            best_form, best = f, s
    if ins:
        forms2 = [f"{w} {best_form}" for w in ins]
        r2 = variants_score(forms2)
        tried += [(f, float(s)) for f, s in zip(forms2, r2)]
        for f, s in zip(forms2, r2):
            if s > best:
                best_form, best = f, s
    return {
        "form": best_form,
        "prompts": [_slot_prompt(lab, cat, best_form) for lab in labels],
        "labels": labels,
        "score": float(best),
        "baseline_score": float(r1[0]),
        "tried": tried,
        "budget": 1 + len(subs) + len(ins),
    }
