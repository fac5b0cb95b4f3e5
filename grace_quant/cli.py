"""The ``grace-quant`` command line (also ``python -m grace_quant``).

One small ``add_<command>(subparsers)`` + ``run_<command>(args)`` pair per subcommand, registered in
:func:`build_parser`; new commands (``demo``, ``eval``...) plug in the same way. User mistakes end with a
one-line message on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 2

DESCRIPTION = """\
Quantize vision-language models to INT4 with GRACE, convert GRACE checkpoints to serving formats, and publish
them on the Hugging Face Hub. Every command reads a model folder (config.json + *.safetensors, as written by
save_pretrained) and writes a new folder; nothing is written under OUT until the command has succeeded."""

EPILOG = """\
examples:
  grace-quant quantize ./llava-1.5-7b ./llava-int4 --group-size 128
  grace-quant export ./llava-int4 ./llava-int4-ct --format compressed-tensors
  grace-quant import-awq ./qwen2-vl-awq ./qwen2-vl-grace
  grace-quant push ./llava-int4 my-org/llava-1.5-7b-grace-int4 --private
  grace-quant ablate --teacher ./llava-13b --student ./llava-7b --dataset ./my_vqa --output ./ablation

run 'grace-quant COMMAND --help' for the details of one command."""


class UserError(Exception):
    """A problem with what the user asked for (printed as one line, exit code 2)."""


EXIT_INTERRUPTED = 130

#: user-error classes by module; a class whose module was never imported cannot have been raised, so the check
#: imports nothing (a Ctrl-C during torch's import must not import torch again to classify itself)
_USER_ERRORS = {
    "grace_quant.integrations.hub": "GraceHubError",
    "safetensors": "SafetensorError",
}


def _is_user_error(exc: BaseException) -> bool:
    """ValueError / NotImplementedError: GraceConfig, layer-selection and path checks (CheckpointError is one);
    OSError: unreadable or full disks; the Hub's and safetensors' errors."""
    if isinstance(exc, (UserError, ValueError, NotImplementedError, OSError)):
        return True
    for module, name in _USER_ERRORS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``grace-quant CMD: error: ... (see 'grace-quant CMD --help')``."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--limit 0`` would otherwise mean "everything", ``-1`` crash later)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def token_counts(text: str) -> list[int]:
    """argparse type: comma-separated positive token counts, e.g. ``1,16,512``."""
    return [positive_int(part) for part in text.split(",") if part.strip()] or [positive_int(text)]


def _check_output(out: str, *sources: str, overwrite: bool = False, kind: str = "folder") -> None:
    """The output-path rule (:func:`grace_quant.paths.check_output`), applied before the slow imports and loads."""
    from grace_quant.paths import check_output

    check_output(out, sources=sources, overwrite=overwrite, kind=kind)


def _command(
    subparsers: argparse._SubParsersAction, name: str, summary: str, description: str, example: str
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")


# ---------------------------------------------------------------------------------------------------- quantize
def add_quantize(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "quantize",
        "full-precision model folder -> packed GRACE INT4 folder (no training)",
        "Read the full-precision model in SRC, quantize its text-decoder linear layers (symmetric per-group\n"
        "codes, scales chosen on GRACE's MSE grid) and write a packed GRACE checkpoint to OUT. Load it with\n"
        "grace_quant.AutoModelForVision2Seq.from_pretrained(OUT). For accuracy, distil with GraceTrainer instead.",
        "grace-quant quantize ./llava-1.5-7b ./llava-int4 --bits 4 --group-size 128",
    )
    parser.add_argument("src", metavar="SRC", help="full-precision model folder (config.json + *.safetensors)")
    parser.add_argument("out", metavar="OUT", help="output folder for the GRACE checkpoint (must not exist)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight (default: 4)")
    parser.add_argument("--group-size", type=int, default=128, help="input features sharing one scale (default: 128)")
    parser.add_argument(
        "--skip",
        metavar="NAME",
        action="append",
        help="keep this module in full precision (repeatable); replaces the default skip list (vision tower, "
        "projector, embeddings, lm_head), so list those too if you want them kept",
    )
    parser.add_argument("--quantize-all", action="store_true", help="no skip list at all (except --skip names)")
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="quantize weights holding NaN/inf with those values set to 0, instead of refusing the layer",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float16", "bfloat16", "float32"),
        default="auto",
        help="dtype to load and save in (default: the checkpoint's)",
    )
    _add_overwrite(parser)
    parser.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    _check_output(args.out, args.src, overwrite=args.overwrite)
    import torch

    from grace_quant.config import GraceConfig
    from grace_quant.integrations.checkpoint_files import quantize_folder

    skip = args.skip if args.skip or not args.quantize_all else []
    config = GraceConfig(
        bits=args.bits, group_size=args.group_size, modules_to_not_convert=skip, mode="packed",
        allow_nonfinite=args.allow_nonfinite,
    )  # fmt: skip
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    quantize_folder(args.src, args.out, config, overwrite=args.overwrite, dtype=dtype)
    print(f"wrote GRACE INT{args.bits} checkpoint to {args.out}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------ export
FORMATS = ("compressed-tensors", "awq")


def add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "export",
        "GRACE INT4 folder -> compressed-tensors or AutoAWQ GEMM folder (for vLLM & co.)",
        "Read the packed 4-bit GRACE checkpoint in SRC and write the same weights to OUT in a serving format:\n"
        "  compressed-tensors  pack-quantized W4A16 (bit-identical weights; transformers/vLLM load it without\n"
        "                      grace-quant, with compressed-tensors installed)\n"
        "  awq                 AutoAWQ GEMM layout with zero point 8 and fp16 scales",
        "grace-quant export ./llava-int4 ./llava-int4-ct --format compressed-tensors",
    )
    parser.add_argument("src", metavar="SRC", help="packed GRACE checkpoint folder (4 bits)")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="target format")
    _add_overwrite(parser)
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    _check_output(args.out, args.src, overwrite=args.overwrite)
    if args.format == "awq":
        from grace_quant.integrations.awq import export_awq as export
    else:
        from grace_quant.integrations.export_compressed_tensors import export_compressed_tensors as export
    export(args.src, args.out, overwrite=args.overwrite)
    print(f"wrote {args.format} checkpoint to {args.out}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- import-awq
def add_import_awq(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "import-awq",
        "AutoAWQ GEMM 4-bit folder -> packed GRACE folder",
        "Read an AutoAWQ GEMM checkpoint (4 bits, every zero point equal to 8, i.e. symmetric) from SRC and write\n"
        "the same weights as a packed GRACE checkpoint to OUT, loadable with grace_quant and trainable further\n"
        "with grace_quant.prepare_qat. Checkpoints with other zero points are refused (the error names the layer).",
        "grace-quant import-awq ./qwen2-vl-awq ./qwen2-vl-grace",
    )
    parser.add_argument("src", metavar="SRC", help="AutoAWQ GEMM checkpoint folder")
    parser.add_argument("out", metavar="OUT", help="output folder for the GRACE checkpoint (must not exist)")
    _add_overwrite(parser)
    parser.set_defaults(func=run_import_awq)


def run_import_awq(args: argparse.Namespace) -> int:
    _check_output(args.out, args.src, overwrite=args.overwrite)
    from grace_quant.integrations.awq import import_awq

    import_awq(args.src, args.out, overwrite=args.overwrite)
    print(f"wrote GRACE checkpoint to {args.out}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- push
def add_push(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "push",
        "upload a GRACE folder to the Hugging Face Hub (with a model card)",
        "Upload the GRACE checkpoint folder SRC to the Hub repository REPO (created if needed), adding a model\n"
        "card (README.md) that documents the quantization settings and how to load the model, unless SRC has\n"
        "one. Authentication: `hf auth login`, the HF_TOKEN variable, or --token-env NAME.",
        "grace-quant push ./llava-int4 my-org/llava-1.5-7b-grace-int4 --private --base-model llava-hf/llava-1.5-7b-hf",
    )
    parser.add_argument("src", metavar="SRC", help="packed GRACE checkpoint folder")
    parser.add_argument("repo", metavar="REPO", help="Hub repository id, e.g. my-org/my-model-grace-int4")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--token-env", metavar="NAME", help="read the Hub token from this environment variable (never from argv)"
    )
    parser.add_argument("--base-model", metavar="REPO", help="the full-precision model, for the model card")
    parser.add_argument("--teacher", metavar="REPO", help="the distillation teacher, for the model card")
    parser.add_argument("--commit-message", metavar="TEXT", help="commit message on the Hub")
    parser.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    from grace_quant.integrations.hub import push_folder_to_hub

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise UserError(f"environment variable {args.token_env} (from --token-env) is not set or empty")
    url = push_folder_to_hub(
        args.src,
        args.repo,
        token=token,
        private=True if args.private else None,
        commit_message=args.commit_message,
        base_model=args.base_model,
        teacher=args.teacher,
    )
    print(f"pushed {args.src} to {args.repo}: {url}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- main
# -------------------------------------------------------------------------------------------------------- demo
def add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "demo",
        "offline end-to-end GRACE experiment on a small VLM task (~9 min on 2 CPU cores)",
        "Build a visual question-answering task from real MNIST digits (2x2 grids; questions about positions,\n"
        "reading, the largest digit, counting), train a teacher and a smaller fp student (tiny LLaVA models),\n"
        "then make INT4 students four ways: round to nearest (RTN), QAT, QAT + plain KD, and GRACE. Every INT4\n"
        "model is saved with save_pretrained, loaded back with from_pretrained and evaluated with generate.\n"
        "Prints a table, writes results.json and PNG plots to WORKDIR. Finished stages are cached: a second run\n"
        "with the same settings only re-reports. Nothing is downloaded. It first says how long it should take on\n"
        "this machine; it runs on the cores other jobs leave idle (--threads overrides), since two torch jobs\n"
        "sharing cores slow each other down many times over.",
        "grace-quant demo --workdir ./grace_demo",
    )
    parser.add_argument("--workdir", default="grace_demo_artifacts", help="folder for models, results and plots")
    parser.add_argument(
        "--preset",
        choices=("quick", "default", "full", "gpu"),
        default="default",
        help="quick: a CI-sized smoke run (well under a minute); default: one seed (~9 min on 2 CPU cores); full: 3 "
        "seeds, 2,000 test questions and the outlier stress setting (the README quotes both; ~16 min); gpu: a "
        "wider/deeper teacher and student and harder questions (digit sums), for a GPU",
    )
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--seeds", type=int, nargs="+", help="QAT seeds (overrides the preset)")
    parser.add_argument("--stress", action="store_true", help="also run the synthetic outlier stress setting")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--threads", type=positive_int, metavar="N",
        help="CPU threads for torch (default: the cores this process may use less those other jobs keep busy)",
    )  # fmt: skip
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from grace_quant.demo.pipeline import PRESETS, Demo, cpu_threads, duration_message, say
    from grace_quant.demo.report import write_report

    preset = "quick" if args.quick else args.preset
    settings = dataclasses.replace(PRESETS[preset])
    if args.seeds:
        settings.seeds = args.seeds
    if args.stress:
        settings.stress = True
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise UserError(f"--workdir {args.workdir} exists and is not a folder")
    threads = args.threads or cpu_threads()
    torch.set_num_threads(threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    say(duration_message(preset, threads, device))
    results = Demo(settings, args.workdir, device=device).run()
    print(write_report(results, args.workdir))
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- eval
def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "eval",
        "score a model folder on a dataset (batched generate) or on lmms-eval benchmarks",
        "Load MODEL_DIR (any image-text-to-text model folder with its processor; GRACE or not) and score it.\n"
        "With --dataset: answer every question of the dataset at PATH (a datasets folder written by save_to_disk,\n"
        "with columns image, question and answers) by greedy generation and report exact match and VQA accuracy\n"
        "(standard answer normalisation) with the metric modules shipped in grace_quant; works without network.\n"
        "With --lmms-tasks: run lmms-eval's evaluator in-process on its tasks (MME, MMBench, ScienceQA, ...; they\n"
        "download their data) or local task folders (--lmms-include; the shipped grace_sample_vqa is offline)\n"
        "and report its metrics. Needs pip install 'grace-quant[lmms]'.",
        "grace-quant eval ./grace_demo/grace_seed0 --dataset ./grace_demo/data/dataset --split test\n"
        "  grace-quant eval ./llava-int4 --lmms-tasks mme,scienceqa_img --limit 100 --output lmms.json",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (config.json, weights, processor files)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="PATH", help="dataset folder (datasets.save_to_disk)")
    source.add_argument(
        "--lmms-tasks", metavar="TASKS", help="comma-separated lmms-eval task names (instead of --dataset)"
    )
    parser.add_argument(
        "--lmms-include",
        metavar="PATH",
        action="append",
        default=[],
        help="folder of lmms-eval task YAMLs to search too (repeatable)",
    )
    parser.add_argument("--split", default="test", help="split of a DatasetDict (default: test; --dataset only)")
    parser.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="evaluate only the first N examples (per task with --lmms-tasks)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="questions per generate call (default: 32)")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=16,
        help="answer length limit (default: 16; lmms tasks set their own)",
    )
    parser.add_argument(
        "--template",
        help="prompt template with {question} (and {image} for the image token); default: the processor's chat "
        "template, else '<image>Q: {question} A:'",
    )
    parser.add_argument("--output", metavar="FILE", help="also write predictions and scores to this JSON file")
    parser.set_defaults(func=run_eval)


def _write_json(path: str, payload: object) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so a failed run leaves no half-written file."""
    import json

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=1, default=str)  # lmms-eval's results hold a few non-JSON values
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_eval(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.model_dir) or not os.path.exists(os.path.join(args.model_dir, "config.json")):
        raise UserError(f"{args.model_dir} is not a model folder (expected config.json inside)")
    if args.lmms_tasks:
        return run_eval_lmms(args)
    if args.lmms_include:
        raise UserError("--lmms-include adds task folders for --lmms-tasks; give --lmms-tasks too")
    if not os.path.isdir(args.dataset):
        raise UserError(f"{args.dataset} is not a dataset folder (write one with datasets' save_to_disk)")
    if args.output:  # before the model loads and the questions run, not after
        _check_output(args.output, args.model_dir, args.dataset, kind="file")
    from datasets import DatasetDict, load_from_disk
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import grace_quant  # noqa: F401  (GRACE checkpoints need the quantizer registered)
    from grace_quant.evaluation import generate_answers, load_metric

    data = load_from_disk(args.dataset)
    if isinstance(data, DatasetDict):
        if args.split not in data:
            raise UserError(f"split {args.split!r} not in the dataset; it has {sorted(data)}")
        data = data[args.split]
    missing = {"image", "question", "answers"} - set(data.column_names)
    if missing:
        raise UserError(f"the dataset lacks column(s) {sorted(missing)}; it has {data.column_names}")
    if args.limit is not None:
        data = data.select(range(min(args.limit, len(data))))
    processor = AutoProcessor.from_pretrained(args.model_dir)
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir)
    answers = generate_answers(
        model, processor, list(data["image"]), list(data["question"]), batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, template=args.template,
    )  # fmt: skip
    references = [a if isinstance(a, list) else [a] for a in data["answers"]]
    scores = {
        **load_metric("exact_match").compute(predictions=answers, references=references),
        **load_metric("vqa_accuracy").compute(predictions=answers, references=references),
    }
    print(
        f"{len(answers)} questions: exact match {100 * scores['exact_match']:.2f}%, VQA accuracy {100 * scores['vqa_accuracy']:.2f}%"
    )
    if args.output:
        _write_json(args.output, {"scores": scores, "predictions": answers})
    return EXIT_OK


