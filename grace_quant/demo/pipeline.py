"""``grace-quant demo``: the whole offline experiment, stage by stage, with cached artifacts.

data -> vision tower -> teacher -> fp student -> INT4 students (RTN, QAT, QAT+KD, GRACE; optionally the outlier
stress setting) -> evaluation of every saved model through ``from_pretrained`` + ``generate`` -> report.
Each stage writes a folder with ``stage.json`` (its settings); a rerun with the same settings skips it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from grace_quant.config import GraceConfig

from .data import DISTILL_PER_CLASS

METHOD_ORDER = ("teacher", "fp_student", "rtn", "qat", "qat_kd", "grace")
STRESS_ORDER = ("fp_student_stress", "rtn_stress", "grace_stress")


@dataclass
class DemoSettings:
    """Sizes and step counts of one demo run (see PRESETS)."""

    train_size: int = 8000
    distill_size: int = 0  # >0: the INT4 students train on this many questions about digits no fp model has seen,
    distill_per_class: int = DISTILL_PER_CLASS  # drawn from this many digits per class (taken from the fp models' 400)
    test_size: int = 1000
    vision_steps: int = 600
    teacher_steps: int = 3000
    student_steps: int = 2500
    qat_steps: int = 400
    batch_size: int = 32
    fp_lr: float = 2e-3
    qat_lr: float = 2e-4
    group_size: int = 32
    bits: int = 4
    seeds: list[int] = field(default_factory=lambda: [0])
    stress: bool = False
    outlier_fraction: float = 0.05
    outlier_scale: float = 30.0
    eval_batch_size: int = 100
    teacher_lm: tuple[int, int] = (128, 4)  # (hidden size, layers) of the language model
    # the student's LM is 4x narrower and half as deep: with a 64-d student (2x narrower) the teacher did not lead it
    # (86.9 vs 87.4; both read digits through the same frozen tower, which bounds them); at 32-d it leads by 3 points
    student_lm: tuple[int, int] = (32, 2)
    question_types: tuple[str, ...] = ("position", "read", "max", "count")

    def key(self, *names: str) -> dict:
        return {name: getattr(self, name) for name in names}


PRESETS = {
    "quick": DemoSettings(
        train_size=400,
        test_size=80,
        vision_steps=40,
        teacher_steps=40,
        student_steps=40,
        qat_steps=10,
        batch_size=16,
        seeds=[0],
    ),  # fmt: skip
    "default": DemoSettings(),
    "full": DemoSettings(test_size=2000, seeds=[0, 1, 2], stress=True),
    # for a GPU: a wider and deeper teacher and student, and harder questions (the sum of the four digits)
    "gpu": DemoSettings(
        train_size=20000,
        test_size=2000,
        vision_steps=1500,
        teacher_steps=8000,
        student_steps=6000,
        qat_steps=1500,
        batch_size=64,
        teacher_lm=(512, 8),
        student_lm=(256, 4),
        group_size=64,
        seeds=[0, 1, 2],
        stress=True,
        question_types=("position", "read", "max", "count", "sum"),
    ),  # fmt: skip
}


#: wall-clock minutes of the CPU presets on the reference machine (2 CPU cores, torch 2.13, idle; measured 2026-12-05
#: with the 32-d student, both in the README); `grace-quant demo` scales them by :func:`probe_seconds` on this machine
#: (a rough guide: the tiny models' steps are partly Python overhead)
REFERENCE_MINUTES = {"quick": 0.5, "default": 9.2, "full": 16.0}
#: :func:`probe_seconds` on the reference machine, idle, 2 threads
REFERENCE_PROBE_SECONDS = 0.075


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine in clock ticks from ``/proc/stat``, or None where it is missing."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window_s: float = 0.3) -> int:
    """Cores other jobs keep busy right now: machine-wide CPU use over ``window_s`` (this process is idle meanwhile),
    or the 1-minute load average where ``/proc/stat`` is missing (it lags: a pip install just before counts)."""
    first = _cpu_times()
    if first is None:
        return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    time.sleep(window_s)
    second = _cpu_times()
    total = second[1] - first[1]
    if total <= 0:
        return 0
    return round((second[0] - first[0]) / total * (os.cpu_count() or 1))


def cpu_threads() -> int:
    """Threads for the demo: the cores this process may use less those other jobs keep busy now, at least 1. Two
    torch processes each running one thread per core slow each other down 5-70x."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - busy_cores())


