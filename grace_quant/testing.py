"""Tiny random vision-language models and inputs, built from configs (nothing is downloaded).

Used by the tests, examples and benchmarks: LLaVA (tied or untied embeddings), Qwen2-VL and Qwen2.5-VL with
the real architectures at toy widths, and processors for them (a byte-level BPE trained on a few sentences, the
model family's image processor and a chat template shaped like the real one).
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from grace_quant.labels import IGNORE_INDEX
from grace_quant.losses import image_token_id

TINY_MODELS = ("llava", "llava-untied", "qwen2-vl", "qwen2.5-vl")
VOCAB = 320
#: text the tiny tokenizers are trained on (their merges; any text still tokenises, byte by byte)
CORPUS = (
    "What is in the picture? A cat sitting on a red mat. Q: A: USER: ASSISTANT: yes no",
    "How many digits are greater than four? 3. Read the four digits: 1 2 3 4. The largest digit is 9.",
    "What colour is the square in the top left corner? blue green red white black",
)
#: ids 0-2 are the configs' pad / bos / eos ids; the image ids are the configs' (VOCAB - 1 ...)
LLAVA_TOKENS = {"front": ["<pad>", "<s>", "</s>", "<unk>"], "back": ["<image>"]}
QWEN_TOKENS = {
    "front": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_end|>"],
    "back": ["<|vision_start|>", "<|video_pad|>", "<|image_pad|>"],  # VOCAB - 3, - 2, - 1
}
LLAVA_CHAT_TEMPLATE = (  # llava-1.5-hf's layout: "USER: <image>\n{question} ASSISTANT:"
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_CHAT_TEMPLATE = (  # Qwen2-VL's layout, without the system turn
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _text(hidden: int, layers: int, tie: bool) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def tiny_llava_config(hidden: int = 64, layers: int = 2, tie: bool = True) -> LlavaConfig:
    """LLaVA-1.5 layout: CLIP tower (28x28 images, patch 14 -> 4 tokens), 2-layer MLP projector, Llama."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=32,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**_text(hidden, layers, tie)),
        image_token_index=VOCAB - 1, vision_feature_layer=-1, tie_word_embeddings=tie,
    )  # fmt: skip


def tiny_qwen2_vl_config(hidden: int = 64, layers: int = 2, version: str = "2") -> Qwen2VLConfig:
    """Qwen2-VL / Qwen2.5-VL layout at toy width (patch 14, merge 2, temporal patch 2)."""
    text = _text(hidden, layers, tie=False)
    ids = dict(image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3)
    half = hidden // 4 // 2  # head_dim / 2 with 4 heads: the rotary sections (t, h, w) must sum to it
    rope = {"rope_type": "default", "mrope_section": [half // 4, half // 4, half - 2 * (half // 4)], "rope_theta": 1e4}
    if version == "2.5":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        )  # fmt: skip
        return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids)
    vision = dict(
        depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    return Qwen2VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids)


def tiny_model(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64, layers: int = 2
) -> PreTrainedModel:
    """A randomly initialised tiny model: one of ``TINY_MODELS`` (``hidden``/``layers`` size its language model)."""
    torch.manual_seed(seed)
    if name in ("llava", "llava-untied"):
        model = LlavaForConditionalGeneration(tiny_llava_config(hidden, layers, tie=name == "llava"))
    elif name == "qwen2-vl":
        model = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config(hidden, layers, version="2"))
    elif name == "qwen2.5-vl":
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_vl_config(hidden, layers, version="2.5"))
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    return model.to(dtype).eval()


