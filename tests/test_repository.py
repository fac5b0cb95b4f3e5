"""The checkout as a newcomer meets it: one package on disk, nothing shadowing an installed package, light imports,
registration with transformers in any import order, and CI running exactly the README's commands."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ("", "benchmarks", "examples", "examples/distributed", "tests")
"""Folders that land first on ``sys.path``: the root (``python -m ...``, ``python -c``) and the script folders."""


def run_python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter started in ``cwd`` (the root: as the README's commands run)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def tracked_files(pattern: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.stdout.split()]


def importable_names(folder: Path) -> set[str]:
    """Top-level names a folder provides when it is on ``sys.path`` ahead of site-packages: modules and regular
    packages (a folder without ``__init__.py`` is a namespace portion, which never hides an installed package)."""
    names = {path.stem for path in folder.glob("*.py")}
    names |= {path.parent.name for path in folder.glob("*/__init__.py")}
    return names


def test_nothing_in_the_checkout_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {
        f"{folder or '.'}/{name}": installed[name]
        for folder in SCRIPT_FOLDERS
        for name in importable_names(ROOT / folder)
        if name in installed and "grace-quant" not in installed[name]
    }
    assert not clashes, f"these names hide installed packages when their folder leads sys.path: {clashes}"


def test_transformers_and_grace_quant_import_from_the_repository_root(fp_checkpoint):
    code = (
        "import transformers, grace_quant\n"
        f"grace_quant.AutoModelForVision2Seq.from_pretrained({fp_checkpoint('llava')!r})\n"  # loads hub kernels
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_kernels_import_neither_transformers_nor_the_hf_glue():
    code = (
        "import sys\n"
        "import grace_quant, grace_quant.kernels\n"
        "from grace_quant.kernels import dispatch, tables, tuner, packing, reference, timing, custom_op\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'evaluate'))\n"
        "glue = sorted(m for m in sys.modules if m.startswith('grace_quant.integrations'))\n"
        "print(loaded + glue)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_no_import_path_edits_in_the_repository():
    edits = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\s*\(|\[[^\]]*\]\s*=|\s*[+]?=)|__path__\s*(\.|[+]?=)")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in tracked_files("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if edits.search(line) and path.name != Path(__file__).name
    ]
    assert not found, f"sys.path / __path__ edits: {found}"


LOAD = (
    "from transformers import AutoModelForImageTextToText\n"
    "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
    "registered = AUTO_QUANTIZER_MAPPING.get('grace')\n"  # before anything below could import the glue
    "model = AutoModelForImageTextToText.from_pretrained({folder!r})\n"
    "print(registered and registered.__module__)\n"
    "print(sorted({{type(m).__name__ for m in model.modules() if type(m).__name__.startswith('Grace')}}))\n"
)


@pytest.fixture(scope="module")
def packed_folder(fp_checkpoint, tmp_path_factory):
    from grace_quant import AutoModelForVision2Seq, GraceConfig

    folder = tmp_path_factory.mktemp("packed")
    model = AutoModelForVision2Seq.from_pretrained(
        fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32, mode="packed")
    )
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "first",
    [
        "import grace_quant",  # before transformers: registered when transformers' quantizer registry loads
        "import transformers.quantizers; import grace_quant",  # registry already loaded: registered at once
        "from transformers import AutoModelForImageTextToText; import grace_quant",
        "import grace_quant.kernels",  # the package root is imported too, and so registers
        "from grace_quant.config import GraceConfig",  # the core imports transformers, not its registry
        "from grace_quant.integrations.quantizer import GraceHfQuantizer",  # the glue pulls the registry in itself
        "import grace_quant.testing",  # a module above the glue pulls the registry in
    ],
)
def test_a_grace_checkpoint_loads_whatever_was_imported_first(first, packed_folder):
    """Run from the repository root, as the README's commands run: the root must not shadow transformers' needs."""
    result = run_python(first + "\n" + LOAD.format(folder=packed_folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-2:] == ["grace_quant.integrations.quantizer", "['GraceQuantLinear']"]


def quickstart_commands(text: str) -> list[str]:
    """The commands of the README's Quickstart code block (one per line)."""
    section = text.split("## Quickstart", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_quickstart_exactly():
    readme = quickstart_commands((ROOT / "README.md").read_text())
    assert len(readme) == 2 and all(command.startswith("pip install") for command in readme), readme
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# --- README Quickstart", 1)[1].split("\n", 1)[1].split("# ---", 1)[0]
    assert [line.strip() for line in block.splitlines() if line.strip()] == readme
    assert "PIP_CONSTRAINT" not in ci.split("# --- README Quickstart", 1)[0], "CI pins versions before the README"


def test_the_readme_use_snippet_runs_as_written(tmp_path):
    """The README's Use block defines everything it uses (``ds``, ``collator``, labels, bf16 on CPU) and runs."""
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Use\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    check = (
        "\nassert all(isinstance(m, grace_quant.GraceQuantLinear) for _, m in "
        "__import__('grace_quant.surgery').surgery.grace_layers(model))\nprint('SNIPPET OK', trainer.state.global_step)"
    )
    result = run_python(snippet + check, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "SNIPPET OK 4"
    assert {"student-fp", "teacher-fp", "run", "student-int4"} <= {p.name for p in tmp_path.iterdir()}


def test_ci_installs_the_lmms_extra_as_the_readme_says():
    """The lmms-eval environment: the torch/torchvision pair and extras the README gives are what CI installs."""
    readme = (ROOT / "README.md").read_text().split("## Evaluate with lmms-eval", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"`(pip install torch==[^`]*\[test,lmms\][^`]*)`", readme)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    assert "python -m pytest -q tests/test_lmms.py tests/test_cli.py" in ci_lines
