"""The demo's outputs: a terminal table, ``results.json``, PNG plots, and an honest check of the targets."""

from __future__ import annotations

import json
import math
import os

LABELS = {
    "teacher": "teacher (fp32)", "fp_student": "fp student (fp32)", "rtn": "RTN INT4", "qat": "QAT INT4",
    "qat_kd": "QAT+KD INT4", "grace": "GRACE INT4", "fp_student_stress": "fp student, outliers (fp32)",
    "rtn_stress": "RTN INT4, outliers", "grace_stress": "GRACE INT4, outliers",
}  # fmt: skip
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def interval(values: list[float], hits: list[list[int]]) -> tuple[float, float]:
    """Mean and 95% half-width: a t interval over seeds, or a binomial interval over questions for one run."""
    mean = sum(values) / len(values)
    if len(values) > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return mean, T_975.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    n = len(hits[0])
    return mean, 1.96 * math.sqrt(max(mean * (1 - mean), 1e-12) / n)


def paired(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """Mean and 95% half-width of model a's exact match minus model b's on the same questions (each model's hits
    averaged over its runs first): pairing removes the questions' own difficulty from the interval."""
    n = len(a[0])
    diffs = [sum(r[i] for r in a) / len(a) - sum(r[i] for r in b) / len(b) for i in range(n)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1))
    return mean, 1.96 * sd / math.sqrt(n)


def summarise(results: dict) -> dict[str, dict]:
    rows = {}
    for name, entry in results["methods"].items():
        runs = entry["runs"]
        em, half = interval([r["exact_match"] for r in runs], [r["hits"] for r in runs])
        row = {"exact_match": em, "ci95": half, "seeds": len(runs), "bytes": runs[0]["bytes"]}
        row["hits"] = [r["hits"] for r in runs]
        kinds = runs[0]["per_type"]
        row["per_type"] = {k: sum(r["per_type"][k] for r in runs) / len(runs) for k in kinds}
        for key in ("token_kl", "same_answer"):
            if key in runs[0]:
                row[key] = sum(r[key] for r in runs) / len(runs)
        rows[name] = row
    return rows


def table(rows: dict[str, dict]) -> str:
    kinds = sorted(next(iter(rows.values()))["per_type"])
    head = ["model", "exact match (95% CI)", *kinds, "token KL vs teacher", "same answer", "size (KB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [LABELS.get(name, name), f"{100 * row['exact_match']:.1f} ± {100 * row['ci95']:.1f}"]
        cells += [f"{100 * row['per_type'][k]:.1f}" for k in kinds]
        cells += [
            f"{row['token_kl']:.4f}" if "token_kl" in row else "-",
            f"{100 * row['same_answer']:.1f}" if "same_answer" in row else "-",
        ]
        cells.append(f"{row['bytes'] / 1024:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(rows: dict[str, dict]) -> list[str]:
    """The issue's targets, each stated with the numbers that decide it (no tuning until they hold); differences
    between two models carry a paired 95% interval over the test questions."""
    out = []
    g, fp, teacher = rows["grace"], rows["fp_student"], rows["teacher"]
    lead, half = paired(teacher["hits"], fp["hits"])
    verdict = "holds" if lead - half > 0 else "does NOT hold"
    out.append(
        f"the teacher leads the fp student (something to distil): {100 * lead:+.1f} ± {100 * half:.1f} points -> {verdict}"
    )
    gap, half = paired(g["hits"], fp["hits"])
    verdict = "holds" if g["exact_match"] >= fp["exact_match"] else "does NOT hold"
    out.append(
        f"GRACE INT4 >= fp student in exact match: {100 * g['exact_match']:.1f} vs {100 * fp['exact_match']:.1f} "
        f"({100 * gap:+.1f} ± {100 * half:.1f}) -> {verdict}"
    )
    for other in ("qat", "rtn"):
        o = rows[other]
        verdict = "holds" if g["token_kl"] < o["token_kl"] else "does NOT hold"
        out.append(
            f"GRACE beats {LABELS[other]} on KL to the teacher: {g['token_kl']:.4f} vs {o['token_kl']:.4f} -> {verdict}"
        )
    if "rtn_stress" in rows:
        base, rtn, grace = (rows[k]["exact_match"] for k in ("fp_student_stress", "rtn_stress", "grace_stress"))
        loss = base - rtn
        out.append(
            f"outlier stress: RTN INT4 loses {100 * loss:.1f} points (target >= 1.0) -> {'holds' if loss >= 0.01 else 'does NOT hold'}"
        )
        if loss > 0:
            recovered = (grace - rtn) / loss
            out.append(
                f"outlier stress: GRACE recovers {100 * recovered:.0f}% of it (target >= 80%) -> {'holds' if recovered >= 0.8 else 'does NOT hold'}"
            )
    return out


def plot(results: dict, rows: dict[str, dict], workdir: str) -> list[str]:
    """accuracy.png (exact match per model with 95% intervals) and grace_training.png (losses and beta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    values = [100 * rows[n]["exact_match"] for n in names]
    errors = [100 * rows[n]["ci95"] for n in names]
    colors = ["#555555" if n in ("teacher", "fp_student", "fp_student_stress") else "#1f77b4" for n in names]
    colors = ["#d62728" if n.startswith("grace") else c for n, c in zip(names, colors, strict=True)]
    ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], rotation=30, ha="right")
    ax.set_ylabel("exact match (%)")
    seeds = max(r["seeds"] for r in rows.values())
    bars = (
        "95% CI: t over seeds for multi-seed runs, binomial over questions otherwise"
        if seeds > 1
        else "95% CI (binomial)"
    )
    ax.set_title(f"MNIST-grid VQA, {results['settings']['test_size']} test questions; {bars}", fontsize=10)
    low = min(v - e for v, e in zip(values, errors, strict=True))
    ax.set_ylim(max(0, low - 5), 100)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "accuracy.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    log_path = os.path.join(results["methods"]["grace"]["paths"][0], "trainer_log.json")
    if os.path.exists(log_path):
        with open(log_path) as handle:
            logs = [e for e in json.load(handle) if "loss" in e and "ce" in e]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        steps = [e["step"] for e in logs]
        for key in ("ce", "gdkd", "rcka"):
            axes[0].plot(steps, [e[key] for e in logs], label=key)
        axes[0].set_xlabel("optimizer step")
        axes[0].set_title("GRACE loss components")
        axes[0].legend()
        axes[1].plot(steps, [e["beta"] for e in logs], color="#d62728", label="beta")
        axes[1].plot(steps, [e["gdkd_ema"] for e in logs], color="#2ca02c", label="GDKD EMA")
        axes[1].set_xlabel("optimizer step")
        axes[1].set_title("Lagrangian controller")
        axes[1].legend()
        fig.tight_layout()
        paths.append(os.path.join(workdir, "grace_training.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(results: dict, workdir: str) -> str:
    """Writes results.json and the plots; returns the text printed to the terminal."""
    rows = summarise(results)
    checks = target_checks(rows)
    summary = {**results, "summary": {n: {k: v for k, v in r.items() if k != "hits"} for n, r in rows.items()}}
    summary["targets"] = checks
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as handle:
        json.dump(summary, handle, indent=2)
    os.replace(tmp, os.path.join(workdir, "results.json"))
    plots = plot(results, rows, workdir)
    lines = [
        table(rows),
        "",
        *checks,
        "",
        f"results: {os.path.join(workdir, 'results.json')}",
        *(f"plot: {p}" for p in plots),
    ]
    lines.append(f"total time: {results['seconds'] / 60:.1f} min on {results['device']}")
    return "\n".join(lines)