def tiny_inputs(model: PreTrainedModel, batch: int = 2, text_tokens: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """One image per sample plus random text, in the form the model's forward expects (with labels)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    dtype = model.dtype
    image_token = image_token_id(config)
    if config.model_type == "llava":
        vision = config.vision_config
        image_tokens = (vision.image_size // vision.patch_size) ** 2
        pixel_values = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator).to(dtype)
        extra = {"pixel_values": pixel_values}
    else:
        vision = config.vision_config
        grid = (1, 4, 4)  # t, h, w in patches -> h*w/merge^2 = 4 tokens per image
        image_tokens = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
        patch_dim = 3 * vision.temporal_patch_size * vision.patch_size**2
        pixel_values = torch.randn(batch * grid[0] * grid[1] * grid[2], patch_dim, generator=generator).to(dtype)
        extra = {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid] * batch)}
    text = torch.randint(0, VOCAB - 8, (batch, text_tokens), generator=generator)
    input_ids = torch.cat([text[:, :1], torch.full((batch, image_tokens), image_token), text[:, 1:]], dim=1)
    labels = input_ids.clone()
    labels[:, : 1 + image_tokens] = IGNORE_INDEX
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, **extra}
    if config.model_type != "llava":
        inputs["mm_token_type_ids"] = (input_ids == image_token).long()
    return inputs


def tiny_dataset(model: PreTrainedModel, size: int = 8, seed: int = 0, with_images: bool = True) -> list[dict]:
    """``size`` single-sample examples (tensors without the batch dimension) for Trainer tests."""
    examples = []
    for index in range(size):
        batch = tiny_inputs(model, batch=1, seed=seed * 100_003 + index)
        example = {k: (v if k in ("pixel_values", "image_grid_thw") else v[0]) for k, v in batch.items()}
        if not with_images:
            keep = example["input_ids"] != image_token_id(model.config)
            example = {k: example[k][keep] for k in ("input_ids", "attention_mask", "labels")}
        examples.append(example)
    return examples


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length examples; Qwen2-VL patches and grids are concatenated along the first dimension."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        batch[key] = torch.cat(values) if key in ("pixel_values", "image_grid_thw") else torch.stack(values)
    return batch


def _tiny_tokenizer(front: list[str], back: list[str], **special: str):
    """A byte-level BPE of exactly ``VOCAB`` tokens: ``front`` first (ids 0...), ``back`` last (ids ... VOCAB-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(back), special_tokens=front, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer)
    fillers = [f"<unused{i}>" for i in range(VOCAB - len(back) - tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens(fillers + back)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **special)


def _image_only_qwen_processor(version: str):
    """Qwen2-VL / Qwen2.5-VL processor without its video processor, which needs torchvision (not a dependency)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    base = Qwen2_5_VLProcessor if version == "2.5" else Qwen2VLProcessor

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


def tiny_processor(name: str, chat_template: bool = True):
    """The processor of ``tiny_model(name)`` (same vocabulary, image token ids and image size), built offline.

    LLaVA: ``LlavaProcessor`` with a CLIP image processor (28x28 -> 4 image tokens). Qwen2-VL / Qwen2.5-VL: the
    family's processor with its image processor (56x56 -> grid (1, 4, 4), 4 tokens; video input unsupported).
    ``chat_template=False`` leaves the template out (prompts then come from a ``template`` argument)."""
    if name in ("llava", "llava-untied"):
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tokenizer = _tiny_tokenizer(**LLAVA_TOKENS, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                    extra_special_tokens={"image_token": "<image>"})  # fmt: skip
        images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(
            image_processor=images, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
            image_token="<image>", num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE if chat_template else None,
        )  # fmt: skip
    if name in ("qwen2-vl", "qwen2.5-vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = _tiny_tokenizer(**QWEN_TOKENS, pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                    eos_token="<|im_end|>")  # fmt: skip
        images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
        processor = _image_only_qwen_processor("2.5" if name == "qwen2.5-vl" else "2")
        return processor(images, tokenizer, chat_template=QWEN_CHAT_TEMPLATE if chat_template else None)
    raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")


def tiny_vqa(size: int = 8, seed: int = 0, image_size: int = 28) -> list[dict]:
    """``size`` image / question / answer examples with random RGB images (for collator and Trainer tests)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    questions = ("What colour is the square?", "How many digits are greater than four?", "Read the four digits.")
    answers = ("blue", "3", "1 2 3 4", "red", "yes", "9")
    examples = []
    for index in range(size):
        pixels = torch.randint(0, 256, (image_size, image_size, 3), generator=generator, dtype=torch.uint8)
        examples.append({
            "image": Image.fromarray(pixels.numpy()), "question": questions[index % len(questions)],
            "answer": answers[int(torch.randint(len(answers), (1,), generator=generator))],
        })  # fmt: skip
    return examples
