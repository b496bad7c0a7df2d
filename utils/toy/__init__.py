"""The toy world: coloured shapes on white, a small Stable-Diffusion-shaped model of them, and a pixel judge.

- language.py  the caption language: colours and their words, shapes, templates, objects, the held-out split
- render.py    the images: one filled shape in a palette colour
- judge.py     colour and shape from pixels, same-seed preservation
- train.py     training the toy pipeline (CPU, seeded, resumable)
- measure.py   prompt sets with fixed seeds, base quality and erasure numbers
- cli.py       python -m utils.toy {train,judge,quality,compare,panels,prompts}
- table.py     python -m utils.toy.table: every method on the toy world in one table (run_toy_table.sh)
- recipes.py   the table's rows: each method and the flags it runs with
"""
from utils.toy.judge import OTHER, iou, judge, judge_features, nearest_colour, preserved
from utils.toy.language import (COLOUR_WORDS, COLOURS, HELD_OUT, OBJECTS, SHAPES, TEMPLATES, parse_prompt,
                                prompt_sets, training_captions, vocabulary)
from utils.toy.measure import (NEIGHBOURS, Item, draw, erasure, erasure_items, load_pipeline, quality, quality_items,
                               sample_images, write_items)
from utils.toy.render import RESOLUTION, make_dataset, render
from utils.toy.train import DEFAULT_GUIDANCE, DEFAULT_STEPS, MODEL_MAX_LENGTH, build_models, make_scheduler

parse_caption = parse_prompt  # the name evaluate.py's toy scorer uses

__all__ = ["OTHER", "iou", "judge", "judge_features", "nearest_colour", "preserved", "COLOUR_WORDS", "COLOURS",
           "HELD_OUT", "OBJECTS", "SHAPES", "TEMPLATES", "parse_prompt", "prompt_sets", "training_captions",
           "vocabulary", "NEIGHBOURS", "Item", "draw", "erasure", "erasure_items", "load_pipeline", "quality",
           "quality_items", "sample_images", "write_items", "RESOLUTION", "make_dataset", "render",
           "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "MODEL_MAX_LENGTH", "build_models", "make_scheduler", "parse_caption"]
