"""Folder-level I/O shared by the format converters and the CLI: read a checkpoint folder, rewrite its
safetensors shards one at a time, and write output folders atomically (temp folder next to OUT, then rename).

Converters work on files rather than on a loaded model so that tensor names stay in the on-disk layout that
transformers wrote (e.g. LLaVA's ``language_model.model.layers...``) and only one shard is in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from grace_quant.checkpoint import QAT_MASTER, file_kind
from grace_quant.config import FORMAT_VERSION, check_format_version
from grace_quant.paths import OutputPathError, make_temp_dir
from grace_quant.paths import check_output as check_output_path

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A user-facing problem with an input or output folder (the CLI prints it as one line)."""


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder, with errors that say what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (expected a model folder with config.json)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def quantization_config(config: dict[str, Any], method: str, folder: str | os.PathLike) -> dict[str, Any]:
    """``config["quantization_config"]`` when it has ``quant_method == method``; else a clear error."""
    qconfig = config.get("quantization_config") or {}
    found = qconfig.get("quant_method")
    if found != method:
        what = f"quant_method={found!r}" if found else "no quantization_config"
        article = "an" if method[0] in "aeiou" else "a"
        raise CheckpointError(f"{folder} is not {article} {method.upper()} checkpoint ({what} in its config.json)")
    return qconfig


def grace_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The GRACE ``quantization_config`` of a packed GRACE checkpoint folder (QAT-master ones are refused)."""
    qconfig = quantization_config(read_config(folder), "grace", folder)
    try:
        check_format_version(int(qconfig.get("format_version", FORMAT_VERSION)), str(folder))
        kinds = [file_kind(path) for path in weight_files(folder)]
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if QAT_MASTER in kinds:
        raise CheckpointError(
            f"{folder} is a GRACE training checkpoint (qat-master: full-precision master weights); load it "
            "with from_pretrained and save_pretrained it to get the packed INT4 checkpoint first"
        )
    return qconfig


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a folder (single file or indexed shards), each checked to be readable."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{folder / INDEX_FILE} is not a valid safetensors index ({type(exc).__name__}: {exc}); "
                "re-download or re-save the checkpoint"
            ) from None
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{folder} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)"
        )
    for path in files:
        check_readable(path)
    return files


def check_readable(path: Path) -> None:
    """Refuse a missing, truncated or header-corrupted safetensors file, naming it (reads the header only)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (listed in {INDEX_FILE}); re-download or re-save the checkpoint")
    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_one_line(exc)}): it is truncated or corrupted; "
            "re-download or re-save the checkpoint"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one safetensors file."""
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def layer_prefixes(tensors: dict[str, torch.Tensor], marker: str) -> list[str]:
    """Prefixes ``p`` (ending with a dot) such that ``p + marker`` is a key, in key order."""
    return [key[: -len(marker)] for key in sorted(tensors) if key.endswith("." + marker)]


#: ``convert_layer(prefix, tensors)`` pops one quantized layer's tensors (``prefix + "weight"``...) from the shard
#: dict and returns the tensors to write for it instead (names with the same prefix).
LayerConverter = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def convert_shards(
    src: Path, dst: Path, marker: str, convert_layer: LayerConverter, metadata: dict[str, str], description: str
) -> int:
    """Rewrite every shard of ``src`` into ``dst``: each layer owning a ``prefix + marker`` tensor (``marker`` is a
    tensor name such as ``"scales"``) goes through
    ``convert_layer``, other tensors are copied. Keeps the sharding and the index; returns the layer count."""
    files = weight_files(src)
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as handle:
            total += sum(key.endswith("." + marker) for key in handle.keys())
    renamed: dict[str, str] = {}
    nbytes = 0
    with tqdm(total=total, desc=description, unit="layer") as bar:
        for path in files:
            tensors, _ = load_shard(path)
            converted: dict[str, torch.Tensor] = {}
            for prefix in layer_prefixes(tensors, marker):
                converted.update(convert_layer(prefix, tensors))
                bar.update()
            converted.update(tensors)  # what convert_layer did not consume, unchanged
            save_file({k: v.contiguous() for k, v in converted.items()}, str(dst / path.name), metadata=metadata)
            renamed.update(dict.fromkeys(converted, path.name))
            nbytes += sum(t.numel() * t.element_size() for t in converted.values())
    if (src / INDEX_FILE).is_file():
        index = json.loads((src / INDEX_FILE).read_text())
        index["weight_map"] = dict(sorted(renamed.items()))
        index.setdefault("metadata", {})["total_size"] = nbytes
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy what is not config or weights (tokenizer, processor, generation config, chat template...) unless
    ``dst`` already has it."""
    for path in src.iterdir():
        if path.name in (CONFIG_NAME, INDEX_FILE, "README.md") or path.suffix in (".safetensors", ".bin"):
            continue
        if path.name.startswith(".") or (dst / path.name).exists():
            continue
        if path.is_dir():
            shutil.copytree(path, dst / path.name)
        else:
            shutil.copy2(path, dst / path.name)