def run_eval_lmms(args: argparse.Namespace) -> int:
    """``grace-quant eval --lmms-tasks``: lmms-eval's evaluator with the ``grace`` model, in this process."""
    tasks = [task.strip() for task in args.lmms_tasks.split(",") if task.strip()]
    if not tasks:
        raise UserError("--lmms-tasks is empty; name tasks like mme,scienceqa_img (or grace_sample_vqa)")
    if args.output:  # before the model loads and the tasks run, not after
        _check_output(args.output, args.model_dir, kind="file")
    try:
        from grace_quant.integrations.lmms import evaluate_with_lmms, summary

        results = evaluate_with_lmms(
            args.model_dir, tasks, include_paths=args.lmms_include, limit=args.limit, batch_size=args.batch_size,
            template=args.template,
        )  # fmt: skip
    except ImportError as exc:  # lmms-eval missing, or a torchvision that does not match torch
        raise UserError(str(exc)) from exc
    counts = results.get("n-samples", {})
    for task, metrics in summary(results).items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        samples = counts.get(task, {}).get("effective")
        print(f"{task}: {shown}" + (f" ({samples} samples)" if samples is not None else ""))
    if args.output:
        _write_json(args.output, results)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------ ablate
def positive_float(text: str) -> float:
    """argparse type: a number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_ablate(subparsers: argparse._SubParsersAction) -> None:
    from grace_quant.ablation import ARMS

    arms = "\n".join(f"  {name:<20}{description}" for name, (description, _) in ARMS.items())
    parser = _command(
        subparsers,
        "ablate",
        "compare RTN, QAT, QAT+KD, GRACE and GRACE's ablations on your data (same samples, same steps)",
        "What does GRACE give on your data? Quantize the full-precision STUDENT to INT4 several ways, distilling\n"
        "from TEACHER on the training split of DATASET, then score every result on its evaluation split:\n"
        f"{arms}\n"
        "Every trained arm starts from the same student, reads the same samples in the same order (the seed\n"
        "fixes the order) for --steps optimizer steps, and is saved as packed INT4 under OUT/models/, reloaded\n"
        "and scored by batched generate: exact match, VQA accuracy, and token KL to the teacher on the reference\n"
        "answers. The fp student is scored too, as the reference. Prints a markdown table with 95% intervals\n"
        "(binomial over questions for one seed, t over seeds for several) and writes it with all numbers to\n"
        "OUT/results.md and OUT/results.json; OUT appears only once everything has finished.\n"
        "DATASET: a datasets.DatasetDict folder (save_to_disk) with columns image, question, answers (a list of\n"
        "strings; the first is trained on), as for `grace-quant eval --dataset`. TEACHER and STUDENT: model\n"
        "folders of the same family and vocabulary; the student's processor formats the prompts.",
        "grace-quant ablate --teacher ./llava-13b --student ./llava-7b --dataset ./my_vqa --output ./ablation \\\n"
        "      --steps 500 --batch-size 8 --seeds 0 1 2 --group-size 128",
    )
    parser.add_argument("--teacher", required=True, metavar="DIR", help="full-precision teacher model folder")
    parser.add_argument("--student", required=True, metavar="DIR", help="full-precision student folder (+ processor)")
    parser.add_argument("--dataset", required=True, metavar="DIR", help="DatasetDict folder written by save_to_disk")
    parser.add_argument("--output", required=True, metavar="OUT", help="output folder (must not exist)")
    parser.add_argument("--steps", type=positive_int, default=200, help="optimizer steps per arm (default: 200)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="training batch size (default: 8)")
    parser.add_argument("--lr", type=positive_float, default=2e-5, help="learning rate (default: 2e-5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds, one run per seed (default: 0)")
    parser.add_argument("--group-size", type=positive_int, default=128, help="input features per scale (default: 128)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight (default: 4)")
    parser.add_argument(
        "--arms",
        metavar="A,B",
        default=",".join(ARMS),
        help=f"comma-separated arms to run (default: all: {','.join(ARMS)})",
    )
    parser.add_argument("--train-split", default="train", help="training split (default: train)")
    parser.add_argument("--eval-split", default="test", help="evaluation split (default: test)")
    parser.add_argument("--eval-limit", type=positive_int, metavar="N", help="score only the first N questions")
    parser.add_argument("--eval-batch-size", type=positive_int, default=32, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="answer length limit (default: 16)")
    parser.add_argument(
        "--template",
        help="prompt with {question} (and {image}) for training and scoring; default: the processor's chat template, "
        "else '<image>Q: {question} A:'",
    )
    _add_overwrite(parser)
    parser.set_defaults(func=run_ablate)


def _model_folder(path: str, flag: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(
            f"{flag} {path} is not a model folder (no config.json); give a folder written by save_pretrained"
        )


def run_ablate(args: argparse.Namespace) -> int:
    from grace_quant.ablation import ARMS, AblationSettings, run_ablation, unknown_arms

    _model_folder(args.teacher, "--teacher")
    _model_folder(args.student, "--student")
    if not os.path.isdir(args.dataset):
        raise UserError(f"--dataset {args.dataset} is not a folder; write one with DatasetDict.save_to_disk")
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not arms or unknown_arms(arms):
        raise UserError(f"--arms: unknown arm(s) {unknown_arms(arms) or arms}; choose from {','.join(ARMS)}")
    _check_output(args.output, args.teacher, args.student, args.dataset, overwrite=args.overwrite)
    settings = AblationSettings(
        teacher=args.teacher, student=args.student, dataset=args.dataset, output=args.output, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seeds=list(dict.fromkeys(args.seeds)), group_size=args.group_size,
        bits=args.bits, arms=list(dict.fromkeys(arms)), train_split=args.train_split, eval_split=args.eval_split,
        eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
        template=args.template, overwrite=args.overwrite,
    )  # fmt: skip
    run_ablation(settings)
    print(f"wrote results.md, results.json and the arms' INT4 models to {args.output}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- tune
def add_tune(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(
        subparsers,
        "tune",
        "time the INT4 kernels on this GPU for a model's shapes and keep the fastest configs",
        "Load the packed GRACE checkpoint SRC on the GPU, time the W4A16 kernel's launch configurations for every\n"
        "INT4 matmul shape of the model and every token-count bucket up to 2048 (above 64: dequantize + cuBLAS\n"
        "raced against the tensor-core kernel), and write the fastest to this GPU's\n"
        "table ($GRACE_QUANT_CACHE or ~/.cache/grace_quant/kernels/). Later processes use it without tuning;\n"
        "shapes already in the table are skipped unless --retune. Needs a CUDA GPU; takes a few minutes.",
        "grace-quant tune ./llava-int4",
    )
    parser.add_argument("src", metavar="SRC", help="packed GRACE checkpoint folder (4 bits)")
    parser.add_argument("--retune", action="store_true", help="time shapes that already have a configuration too")
    parser.add_argument(
        "--tokens",
        type=token_counts,
        metavar="M,M,...",
        help="tune only the buckets of these token counts, e.g. 1,8 for decoding (default: every bucket up to 2048)",
    )
    parser.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UserError("tuning times the kernels on a CUDA GPU and none is available here; run it on the GPU "
                        "that will serve the model")  # fmt: skip
    from grace_quant import AutoModelForVision2Seq
    from grace_quant.kernels.tables import device_name, table
    from grace_quant.tuning import matmul_shapes, tune_model

    if not os.path.isfile(os.path.join(args.src, "config.json")):
        raise UserError(f"{args.src} is not a model folder (no config.json)")
    model = AutoModelForVision2Seq.from_pretrained(args.src, device_map="cuda")
    if not matmul_shapes(model):
        raise UserError(f"{args.src} has no packed INT4 layers to tune; make one with `grace-quant quantize` first")
    tuned = tune_model(model, retune=args.retune, **({"m_values": args.tokens} if args.tokens else {}))
    device = device_name(torch.device("cuda"))
    print(f"{len(tuned)} new kernel configurations for {device} in {table(device).user_path}")
    return EXIT_OK


COMMANDS = (add_quantize, add_export, add_import_awq, add_push, add_demo, add_eval, add_ablate, add_tune)


def build_parser() -> argparse.ArgumentParser:
    """The ``grace-quant`` parser; each ``add_*`` in :data:`COMMANDS` registers one subcommand.

    Building it imports nothing heavy (each ``run_*`` imports what it needs), so ``--help`` answers at once."""
    from grace_quant import __version__

    parser = _Parser(
        prog="grace-quant",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"grace-quant {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _warning_printer(command: str):
    """Python warnings as one line each, like the CLI's errors: ``grace-quant CMD: warning: ...``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"grace-quant {command}: warning: {_one_line(message)}", file=file or sys.stderr)

    return show


