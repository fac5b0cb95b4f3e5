"""Exact match after light normalisation (case, surrounding whitespace, inner runs of spaces)."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to one of their references after lower-casing and collapsing whitespace."
_KWARGS = """
Args:
    predictions: list of predicted strings.
    references: list of lists of acceptable answers (or list of strings).
Returns:
    exact_match: fraction in [0, 1].
"""


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match_score(prediction: str, references) -> float:
    """1.0 when the prediction equals one of the references after normalisation, else 0.0 (one question)."""
    references = [references] if isinstance(references, str) else references
    return float(normalise(prediction) in {normalise(r) for r in references})


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references):
        hits = [exact_match_score(prediction, refs) for prediction, refs in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