def write_config(dst: Path, config: dict[str, Any]) -> None:
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_output(out: str | os.PathLike, overwrite: bool, sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse an existing OUT unless ``overwrite``, an OUT equal to, inside or around a source, and a missing
    parent (the one rule: :func:`grace_quant.paths.check_output`)."""
    try:
        return check_output_path(out, sources=sources, overwrite=overwrite, kind="folder")
    except OutputPathError as exc:
        raise CheckpointError(str(exc)) from None


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike, overwrite: bool = False, sources: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield an empty temp folder next to ``out``; on success it replaces ``out``, on error (Ctrl-C included) it is
    deleted. Nothing half-written ever appears under the name ``out``; the folder gets the umask's permissions.
    """
    out = check_output(out, overwrite, sources).absolute()
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():  # overwrite: move the old folder aside first so that the rename below cannot clash
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def grace_folder(model_or_dir: Any) -> Iterator[Path]:
    """A packed GRACE checkpoint folder for a folder (as is) or an in-memory GRACE model (saved to a temp folder)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        yield Path(model_or_dir)
        return
    config = getattr(getattr(model_or_dir, "config", None), "quantization_config", None)
    if getattr(config, "quant_method", None) != "grace":
        raise CheckpointError("expected a GRACE model (loaded with quantization_config=GraceConfig(...)) or a folder")
    with tempfile.TemporaryDirectory(prefix="grace-export-") as tmp:
        model_or_dir.save_pretrained(tmp)
        yield Path(tmp)


def quantize_folder(
    src: str | os.PathLike, out: str | os.PathLike, config: Any, *, overwrite: bool = False, **load_kwargs: Any
) -> Path:
    """Full-precision model folder -> packed GRACE INT4 folder (round-to-nearest on the MSE grid, no training).

    ``config`` is a :class:`~grace_quant.GraceConfig` (its ``mode`` is forced to ``"packed"``); ``load_kwargs`` go
    to ``from_pretrained`` (e.g. ``dtype``). Tokenizer/processor files are copied along.
    """
    import copy

    import transformers

    src = Path(src)
    found = (read_config(src).get("quantization_config") or {}).get("quant_method")
    if found:
        raise CheckpointError(
            f"{src} is already quantized (quant_method={found!r}); quantize needs a full-precision model"
        )
    check_output(out, overwrite, sources=(src,))  # fail before the (long) load
    weight_files(src)  # a truncated or corrupted shard: one clear line, before the load
    architectures = read_config(src).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModelForImageTextToText
    config = copy.deepcopy(config)
    config.mode = "packed"
    model = model_class.from_pretrained(src, quantization_config=config, **load_kwargs)
    with atomic_output_dir(out, overwrite, sources=(src,)) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(src, tmp)
    return Path(out)