def probe_seconds(repeats: int = 3) -> float:
    """Seconds for a small workload shaped like the demo's training steps (a 128-256-128 MLP on [1024, 128]: forward,
    backward and AdamW step, 20 times) with torch's current thread count; the best of ``repeats``."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randn(1024, 128, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(20):
            loss = model(batch).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        best = min(best, time.perf_counter() - start)
    return best


def duration_message(preset: str, threads: int, device: str) -> str:
    """How long the preset should take on this machine: its reference time scaled by a probe of this CPU."""
    if device != "cpu" or preset not in REFERENCE_MINUTES:
        return f"preset {preset!r} on {device}: no reference timing (the references are for 2 CPU cores)"
    minutes = REFERENCE_MINUTES[preset] * probe_seconds() / REFERENCE_PROBE_SECONDS
    estimate = "under a minute" if minutes < 1 else f"about {minutes:.0f} min"
    return (
        f"preset {preset!r} on {threads} CPU thread(s): {estimate} on this machine "
        f"({REFERENCE_MINUTES[preset]:g} min on the 2-core reference; extra --seeds or --stress add to it, "
        "finished stages in the workdir are reused)"
    )


class Stage:
    """A cached step: ``done`` is true when its folder holds ``stage.json`` with the same settings."""

    def __init__(self, root: str, name: str, settings: dict):
        self.path = os.path.join(root, name)
        self.settings = json.loads(json.dumps(settings, default=str))

    @property
    def done(self) -> bool:
        marker = os.path.join(self.path, "stage.json")
        if not os.path.exists(marker):
            return False
        with open(marker) as handle:
            return json.load(handle) == self.settings

    @contextlib.contextmanager
    def writing(self) -> Iterator[str]:
        """A fresh temporary folder to write into, renamed into place when the block succeeds and removed when it
        fails or is interrupted (Ctrl-C): a stage is never half-written, and nothing but finished stages remains."""
        tmp = self.path + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            yield tmp
            with open(os.path.join(tmp, "stage.json"), "w") as handle:
                json.dump(self.settings, handle)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(tmp, self.path)


def say(message: str) -> None:
    print(f"[grace-quant demo] {message}", flush=True)


def inject_outliers(model, fraction: float, scale: float, seed: int) -> list[int]:
    """Function-preserving outliers: scale a few RMSNorm channels up by ``scale`` and the input columns of the
    linears that read them down by ``scale`` (mimics the massive activations of pretrained LLMs)."""
    generator = torch.Generator().manual_seed(seed)
    channels_per_layer = []
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            hidden = layer.input_layernorm.weight.numel()
            count = max(1, round(fraction * hidden))
            for norm, consumers in (
                (layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
            ):
                channels = torch.randperm(hidden, generator=generator)[:count]
                norm.weight[channels] *= scale
                for linear in consumers:
                    linear.weight[:, channels] /= scale
            channels_per_layer.append(count)
    return channels_per_layer


class Demo:
    """Runs the stages of one demo under ``workdir``."""

    def __init__(self, settings: DemoSettings, workdir: str, device: str | None = None):
        self.settings = settings
        self.workdir = workdir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        os.makedirs(workdir, exist_ok=True)
        self.timings: dict[str, float] = {}
        self._cache: dict[str, object] = {}  # dataset + processor, encoded training set, teacher: load once per run

    # ------------------------------------------------------------------ data, tokenizer, vision tower
    def data_stage(self) -> Stage:
        return Stage(self.workdir, "data", {**self.data_keys(), "test_size": self.settings.test_size})

    def data_keys(self) -> dict:
        """What the training split depends on (every stage that trains on it is keyed by this)."""
        keys = self.settings.key("train_size", "question_types")
        if self.settings.distill_size:  # a distillation split takes digits from the training split; keys without
            keys.update(self.settings.key("distill_size", "distill_per_class"))  # one stay as they were
        return keys

    def prepare_data(self) -> None:
        stage = self.data_stage()
        if stage.done:
            return
        from .data import build_dataset
        from .models import build_processor, prompt, train_tokenizer

        say("building the dataset (MNIST digit grids) and training the tokenizer")
        with stage.writing() as path:
            dataset = build_dataset(self.settings.train_size, self.settings.test_size, 0, self.settings.question_types,
                                    self.settings.distill_size, self.settings.distill_per_class)  # fmt: skip
            dataset.save_to_disk(os.path.join(path, "dataset"))
            texts = [
                prompt(q) + " " + a[0]
                for q, a in zip(dataset["train"]["question"], dataset["train"]["answers"], strict=True)
            ]
            build_processor(train_tokenizer(texts)).save_pretrained(os.path.join(path, "processor"))
        self._cache.clear()

    def load_data(self):
        """The dataset and processor of the data stage (read from disk once per run)."""
        if "data" not in self._cache:
            from datasets import load_from_disk
            from transformers import AutoProcessor

            path = self.data_stage().path
            processor = AutoProcessor.from_pretrained(os.path.join(path, "processor"))
            self._cache["data"] = (load_from_disk(os.path.join(path, "dataset")), processor)
        return self._cache["data"]

    def train_examples(self, split: str = "train") -> list[dict]:
        """The rows of ``split`` (decoded images, questions, answers), shared by the training stages that use it."""
        if split not in self._cache:
            from .train import training_rows

            self._cache[split] = training_rows(self.load_data()[0][split])
        return self._cache[split]

    def qat_split(self) -> str:
        """What the INT4 students train on: the distillation split where there is one, else the fp models' split."""
        return "distill" if self.settings.distill_size else "train"

    def teacher(self):
        """The trained, frozen teacher on the run's device (loaded once; distillation and evaluation share it)."""
        if "teacher" not in self._cache:
            from transformers import AutoModelForImageTextToText

            path = self.fp_stage("teacher").path
            self._cache["teacher"] = AutoModelForImageTextToText.from_pretrained(path).to(self.device).eval()
        return self._cache["teacher"]

    def vision_stage(self) -> Stage:
        return Stage(
            self.workdir, "vision", {**self.data_keys(), "vision_steps": self.settings.vision_steps, "seed": 0}
        )

    def pretrain_vision(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        stage = self.vision_stage()
        if not stage.done:
            from .data import load_mnist
            from .models import pretrain_vision

            say(f"pretraining the vision tower to read digits ({self.settings.vision_steps} steps)")
            dataset, processor = self.load_data()
            _, labels = load_mnist()
            pixels = processor.image_processor(list(dataset["train"]["image"]), return_tensors="pt")["pixel_values"]
            digits = torch.tensor([[int(labels[j]) for j in ids] for ids in dataset["train"]["digit_ids"]])
            state, losses = pretrain_vision(pixels, digits, self.settings.vision_steps, seed=0)
            with stage.writing() as path:
                save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "tower.safetensors"))
                with open(os.path.join(path, "losses.json"), "w") as handle:
                    json.dump(losses, handle)
        return load_file(os.path.join(stage.path, "tower.safetensors"))

    # ------------------------------------------------------------------------------ fp models
    def fp_stage(self, role: str) -> Stage:
        steps = self.settings.teacher_steps if role == "teacher" else self.settings.student_steps
        keys = {**self.data_keys(), **self.settings.key("vision_steps", "batch_size", "fp_lr")}
        size = self.settings.teacher_lm if role == "teacher" else self.settings.student_lm
        settings = {**keys, "steps": steps, "role": role, "size": list(size)}
        return Stage(self.workdir, role if role == "teacher" else "fp_student", settings)

    def train_fp_model(self, role: str) -> str:
        stage = self.fp_stage(role)
        if stage.done:
            return stage.path
        from .models import build_llava
        from .train import collator, train_fp

        steps = self.settings.teacher_steps if role == "teacher" else self.settings.student_steps
        say(f"training the {role} ({steps} steps)")
        _, processor = self.load_data()
        size = self.settings.teacher_lm if role == "teacher" else self.settings.student_lm
        model = build_llava(size, processor.tokenizer, self.pretrain_vision(), seed=1 if role == "teacher" else 2)
        with stage.writing() as path:
            train_fp(model, self.train_examples(), collator(processor), os.path.join(path, "run"),
                     steps, self.settings.batch_size, self.settings.fp_lr, seed=0, device=self.device)  # fmt: skip
            shutil.rmtree(os.path.join(path, "run"), ignore_errors=True)
            model.save_pretrained(path)
            processor.save_pretrained(path)
        return stage.path

    def stress_student(self) -> str:
        """The fp student with function-preserving outliers (the synthetic stress setting)."""
        from transformers import AutoModelForImageTextToText

        keys = self.settings.key("outlier_fraction", "outlier_scale")
        stage = Stage(self.workdir, "fp_student_stress", {**self.fp_stage("student").settings, **keys})
        if not stage.done:
            say("injecting function-preserving outliers into the fp student (synthetic stress setting)")
            model = AutoModelForImageTextToText.from_pretrained(self.fp_stage("student").path)
            inject_outliers(model, self.settings.outlier_fraction, self.settings.outlier_scale, seed=0)
            with stage.writing() as path:
                model.save_pretrained(path)
                self.load_data()[1].save_pretrained(path)
        return stage.path

    # ---------------------------------------------------------------------------- INT4 models
    def grace_config(self, mode: str) -> GraceConfig:
        return GraceConfig(bits=self.settings.bits, group_size=self.settings.group_size, mode=mode)

    def recipe(self, method: str) -> dict:
        """What a QAT arm's result depends on beyond its own sizes: the method's arguments, GraceTrainingArguments'
        defaults (a library change re-runs the arm) and, for the KD arms, the teacher it learns from."""
        from dataclasses import MISSING, fields

        from transformers import TrainingArguments

        from grace_quant.integrations.training_args import GraceTrainingArguments

        from .train import METHODS

        base = {f.name for f in fields(TrainingArguments)}
        defaults = {
            f.name: f.default for f in fields(GraceTrainingArguments) if f.name not in base and f.default is not MISSING
        }
        out = {"overrides": METHODS[method], "defaults": defaults}
        if method != "qat":
            out["teacher"] = self.fp_stage("teacher").settings
        return out

    def rtn(self, fp_path: str, name: str) -> str:
        """Round-to-nearest (MSE-grid scales) INT4 straight from the fp checkpoint: INT4 on load, then saved."""
        from transformers import AutoModelForImageTextToText

        stage = Stage(
            self.workdir,
            name,
            {"from": os.path.relpath(fp_path, self.workdir), **self.settings.key("bits", "group_size")},
        )
        if not stage.done:
            say(f"{name}: INT4 on load (round to nearest)")
            model = AutoModelForImageTextToText.from_pretrained(
                fp_path, quantization_config=self.grace_config("packed")
            )
            with stage.writing() as path:
                model.save_pretrained(path)
                self.load_data()[1].save_pretrained(path)
        return stage.path

    def qat(self, fp_path: str, method: str, seed: int, name: str) -> str:
        from transformers import AutoModelForImageTextToText

        from .train import collator, train_qat

        keys = {**self.data_keys(), **self.settings.key("qat_steps", "qat_lr", "batch_size", "bits", "group_size")}
        keys.pop("question_types")  # keyed before through the fp model it starts from
        settings = {"from": os.path.relpath(fp_path, self.workdir), "method": method, "seed": seed, **keys}
        stage = Stage(self.workdir, name, {**settings, **self.recipe(method)})
        if stage.done:
            return stage.path
        say(f"{name}: {method} QAT, seed {seed} ({self.settings.qat_steps} steps)")
        _, processor = self.load_data()
        torch.manual_seed(seed)
        student = AutoModelForImageTextToText.from_pretrained(fp_path, quantization_config=self.grace_config("qat"))
        with stage.writing() as path:
            train_qat(student.to(self.device), self.teacher(), method, self.train_examples(self.qat_split()),
                      collator(processor), path, self.settings.qat_steps,
                      self.settings.batch_size, self.settings.qat_lr, seed, self.device)  # fmt: skip
            processor.save_pretrained(path)
        return stage.path

    # ------------------------------------------------------------------------------- evaluation
    def evaluate(self, name: str, path: str, teacher_answers: list[str] | None) -> dict:
        from transformers import AutoModelForImageTextToText

        from grace_quant.evaluation import answer_token_kl, generate_answers, load_metric, same_answer_rate

        from .train import TEMPLATE

        cache = os.path.join(path, "eval.json")
        stamp = {"test_size": self.settings.test_size, "train_size": self.settings.train_size}
        if teacher_answers is not None:  # the KL and same-answer columns are against this teacher
            stamp["teacher"] = self.fp_stage("teacher").settings
        if os.path.exists(cache):
            with open(cache) as handle:
                saved = json.load(handle)
            if saved.get("stamp") == stamp and (teacher_answers is None or "same_answer" in saved):
                return saved
        say(f"evaluating {name} through from_pretrained + generate")
        dataset, processor = self.load_data()
        test = dataset["test"]
        model = AutoModelForImageTextToText.from_pretrained(path).to(self.device)
        images, questions = list(test["image"]), list(test["question"])
        template = TEMPLATE  # the prompt the models were trained on
        answers = generate_answers(model, processor, images, questions, batch_size=self.settings.eval_batch_size,
                                   max_new_tokens=12, template=template)  # fmt: skip
        references = [a[0] for a in test["answers"]]
        exact = load_metric("exact_match")
        result = {
            "stamp": stamp,
            "answers": answers,
            "exact_match": exact.compute(predictions=answers, references=references)["exact_match"],
        }
        result["per_type"] = {}
        for kind in sorted(set(test["kind"])):
            rows = [i for i, k in enumerate(test["kind"]) if k == kind]
            hits = exact.compute(predictions=[answers[i] for i in rows], references=[references[i] for i in rows])
            result["per_type"][kind] = hits["exact_match"]
        result["hits"] = [int(a.strip() == r.strip()) for a, r in zip(answers, references, strict=True)]
        result["bytes"] = sum(
            os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")
        )
        if teacher_answers is not None:
            result["token_kl"] = answer_token_kl(model, self.teacher(), processor, images, questions, teacher_answers,
                                                 batch_size=self.settings.eval_batch_size, template=template)  # fmt: skip
            result["same_answer"] = same_answer_rate(answers, teacher_answers)
        with open(cache + ".tmp", "w") as handle:  # a Ctrl-C never leaves a half-written cache behind
            json.dump(result, handle)
        os.replace(cache + ".tmp", cache)
        return result

    # ---------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        start = time.perf_counter()
        self.prepare_data()
        self.pretrain_vision()
        teacher_path = self.train_fp_model("teacher")
        student_path = self.train_fp_model("student")
        models: dict[str, list[str]] = {"teacher": [teacher_path], "fp_student": [student_path]}
        models["rtn"] = [self.rtn(student_path, "rtn")]
        for method in ("qat", "qat_kd", "grace"):
            models[method] = [
                self.qat(student_path, method, seed, f"{method}_seed{seed}") for seed in self.settings.seeds
            ]
        if self.settings.stress:
            stressed = self.stress_student()
            models["fp_student_stress"] = [stressed]
            models["rtn_stress"] = [self.rtn(stressed, "rtn_stress")]
            models["grace_stress"] = [
                self.qat(stressed, "grace", s, f"grace_stress_seed{s}") for s in self.settings.seeds
            ]
        teacher_eval = self.evaluate("teacher", teacher_path, None)
        results = {"settings": dataclasses.asdict(self.settings), "device": self.device, "methods": {}}
        for name, paths in models.items():
            runs = [self.evaluate(name, p, None if name == "teacher" else teacher_eval["answers"]) for p in paths]
            results["methods"][name] = {
                "paths": paths,
                "runs": [{k: v for k, v in r.items() if k != "answers"} for r in runs],
            }
        results["seconds"] = time.perf_counter() - start
        return copy.deepcopy(results)
