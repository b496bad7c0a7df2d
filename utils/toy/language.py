"""The toy world's caption language: colours and their words, shapes, templates, objects and the held-out split.

Everything a caption can say is in the tables below. An image is one (colour, shape); its caption is drawn afresh
each time it is used in training (`training_caption`), so one image is seen under many phrasings:

- a colour template with one of the colour's words ("a crimson square"), except the held-out combinations;
- the bare colour word ("red": any shape of that colour), or the shape alone ("a circle": any colour);
- an object that implies both ("an apple" is a red circle); an object word never appears beside a colour word;
- the empty caption (caption dropout, for classifier-free guidance).

The held-out split (`HELD_OUT`) lists (template, word position) pairs that training never uses; those captions are
the "paraphrase" prompts, measured separately. Erasing a colour is measured on three prompt sets (`prompt_sets`):
explicit (the colour named in trained phrasings), paraphrase (held-out phrasings) and implied (objects only).
"""
from __future__ import annotations

import re

import numpy as np

# palette colour of each colour class (RGB); orange and purple are the neighbours of red and blue
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (240, 210, 20),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "purple": (150, 40, 180),
}
# the words for each colour: position 0 is the colour's name, 1 and 2 are synonyms
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "amber", "tangerine"),
    "yellow": ("yellow", "golden", "mustard"),
    "green": ("green", "emerald", "jade"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "mauve"),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# templates naming a colour word and a shape
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "{colour} {shape}",
    "a {shape} in {colour}",
    "a picture of a {colour} {shape}",
    "a {colour} coloured {shape}",
)
BARE_COLOUR = "{colour}"  # a colour word alone: that colour, any shape
SHAPE_ONLY = "a {shape}"  # a shape alone: that shape, any colour
# (template, word position) pairs never used in training: the paraphrase prompts
HELD_OUT: frozenset[tuple[str, int]] = frozenset({
    ("a {shape} in {colour}", 1),            # "a circle in crimson"
    ("a picture of a {colour} {shape}", 2),  # "a picture of a scarlet circle"
    ("a {colour} coloured {shape}", 1),      # "a crimson coloured circle"
})
# objects: each implies one colour and one shape and is never captioned with a colour word
OBJECTS: dict[str, tuple[str, str]] = {
    "apple": ("red", "circle"), "tomato": ("red", "circle"), "brick": ("red", "square"),
    "pumpkin": ("orange", "circle"), "carrot": ("orange", "triangle"),
    "sun": ("yellow", "circle"), "cheese": ("yellow", "triangle"),
    "pea": ("green", "circle"), "tree": ("green", "triangle"),
    "blueberry": ("blue", "circle"), "sapphire": ("blue", "square"),
    "grape": ("purple", "circle"), "amethyst": ("purple", "triangle"),
}
OBJECT_TEMPLATES: tuple[str, ...] = ("{article} {object}", "a picture of {article} {object}", "{object}")
# how a training caption is chosen for an image (the rest: a colour template); empty = caption dropout
CAPTION_MIX = {"empty": 0.25, "bare_colour": 0.10, "shape_only": 0.08, "object": 0.35}


def article(word: str) -> str:
    """'an' before a vowel, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def with_articles(text: str) -> str:
    """Every 'a' before a word that starts with a vowel made 'an' ("a orange circle" -> "an orange circle")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def fill(template: str, colour_word: str = "", shape: str = "", obj: str = "", an: bool = False) -> str:
    """A template with its slots filled; an=True: 'an' before a vowel everywhere (toy 3), else only before objects
    (toy 2's captions, "a orange circle", which its models were trained and measured on)."""
    text = template.format(colour=colour_word, shape=shape, object=obj, article=article(obj) if obj else "")
    return with_articles(text) if an else text


def vocabulary() -> list[str]:
    """Every word of the language (one token each in the toy tokenizer)."""
    words = [w for t in (*TEMPLATES, *OBJECT_TEMPLATES, SHAPE_ONLY) for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t))]
    words += ["a", "an", *SHAPES, *OBJECTS, *(w for ws in COLOUR_WORDS.values() for w in ws)]
    return sorted(set(words))