#: what a Ctrl-C leaves behind, per command (formatted with the parsed arguments)
INTERRUPTED = {
    "quantize": "nothing was written to {out}",
    "export": "nothing was written to {out}",
    "import-awq": "nothing was written to {out}",
    "push": "nothing was committed to {repo} (the Hub commits an upload only once it is complete)",
    "demo": "the stage in progress was discarded; finished stages stay in {workdir} and a rerun resumes after them",
    "eval": "no scores were written",
    "ablate": "nothing was written to {output}",
    "tune": "no kernel configuration was saved",
}


def _interrupted(args: argparse.Namespace | None) -> int:
    command = getattr(args, "command", None)
    what = INTERRUPTED.get(command, "nothing was written").format(**vars(args)) if args is not None else ""
    print(f"grace-quant{f' {command}' if command else ''}: interrupted{f'; {what}' if what else ''}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _report(args: argparse.Namespace, exc: BaseException) -> int:
    """Print a user error as one line (``--debug``: the traceback) and return exit code 2."""
    if args.debug:
        raise exc
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror and exc.filename else exc
    suffix = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    print(f"grace-quant {args.command}: error: {_one_line(message)}{suffix}", file=sys.stderr)
    return EXIT_USER_ERROR


def _run(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():  # restores the default warning printer afterwards (main runs in tests too)
            warnings.showwarning = _warning_printer(args.command)
            return args.func(args)
    except Exception as exc:  # KeyboardInterrupt is no Exception: main reports it
        if not _is_user_error(exc):
            raise
        return _report(args, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``grace-quant`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    A Ctrl-C at any point (parsing, the first imports, the work, error reporting) ends with one line, code 130."""
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a usage error already printed as one line (code 2)
            return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
        return _run(args)
    except KeyboardInterrupt:
        return _interrupted(args)


if __name__ == "__main__":
    sys.exit(main())
