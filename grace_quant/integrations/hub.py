"""Publishing GRACE checkpoints on the Hugging Face Hub: a model card, and a push that fails clearly.

``push_to_hub`` saves into a temporary folder (``save_pretrained`` + ``README.md``) and uploads it with
``huggingface_hub`` (``create_repo(exist_ok=True)`` + ``upload_folder``). Offline mode, missing rights and
an unreachable network come back as one :class:`GraceHubError` that names the cause and the fix; the token
never appears in messages or logs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .checkpoint_files import grace_settings, read_config

INSTALL_LINE = "pip install grace-quant"


class GraceHubError(RuntimeError):
    """A push to the Hub failed; the message says why and what to do."""


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # a JSON string or number is valid YAML and needs no escaping rules of our own


def _table(rows: Mapping[str, Any], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return lines


def _card(
    config: Mapping[str, Any],
    *,
    base_model: str | None,
    teacher: str | None,
    training_settings: Mapping[str, Any] | None,
    eval_results: Mapping[str, Any] | None,
    repo_id: str | None,
) -> str:
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "grace":
        raise ValueError("grace_model_card needs a GRACE model (config.quantization_config.quant_method == 'grace')")
    bits, group_size = qconfig.get("bits", 4), qconfig.get("group_size")
    skip = qconfig.get("modules_to_not_convert") or []
    architecture = (config.get("architectures") or [config.get("model_type", "model")])[0]
    tags = ["grace", f"int{bits}", "quantized", f"w{bits}a16", "vision-language", "image-text-to-text"]
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags:"]
    front += [f"- {_yaml_value(tag)}" for tag in tags]
    if base_model:
        front += [f"base_model: {_yaml_value(base_model)}", "base_model_relation: quantized"]
    front.append("---")

    name = repo_id or "path/to/this/checkpoint"
    body = [
        "",
        f"# {repo_id.split('/')[-1] if repo_id else architecture} (GRACE INT{bits})",
        "",
        f"A {architecture} vision-language model with INT{bits} weights (activations stay in 16/32-bit floats), "
        "produced with [GRACE](https://pypi.org/project/grace-quant/) quantization-aware distillation"
        + (f" from `{base_model}`" if base_model else "")
        + (f" with `{teacher}` as the teacher" if teacher else "")
        + ". The weights are stored in the packed GRACE format (symmetric per-group codes + scales).",
        "",
        "## Quantization",
        "",
        *_table(
            {
                "bits": bits,
                "group size": group_size,
                "symmetric": qconfig.get("sym", True),
                "format version": qconfig.get("format_version", 1),
                "kept in full precision": ", ".join(f"`{s}`" for s in skip) or "nothing",
            },
            ("setting", "value"),
        ),
    ]
    if training_settings:
        body += ["", "## Training (GRACE method settings)", "", *_table(training_settings, ("knob", "value"))]
    if eval_results:
        body += ["", "## Evaluation", "", *_table(eval_results, ("benchmark", "result"))]
    body += [
        "",
        "## Use",
        "",
        "```bash",
        INSTALL_LINE,
        "```",
        "",
        "```python",
        "import grace_quant",
        f'model = grace_quant.AutoModelForVision2Seq.from_pretrained("{name}")',
        "```",
        "",
        "`import grace_quant` registers the `grace` quantization method with transformers; without it the "
        "checkpoint does not load.",
        "",
    ]
    return "\n".join(front + body)


def grace_model_card(
    model: Any,
    base_model: str | None = None,
    teacher: str | None = None,
    training_settings: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
) -> str:
    """README.md text (YAML front matter + body) describing a GRACE model: settings, results and how to load it.

    ``training_settings``: method knobs, e.g. ``{"final beta": 0.31, "steps": 2000}``; ``eval_results``:
    ``{"benchmark": value}``. ``repo_id`` fills in the loading snippet.
    """
    config = getattr(model, "config", model)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _card(
        config,
        base_model=base_model,
        teacher=teacher,
        training_settings=training_settings,
        eval_results=eval_results,
        repo_id=repo_id,
    )


#: a sentence of the placeholder card transformers' ``push_to_hub`` writes when the repository has none
GENERATED_CARD_MARK = "This model card has been automatically generated"


def _upload_with_grace_card(model: Any, working_dir: str | os.PathLike, repo_id: str, *args: Any, **kwargs: Any):
    """transformers' ``_upload_modified_files``, after replacing its placeholder README.md by the GRACE card (a
    card the repository already had is kept)."""
    readme = Path(working_dir, "README.md")
    if not readme.is_file() or GENERATED_CARD_MARK in readme.read_text(errors="replace"):
        readme.write_text(grace_model_card(model, repo_id=repo_id))
    return type(model)._upload_modified_files(model, working_dir, repo_id, *args, **kwargs)


def publish_grace_card(model: Any) -> None:
    """Make transformers' own ``model.push_to_hub(...)`` upload the GRACE model card (which says
    ``import grace_quant``, without which the checkpoint does not load) instead of its generic placeholder.

    Called for every GRACE model (quantizer after loading, ``quantize_model``); the hook lives on the instance, so
    other models are untouched."""
    if hasattr(type(model), "_upload_modified_files"):
        model._upload_modified_files = types.MethodType(_upload_with_grace_card, model)


def _is_network_error(exc: BaseException) -> bool:
    """httpx/httpx2 transport errors (not OSErrors in huggingface_hub 2.x) and socket-level errors."""
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] in ("httpx", "httpx2") and cls.__name__ in ("RequestError", "TransportError"):
            return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def _hub_error(exc: BaseException, repo_id: str, token: str | None) -> GraceHubError | None:
    """Translate a huggingface_hub failure into a GraceHubError (``None`` for errors that are not the Hub's)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        message = (
            f"cannot push {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1). "
            "Unset HF_HUB_OFFLINE (or set it to 0) to upload."
        )
    elif isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            message = (
                f"not authorised to write to {repo_id} on {constants.ENDPOINT} (HTTP {status}): log in with "
                "`hf auth login` or pass a token with write access (token=... / --token-env)."
            )
        else:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"the Hub refused the upload to {repo_id} (HTTP {status}): {first_line}"
    elif _is_network_error(exc):
        message = (
            f"cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}): check the network connection "
            "and HF_ENDPOINT, then retry."
        )
    else:
        return None
    if token:
        message = message.replace(token, "***")
    return GraceHubError(message)


