"""Tokenizer, processor and tiny LLaVA models for the demo, plus the vision-tower pretraining on digits.

No pretrained weights exist offline: a byte-level BPE is trained on the task's text, a CLIP tower is pretrained
to recognise the four digits of a grid, and teacher and student (LLaVA-1.5 layout: CLIP tower, MLP projector,
Llama decoder) start from that tower. The teacher's language model is wider and deeper than the student's
(``DemoSettings.teacher_lm`` / ``student_lm``).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .data import IMAGE_SIZE

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
PATCH = 14
VISUAL_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16, the CLS token is dropped
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
# the Llama language models (sizes in DemoSettings): the MLP is 3x wide, heads are 16-d (at least 4 heads)


def language_config(hidden: int, layers: int) -> dict:
    heads = max(4, hidden // 16)
    return dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads)


def prompt(question: str) -> str:
    """The text after the image: the model answers after ``A:``."""
    return f"Q: {question} A:"


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the task's questions and answers (seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
    )  # fmt: skip
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """A real ``LlavaProcessor`` (saved beside every model, so ``grace-quant eval`` needs nothing else)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )  # fmt: skip


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=VISION["hidden_size"])


def llava_config(size: tuple[int, int], tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """Teacher or student configuration of LM ``size`` (hidden, layers); both share the tokenizer (GRACE
    distils token distributions)."""
    language = language_config(*size)
    text = LlamaConfig(
        **language, num_key_value_heads=language["num_attention_heads"], vocab_size=len(tokenizer),
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision_config(), text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip


def build_llava(
    role: str, tokenizer, vision_state: dict[str, torch.Tensor], seed: int
) -> LlavaForConditionalGeneration:
    """A fresh teacher or student whose vision tower holds the pretrained digit-recognition weights."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(role, tokenizer))
    model.model.vision_tower.load_state_dict(vision_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class DigitReader(nn.Module):
    """CLIP tower + one linear head per grid position: pretraining target for the vision tower."""

    def __init__(self):
        super().__init__()
        self.tower = CLIPVisionModel(vision_config())
        self.head = nn.Linear(VISUAL_TOKENS * VISION["hidden_size"], 4 * 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS, as LLaVA does
        return self.head(patches.flatten(1)).view(-1, 4, 10)


def pretrain_vision(
    pixel_values: torch.Tensor, digits: torch.Tensor, steps: int, seed: int, batch_size: int = 64
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the tower to read the four digits of each grid; returns its state dict and the loss curve."""
    torch.manual_seed(seed)
    reader = DigitReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="pretrain vision tower", leave=False):
        index = torch.randint(0, len(pixel_values), (batch_size,), generator=generator)
        logits = reader(pixel_values[index])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 10), digits[index].reshape(-1))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return reader.tower.state_dict(), losses
