"""GraceDataCollator: labels are exactly the answer tokens (+ EOS), padding and masks are right, image inputs pass
through, for LLaVA and Qwen2-VL processors built offline; and the demo's batches are the ones its former
hand-written collation produced."""

from __future__ import annotations

import pytest
import torch

from grace_quant import GraceDataCollator
from grace_quant.collate import pad_tokens
from grace_quant.evaluation import format_prompt
from grace_quant.labels import IGNORE_INDEX
from grace_quant.testing import tiny_model, tiny_processor, tiny_vqa

IMAGE_SIZE = {"llava": 28, "qwen2-vl": 56}


def reference_answer(processor, answer: str, prompt: str) -> list[int]:
    """The answer tokenised on its own (a byte-level BPE: a leading space is part of the first token), then EOS. The
    answer follows the prompt after a space ("ASSISTANT:", "A:"), or directly after a newline (Qwen's template)."""
    tokenizer = processor.tokenizer
    text = answer if prompt.endswith("\n") else " " + answer
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "template"])
def test_labels_are_exactly_the_answer_tokens_and_eos(name, chat):
    processor = tiny_processor(name, chat_template=chat)
    examples = tiny_vqa(4, image_size=IMAGE_SIZE[name])
    template = None if chat else "{image}Q: {question} A:"
    batch = GraceDataCollator(processor, template=template)(examples)
    for row, example in enumerate(examples):
        labels = batch["labels"][row]
        supervised = labels[labels != IGNORE_INDEX].tolist()
        prompt = format_prompt(processor, example["question"], template)
        assert prompt.endswith("\n" if chat and name == "qwen2-vl" else "A:" if not chat else "ASSISTANT:")
        assert supervised == reference_answer(processor, example["answer"], prompt)
        # the supervised tokens are the last real tokens of the row, and the input ids hold the same tokens there
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real]
        assert ids[-len(supervised) :].tolist() == supervised
        # everything before them is the processor's own encoding of the prompt with its image
        alone = processor(images=[example["image"]], text=[prompt], return_tensors="pt")["input_ids"][0]
        assert ids[: -len(supervised)].tolist() == alone.tolist()


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_padding_masks_and_image_inputs(name):
    processor = tiny_processor(name)
    examples = tiny_vqa(3, image_size=IMAGE_SIZE[name])
    examples[1]["answer"] = "a much longer answer than the others, to force padding"
    right = GraceDataCollator(processor)(examples)
    left = GraceDataCollator(processor, padding_side="left")(examples)
    texts = [format_prompt(processor, e["question"], None) for e in examples]
    lengths = [len(reference_answer(processor, e["answer"], t)) for e, t in zip(examples, texts, strict=True)]
    prompts = processor(images=[e["image"] for e in examples], text=texts)["input_ids"]
    width = max(len(p) + n for p, n in zip(prompts, lengths, strict=True))
    pad = processor.tokenizer.pad_token_id
    for row, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        size = len(prompt) + n
        assert right["attention_mask"][row].tolist() == [1] * size + [0] * (width - size)
        assert left["attention_mask"][row].tolist() == [0] * (width - size) + [1] * size
        assert right["input_ids"][row, size:].eq(pad).all() and right["labels"][row, size:].eq(IGNORE_INDEX).all()
        assert torch.equal(left["input_ids"][row, width - size :], right["input_ids"][row, :size])
        assert torch.equal(left["labels"][row, width - size :], right["labels"][row, :size])
    texts = [format_prompt(processor, e["question"], None) for e in examples]
    reference = processor(images=[e["image"] for e in examples], text=texts, return_tensors="pt", padding=True)
    assert torch.equal(right["pixel_values"], reference["pixel_values"])
    if name == "qwen2-vl":
        assert torch.equal(right["image_grid_thw"], reference["image_grid_thw"])
        image_token = processor.image_token_id
        assert torch.equal(right["mm_token_type_ids"], (right["input_ids"] == image_token).long())
        assert torch.equal(left["mm_token_type_ids"], (left["input_ids"] == image_token).long())
    else:
        assert set(right) == {"input_ids", "attention_mask", "labels", "pixel_values"}


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_the_model_trains_on_the_batch(name):
    """The batch is what the model's forward takes: its own loss equals CE over the answer tokens."""
    model = tiny_model(name)
    batch = GraceDataCollator(tiny_processor(name))(tiny_vqa(2, image_size=IMAGE_SIZE[name]))
    out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_answers_column_max_length_and_errors():
    processor = tiny_processor("llava")
    example = {**tiny_vqa(1)[0]}
    answer = example.pop("answer")
    via_list = GraceDataCollator(processor)([{**example, "answers": [answer, "other"]}])
    direct = GraceDataCollator(processor)([{**example, "answer": answer}])
    assert torch.equal(via_list["labels"], direct["labels"])
    prompt_length = int((direct["labels"][0] == IGNORE_INDEX).sum())
    cut = GraceDataCollator(processor, max_length=prompt_length + 1)([{**example, "answer": "1 2 3 4 5 6"}])
    assert cut["input_ids"].shape[1] == prompt_length + 1 and int((cut["labels"] != IGNORE_INDEX).sum()) == 1
    with pytest.raises(ValueError, match="no answer"):
        GraceDataCollator(processor)([example])
    with pytest.raises(ValueError, match="tokenizer"):
        GraceDataCollator(processor.tokenizer)


