"""lmms-eval bridge: evaluate a GRACE checkpoint (or any image-text-to-text model folder) on lmms-eval's
benchmarks (MME, MMBench, ScienceQA, ...) and on local tasks written in its task format.

:class:`GraceLMM` is an lmms-eval model (``lmms`` subclass, "simple" interface): it loads the folder with
``AutoModelForImageTextToText`` + ``AutoProcessor`` (GRACE INT4 layers included: importing
``grace_quant.integrations`` registers them), builds prompts the way ``grace-quant eval`` does (:func:`grace_quant.evaluation.format_prompt`) and
answers ``generate_until`` and ``loglikelihood`` requests. It is registered in lmms-eval's model registry as
``grace`` through the ``lmms_eval.models`` entry point (``pyproject.toml``), so lmms-eval's own command line
takes ``--model grace --model_args pretrained=DIR``. :func:`evaluate_with_lmms` runs lmms-eval's evaluator
in-process for ``grace-quant eval DIR --lmms-tasks ...``. Needs ``pip install 'grace-quant[lmms]'``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from grace_quant.evaluation import format_prompt

INSTALL_HINT = "pip install 'grace-quant[lmms]'"

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ModuleNotFoundError as exc:  # only lmms-eval itself missing gets the hint; a broken install shows as is
    if (exc.name or "").split(".")[0] != "lmms_eval":
        raise
    raise ModuleNotFoundError(f"evaluating with lmms-eval needs it installed: {INSTALL_HINT}", name=exc.name) from exc

MODEL_NAME = "grace"
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lmms_tasks")
"""Local tasks shipped with grace-quant (always on lmms-eval's task path in :func:`evaluate_with_lmms`)."""
SAMPLE_TASK = "grace_sample_vqa"
GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams")
"""The generation settings of a task that reach ``generate``; others (model-specific ones) are ignored."""


def lmms_manifests():
    """lmms-eval's entry point (group ``lmms_eval.models``): the model name ``grace`` -> :class:`GraceLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.GraceLMM")]


def _check_torchvision() -> None:
    """transformers imports torchvision whenever it is installed; a torchvision built for another torch (PyPI's
    beside a CPU-only torch wheel, say) then breaks every processor with an unrelated-looking error."""
    from importlib.util import find_spec

    if find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # RuntimeError "operator torchvision::nms does not exist", ImportError, ...
        raise ImportError(
            f"torchvision does not import beside torch {torch.__version__} ({str(exc).splitlines()[0]}); install the "
            "torchvision build made for this torch (a matching pair, e.g. from the same index), or uninstall it"
        ) from exc


class GraceLMM(lmms):
    """An lmms-eval model around an image-text-to-text folder (``--model grace --model_args pretrained=DIR``).

    ``pretrained``: the model folder (config, weights, processor files). ``device``: default ``cuda`` when
    available, else ``cpu``. ``dtype``: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
    ``batch_size``: requests per ``generate`` call. ``template``: prompt template with ``{question}`` and
    ``{image}``, as in ``grace-quant eval --template`` (default: the processor's chat template, else
    ``{image}Q: {question} A:``). Remote code is never run unless ``trust_remote_code=True``.
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        template: str | None = None,
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,  # passed by lmms-eval's evaluator; no automatic batch sizing here
    ) -> None:
        super().__init__()
        if not os.path.isfile(os.path.join(pretrained, "config.json")):
            raise ValueError(f"{pretrained} is not a model folder (expected config.json inside)")
        _check_torchvision()
        from transformers import AutoModelForImageTextToText, AutoProcessor  # GRACE registered: package __init__

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}: use auto, float32, bfloat16 or float16")
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=dtype if dtype == "auto" else getattr(torch, dtype), device_map=str(self._device),
            trust_remote_code=trust_remote_code,
        ).eval()  # fmt: skip
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size)
        self.template = template

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------------ inputs
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _visuals(doc_to_visual, doc: dict) -> list:
        """The document's images (lmms-eval gives a list, possibly nested or empty)."""
        found = doc_to_visual(doc) if doc_to_visual is not None else []
        flat = []
        for item in found or []:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        if any(isinstance(item, str) for item in flat):
            raise NotImplementedError("the grace model takes images; video and audio tasks are not supported")
        return flat

    def _encode(self, prompts: Sequence[str], images: Sequence[list]) -> dict[str, torch.Tensor]:
        """Left-padded processor outputs on the model's device (pixel values in the model's dtype)."""
        with_images = [image for row in images for image in row]
        if with_images and any(not row for row in images):
            raise ValueError("a batch mixes documents with and without images; use batch_size=1 for this task")
        kwargs = {"images": [list(row) for row in images]} if with_images else {}
        batch = self.processor(text=list(prompts), return_tensors="pt", padding=True, **kwargs)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    # ---------------------------------------------------------------------------------------------- generate
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request (context, generation settings, images) by ``generate``, cut at its stop strings."""
        answers: list[str | None] = [None] * len(requests)
        for indices, settings in self._batches(requests):
            rows = [requests[i].args for i in indices]
            docs = [self._doc(task, split, doc_id) for _, _, _, doc_id, task, split in rows]
            images = [self._visuals(row[2], doc) for row, doc in zip(rows, docs, strict=True)]
            prompts = [
                format_prompt(self.processor, row[0], self.template, images=len(row_images))
                for row, row_images in zip(rows, images, strict=True)
            ]
            for index, text in zip(indices, self._generate(prompts, images, settings), strict=True):
                answers[index] = text
        return answers

    def _batches(self, requests: list[Instance]) -> Iterator[tuple[list[int], dict]]:
        """Request indices in batches of ``batch_size`` that share a task and generation settings."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            _, settings, _, _, task, _ = request.args
            groups.setdefault(task + json.dumps(settings, sort_keys=True, default=str), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size], dict(requests[indices[0]].args[1])

    @torch.no_grad()
    def _generate(self, prompts: list[str], images: list[list], settings: dict[str, Any]) -> list[str]:
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        kwargs = {key: settings[key] for key in GENERATE_KEYS if settings.get(key) is not None}
        kwargs.setdefault("max_new_tokens", 128)
        kwargs["do_sample"] = bool(kwargs.get("do_sample")) or float(kwargs.get("temperature", 0)) > 0
        if not kwargs["do_sample"]:
            kwargs.pop("temperature", None), kwargs.pop("top_p", None)
        batch = self._encode(prompts, images)
        out = self.model.generate(**batch, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [cut_at_stop(text, until).strip() for text in texts]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the grace model answers generate_until and loglikelihood (multiple-choice) tasks; multi-round "
            "tasks are not supported"
        )

    # ------------------------------------------------------------------------------------------ loglikelihood
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context and images, and whether greedy decoding
        would produce it. Continuation tokens are encoded apart from the prompt and appended, so the prompt's
        tokens are those generation sees."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            images = self._visuals(doc_to_visual, doc)
            prompt = format_prompt(self.processor, context, self.template, images=len(images))
            results.append(self._continuation_logprob(prompt, images, continuation))
        return results

    def _continuation_logprob(self, prompt: str, images: list, continuation: str) -> tuple[float, bool]:
        batch = self._encode([prompt], [images])
        tokens = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        tokens = tokens.to(self.device)
        if tokens.numel() == 0:
            return 0.0, True
        batch = append_tokens(batch, tokens)
        logits = self.model(**batch).logits[0, -tokens.shape[1] - 1 : -1].float()
        logprobs = logits.log_softmax(-1).gather(-1, tokens[0, :, None])
        return float(logprobs.sum()), bool((logits.argmax(-1) == tokens[0]).all())


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def append_tokens(batch: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """One encoded prompt (batch of 1) followed by ``tokens`` (1 x n): the attention mask grows with ones, other
    per-token rows (token type ids, Qwen2-VL's ``mm_token_type_ids``) with zeros, as for text tokens."""
    length = batch["input_ids"].shape[1]
    grown = dict(batch)
    for key, value in batch.items():
        if key == "input_ids":
            grown[key] = torch.cat([value, tokens.to(value.dtype)], dim=1)
        elif value.dim() == 2 and value.shape == (1, length):
            fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            grown[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    return grown


def evaluate_with_lmms(
    model_dir: str,
    tasks: Sequence[str],
    *,
    include_paths: Sequence[str] = (),
    limit: int | None = None,
    batch_size: int = 1,
    template: str | None = None,
    device: str | None = None,
    verbosity: str = "WARNING",
) -> dict[str, Any]:
    """Run lmms-eval's evaluator in this process on ``tasks`` with :class:`GraceLMM` over ``model_dir``.

    ``include_paths``: folders of local task YAMLs, searched besides lmms-eval's own tasks and the ones shipped
    with grace-quant (:data:`TASKS_DIR`). Returns lmms-eval's results dictionary (``results``, ``samples``,
    ``configs``, ...). Benchmarks on the Hub need network (or a filled datasets cache); local tasks do not.
    """
    import sys

    from loguru import logger

    logger.remove()  # lmms-eval logs through loguru; keep its warnings only, on stderr
    logger.add(sys.stderr, level=verbosity)
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    for path in include_paths:
        if not os.path.isdir(path):
            raise ValueError(f"--lmms-include {path} is not a folder of lmms-eval task YAMLs")
    manager = TaskManager(verbosity, include_path=[TASKS_DIR, *include_paths])
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lmms-eval task(s) {unknown}; `python -m lmms_eval tasks list` shows lmms-eval's tasks, "
            f"--lmms-include adds a folder of your own (shipped: {SAMPLE_TASK})"
        )
    model = GraceLMM(model_dir, device=device, batch_size=batch_size, template=template)
    return simple_evaluate(
        model=model, tasks=list(tasks), limit=limit, batch_size=batch_size, task_manager=manager,
        log_samples=True, verbosity=verbosity, bootstrap_iters=0,
    )  # fmt: skip


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lmms-eval's results (the ``,none`` filter suffix dropped; stderr and
    alias entries left out)."""
    table = {}
    for task, values in results.get("results", {}).items():
        table[task] = {
            key.split(",")[0]: value
            for key, value in values.items()
            if key != "alias" and "_stderr" not in key and isinstance(value, (int, float))
        }
    return table