def _create_repo(repo_id: str, token: str | None, private: bool | None) -> str:
    from huggingface_hub import HfApi

    return HfApi().create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model").repo_id


def _upload_folder(folder: Path, repo_id: str, token: str | None, commit_message: str | None) -> str:
    from huggingface_hub import HfApi

    info = HfApi().upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        token=token,
        commit_message=commit_message or "Upload GRACE INT4 checkpoint",
    )
    return str(getattr(info, "commit_url", info))


def _guarded(action: Callable[[], str], repo_id: str, token: str | None) -> str:
    """Run ``action``, turning Hub failures into GraceHubError (other errors pass unchanged)."""
    try:
        return action()
    except Exception as exc:
        error = _hub_error(exc, repo_id, token)
        if error is None:
            raise
        raise error from exc


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    **model_card_kwargs: Any,
) -> str:
    """Save a GRACE model (+ a model card as README.md) into a temp folder and upload it to ``repo_id``.

    ``model_card_kwargs`` go to :func:`grace_model_card` (``base_model``, ``teacher``, ``training_settings``,
    ``eval_results``). Returns the commit URL. Raises :class:`GraceHubError` on offline mode, 401/403 or no network.
    """
    card = grace_model_card(model, repo_id=repo_id, **model_card_kwargs)

    def action() -> str:
        # The repo is created first: offline mode, missing rights or no network fail before anything is saved.
        repo = _create_repo(repo_id, token, private)
        with tempfile.TemporaryDirectory(prefix="grace-push-") as tmp:
            model.save_pretrained(tmp)
            Path(tmp, "README.md").write_text(card)
            return _upload_folder(Path(tmp), repo, token, commit_message)

    return _guarded(action, repo_id, token)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    **model_card_kwargs: Any,
) -> str:
    """Upload a saved GRACE checkpoint folder as is, adding a generated README.md when it has none.

    The folder is never modified: the upload is staged in a temp folder of symlinks (copies where links fail).
    """
    folder = Path(folder)
    grace_settings(folder)  # refuse anything but a packed GRACE checkpoint before touching the network
    card = None
    if not (folder / "README.md").is_file():
        card = grace_model_card(read_config(folder), repo_id=repo_id, **model_card_kwargs)

    def action() -> str:
        repo = _create_repo(repo_id, token, private)
        with tempfile.TemporaryDirectory(prefix="grace-push-") as tmp:
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if path.is_dir() or any(part.startswith(".") for part in rel.parts):
                    continue
                target = Path(tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.symlink(path.absolute(), target)
                except OSError:
                    shutil.copy2(path, target)
            if card is not None:
                Path(tmp, "README.md").write_text(card)
            return _upload_folder(Path(tmp), repo, token, commit_message)

    return _guarded(action, repo_id, token)


__all__ = ["GraceHubError", "grace_model_card", "publish_grace_card", "push_folder_to_hub", "push_to_hub"]
