"""Prompt, image and scoring functions of the ``grace_sample_vqa`` lmms-eval task (the YAML beside this file
names them with ``!function utils.NAME``), and the generator of its data, ``test.parquet``.

The data is drawn, not downloaded: 32x32 images each holding one coloured square on the left or the right of a
white canvas, with questions about its colour and its side. Rebuild the file with
``python grace_quant/integrations/lmms_tasks/grace_sample_vqa/utils.py``; the tests check that it matches.
"""

from __future__ import annotations

import os

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SIDES = ("left", "right")
SIZE = 32
DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test.parquet")


def doc_to_visual(doc: dict) -> list:
    """The document's images, as RGB PIL images (lmms-eval hands them to the model)."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, between the task's (or the model's) pre- and post-prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def normalise(text: str) -> str:
    """Case- and space-insensitive form of an answer."""
    return " ".join(text.lower().split())


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the model's answer with the reference, after :func:`normalise`."""
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}


def draw(colour: str, side: str):
    """One image: a 12x12 square of ``colour`` in the ``side`` half of a white 32x32 canvas."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    left = 2 if side == "left" else SIZE - 14
    ImageDraw.Draw(image).rectangle((left, 10, left + 11, 21), fill=COLOURS[colour])
    return image


def samples() -> list[dict]:
    """Every (colour, side) pair asked both ways: 16 documents, always in the same order."""
    rows = []
    for colour in COLOURS:
        for side in SIDES:
            image = draw(colour, side)
            rows.append({"image": image, "question": "What colour is the square?", "answer": colour})
            rows.append({"image": image, "question": "Is the square on the left or the right?", "answer": side})
    return rows


def write_data(path: str = DATA_FILE) -> None:
    """Write :func:`samples` as a parquet file whose ``image`` column loads back as ``datasets.Image``."""
    from datasets import Dataset, Image

    rows = samples()
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    Dataset.from_dict(columns).cast_column("image", Image()).to_parquet(path)


if __name__ == "__main__":
    write_data()
    print(f"wrote {DATA_FILE}")