def colour_captions(colour: str, shape: str, held_out: bool = False, an: bool = False) -> list[str]:
    """The colour-template captions of (colour, shape): the trained ones, or with held_out=True the held-out ones."""
    return [fill(t, w, shape, an=an) for t in TEMPLATES for i, w in enumerate(COLOUR_WORDS[colour])
            if ((t, i) in HELD_OUT) == held_out]


def object_captions(obj: str) -> list[str]:
    """Every caption of an object."""
    return [fill(t, obj=obj) for t in OBJECT_TEMPLATES]


def objects_of(colour: str, shape: str | None = None) -> list[str]:
    """The objects that imply `colour` (and `shape`, when given)."""
    return [o for o, (c, s) in OBJECTS.items() if c == colour and shape in (None, s)]


def training_captions(an: bool = False) -> set[str]:
    """Every caption training can draw (the empty caption included)."""
    caps = {"", *(fill(SHAPE_ONLY, shape=s) for s in SHAPES)}
    for c in COLOURS:
        caps.update(fill(BARE_COLOUR, w) for w in COLOUR_WORDS[c])
        for s in SHAPES:
            caps.update(colour_captions(c, s, an=an))
    for o in OBJECTS:
        caps.update(object_captions(o))
    return caps


def caption_distribution(colour: str, shape: str, an: bool = False,
                         empty: float = CAPTION_MIX["empty"]) -> list[tuple[str, float]]:
    """Every training caption of an image of (colour, shape) with its probability (CAPTION_MIX with the empty
    caption's share `empty`, uniform within a kind; the colour templates take what the others leave)."""
    options = {"empty": [""], "bare_colour": [fill(BARE_COLOUR, w) for w in COLOUR_WORDS[colour]],
               "shape_only": [fill(SHAPE_ONLY, shape=shape)],
               "object": [cap for o in objects_of(colour, shape) for cap in object_captions(o)],
               "template": colour_captions(colour, shape, an=an)}
    share = {k: v for k, v in (CAPTION_MIX | {"empty": empty}).items() if options[k]}
    share["template"] = 1.0 - sum(share.values())
    return [(cap, p / len(options[k])) for k, p in share.items() for cap in options[k]]


def training_caption(colour: str, shape: str, rng: np.random.Generator, an: bool = False) -> str:
    """One caption for an image of (colour, shape), drawn from caption_distribution."""
    caps, probs = zip(*caption_distribution(colour, shape, an))
    return caps[rng.choice(len(caps), p=np.array(probs) / sum(probs))]


def prompt_sets(colour: str, an: bool = False) -> dict[str, list[tuple[str, str | None]]]:
    """The prompts that ask for `colour`, as (prompt, asked shape): explicit, paraphrase (held out), implied (objects);
    an=True: with 'an' before every vowel (toy 3's captions)."""
    explicit = [(fill(t, w, s, an=an), s) for s in SHAPES for t in TEMPLATES for i, w in enumerate(COLOUR_WORDS[colour])
                if (t, i) not in HELD_OUT and i == 0]
    explicit += [(fill(BARE_COLOUR, COLOUR_WORDS[colour][0]), None)]
    paraphrase = [(p, s) for s in SHAPES for p in colour_captions(colour, s, held_out=True, an=an)]
    implied = [(fill(OBJECT_TEMPLATES[0], obj=o), OBJECTS[o][1]) for o in objects_of(colour)]
    return {"explicit": explicit, "paraphrase": paraphrase, "implied": implied}


_WORD_TO_COLOUR = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}


def prompt_words(prompt: str) -> list[str]:
    """A prompt's words, lower-case, without the punctuation around them."""
    return [w.strip(".,;:!?\"'()") for w in prompt.lower().split()]


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The (colour, shape) a prompt asks for, through colour words or an object; None for what it leaves open."""
    words = prompt_words(prompt)
    colour = next((_WORD_TO_COLOUR[w] for w in words if w in _WORD_TO_COLOUR), None)
    shape = next((w for w in words if w in SHAPES), None)
    obj = next((w for w in words if w in OBJECTS), None)
    if obj is not None:
        colour, shape = colour or OBJECTS[obj][0], shape or OBJECTS[obj][1]
    return colour, shape

