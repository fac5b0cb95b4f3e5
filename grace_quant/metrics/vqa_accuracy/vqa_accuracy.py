"""VQA accuracy with the standard answer normalisation of the VQA evaluation (Antol et al., 2015).

An answer is normalised (punctuation, number words, articles, common contractions); its accuracy is
``min(1, matches / 3)`` averaged over the leave-one-out subsets of the reference answers (10 annotators in VQA;
with fewer references the same rule applies to each subset).
"""

import re

import datasets
import evaluate

_DESCRIPTION = (
    "VQA accuracy: min(1, #annotators agreeing / 3), averaged over leave-one-out subsets, after VQA normalisation."
)
_KWARGS = """
Args:
    predictions: list of predicted answers.
    references: list of lists of annotator answers.
Returns:
    vqa_accuracy: mean accuracy in [0, 1].
"""

CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "arent": "aren't",
    "cant": "can't",
    "wont": "won't",
    "didnt": "didn't",
    "wasnt": "wasn't",
    "werent": "weren't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "couldnt": "couldn't",
    "shouldnt": "shouldn't",
    "wouldnt": "wouldn't",
    "im": "i'm",
    "ive": "i've",
    "youre": "you're",
    "theyre": "they're",
    "whats": "what's",
    "thats": "that's",
    "lets": "let's",
}
NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBERS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalise(answer: str) -> str:
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_and_articles(process_punctuation(answer))


def vqa_score(prediction: str, references: list[str]) -> float:
    prediction = normalise(prediction)
    refs = [normalise(r) for r in references]
    if len(refs) == 1:
        return float(prediction == refs[0])
    scores = []
    for skip in range(len(refs)):
        others = refs[:skip] + refs[skip + 1 :]
        scores.append(min(1.0, sum(r == prediction for r in others) / 3.0))
    return sum(scores) / len(scores)


class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Antol et al., VQA: Visual Question Answering, ICCV 2015.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        scores = [vqa_score(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"vqa_accuracy": sum(scores) / len(scores) if scores else 0.0}