def test_pad_tokens_pads_each_key_with_its_own_value():
    examples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "mm_token_type_ids": [1, 0, 0]},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "mm_token_type_ids": [1]},
    ]
    right = pad_tokens(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["mm_token_type_ids"].tolist() == [[1, 0, 0], [1, 0, 0]]
    left = pad_tokens(examples, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist()[1] == [0, 0, 1]
    with pytest.raises(ValueError, match="padding_side"):
        pad_tokens(examples, 0, padding_side="middle")


# ------------------------------------------------------------------------------------------- the demo's batches
def legacy_demo_batch(rows, processor) -> dict[str, torch.Tensor]:
    """The demo's hand-written encoding and collation before GraceDataCollator (commit de68aab), kept verbatim as
    the reference: image tokens spelled out, prompt and answer tokenised apart, right padding, stacked images."""
    from grace_quant.demo.models import VISUAL_TOKENS, prompt

    tokenizer = processor.tokenizer
    pixel_values = processor.image_processor([r["image"] for r in rows], return_tensors="pt")["pixel_values"]
    examples = []
    for i, row in enumerate(rows):
        prompt_ids = tokenizer(processor.image_token * VISUAL_TOKENS + prompt(row["question"]),
                               add_special_tokens=False)["input_ids"]  # fmt: skip
        answer_ids = tokenizer(" " + row["answers"][0], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        ids = torch.tensor(prompt_ids + answer_ids)
        labels = ids.clone()
        labels[: len(prompt_ids)] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels, "pixel_values": pixel_values[i]})
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), tokenizer.pad_token_id),
        "labels": torch.full((len(examples), width), IGNORE_INDEX),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n], batch["labels"][row, :n], batch["attention_mask"][row, :n] = (
            e["input_ids"], e["labels"], 1,
        )  # fmt: skip
    batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples])
    return batch


def test_demo_batches_are_those_of_its_former_hand_written_collation():
    from grace_quant.demo.data import build_dataset
    from grace_quant.demo.models import build_processor, prompt, train_tokenizer
    from grace_quant.demo.train import collator, training_rows

    data = build_dataset(64, 4, seed=0)
    texts = [prompt(q) + " " + a[0] for q, a in zip(data["train"]["question"], data["train"]["answers"], strict=True)]
    processor = build_processor(train_tokenizer(texts))
    rows = training_rows(data["train"])
    collate = collator(processor)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):  # random batches of 16, as the Trainer's sampler draws them
        batch_rows = [rows[i] for i in torch.randperm(len(rows), generator=generator)[:16].tolist()]
        new, old = collate(batch_rows), legacy_demo_batch(batch_rows, processor)
        assert set(new) == set(old)
        for key in old:
            assert new[key].dtype == old[key].dtype and torch.equal(new[key], old[key]), key
