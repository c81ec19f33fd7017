"""``posttrain report``: one self-contained HTML page of a run's curves (or several runs overlaid), with PNGs.

The page is drawn from what every run leaves in its folder: ``metrics.jsonl`` (one JSON object per logging event),
``recipe.yaml`` (resolved) and ``summary.json``. Which plots are drawn is data-driven: :data:`SIGNALS` maps each
signal (one plot) to the metric names it shows, as regular expressions; a signal none of whose metrics were logged is
skipped. Logged metrics that no signal claims are drawn under "Other", one plot per name prefix, so nothing logged is
hidden. Several runs share each plot's axes, one colour per run. Plots are drawn with matplotlib's Agg backend
(no display needed) and embedded in the page as base64 PNG, so the page opens offline; the same PNGs are written to
``<page name>_plots/`` next to it. docs/observability.md describes the page.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import UserError

logger = logging.getLogger("posttrain")


@dataclasses.dataclass(frozen=True)
class Signal:
    """One plot: its id (the PNG name and the page's ``data-signal``), title, page section, and the metric names it
    shows (regular expressions, matched in full)."""

    id: str
    title: str
    section: str
    patterns: tuple[str, ...]
    yscale: str = "linear"


def _s(id: str, title: str, section: str, *patterns: str, yscale: str = "linear") -> Signal:
    return Signal(id, title, section, tuple(patterns), yscale)


# The signal groups, in page order. A metric is claimed by the first signal that matches it.
SIGNALS: list[Signal] = [
    _s("loss", "Training loss", "Optimisation", r"loss"),
    _s("learning_rate", "Learning rate", "Optimisation", r"learning_rate"),
    _s("grad_norm", "Gradient norm (before clipping)", "Optimisation", r"grad_norm"),
    _s("eval_loss", "Eval loss (data.eval)", "Evaluation", r"eval_loss"),
    _s("test_accuracy", "Test accuracy (data.test, greedy)", "Evaluation", r"eval_test_accuracy",
       r"summary/test_accuracy"),
    _s("pass_at_k", "pass@k (data.test, sampled)", "Evaluation", r"eval_test_pass@\d+",
       r"eval_test_mean_sample_accuracy"),
    _s("token_accuracy", "Next-token accuracy", "Evaluation", r"(eval_)?mean_token_accuracy"),
    _s("entropy", "Token entropy", "Evaluation", r"(eval_)?entropy"),
    # SFT family
    _s("sft_terms", "SFT loss terms", "SFT", r"(eval_)?(nll|dft_loss|ce_loss)"),
    _s("poft", "PoFT: target vs aligned models", "SFT", r"(eval_)?poft/.+"),
    _s("kl", "KL to the reference / anchor", "Regularisation", r"(eval_)?kl", r"(eval_)?ppo_kl", r"(eval_)?retain_kl"),
    # preference family
    _s("reward_margins", "Reward margin (chosen - rejected)", "Preference", r"(eval_)?rewards/margins"),
    _s("reward_accuracies", "Reward accuracy (chosen > rejected)", "Preference", r"(eval_)?rewards/accuracies"),
    _s("rewards", "Implicit rewards: chosen vs rejected", "Preference", r"(eval_)?rewards/(chosen|rejected)"),
    _s("logps", "Log-probabilities: chosen vs rejected", "Preference", r"(eval_)?logps/(chosen|rejected)(_sum)?"),
    _s("logits", "Mean logits: chosen vs rejected", "Preference", r"(eval_)?logits/(chosen|rejected)"),
    _s("wpo", "WPO weights", "Preference", r"(eval_)?wpo/.+"),
    _s("sparsepo", "SparsePO masks", "Preference", r"(eval_)?sparsepo/.+"),
    _s("asft", "ASFT terms", "Preference", r"(eval_)?asft/.+", r"(eval_)?log_odds/.+"),
    # RL family
    _s("reward", "Reward mean (total and per reward function)", "RL", r"(eval_)?reward",
       r"(eval_)?rewards/.+/mean"),
    _s("reward_std", "Reward std (total and per reward function)", "RL", r"(eval_)?reward_std",
       r"(eval_)?rewards/.+/std"),
    _s("completion_length", "Completion length (tokens)", "RL",
       r"(eval_)?completions/(mean|min|max)_(terminated_)?length"),
    _s("truncated", "Completions cut at max length", "RL", r"(eval_)?completions/clipped_ratio"),
    _s("clip_ratio", "Clip fractions", "RL", r"clip_ratio/.+"),
    _s("policy_loss", "Policy loss terms", "RL", r"policy_loss", r"gppo/.+"),
    _s("advantages", "Advantages", "RL", r"advantages/(mean|std|min|max)"),
    _s("group_stats", "Groups: solved / unsolved / zero-variance fractions", "RL", r"frac_reward_zero_std",
       r"advantages/frac_zero", r"rl/frac_.+", r"rl/correct_frac", r"rl/kept_rows_frac"),
    _s("correct_counts", "Correct / incorrect completions", "RL", r"rl/(correct|incorrect)_count",
       r"rl/effective_examples"),
    _s("stratified", "Stratified advantages (SAN) diagnostics", "RL", r"san/frac_.+", r"san/cross_stratum_bias",
       r"san/adv_abs_diff"),
    _s("strata", "Strata per group and mean stratum key", "RL", r"san/num_strata_per_group", r"san/stratum_key_mean"),
    _s("stratum_rewards", "Reward mean per stratum", "RL", r"san/reward_mean/.+"),
    _s("delta_l", "ΔL: per-sample weights", "RL", r"delta_l/weight_.+"),
    _s("delta_l_lengths", "ΔL: completion lengths", "RL", r"delta_l/length_.+"),
    _s("delta_l_normalizer", "ΔL: normaliser", "RL", r"delta_l/normali[sz]er"),
    # unlearning family
    _s("answer_prob", "Answer probability on training batches: forget vs retain", "Unlearning",
       r"(forget|retain)_answer_prob"),
    _s("qa_prob", "Answer probability (Q_A_Prob) on the evaluation sets", "Unlearning",
       r"eval_.+_Q_A_Prob(_normalised)?"),
    _s("truth_ratio", "Truth ratio (forget, holdout: mean min(TR, 1/TR); retain, world: mean max(0, 1-TR))",
       "Unlearning",
       r"eval_.+_(truth_ratio|Truth_Ratio)"),
    _s("rouge", "ROUGE-L recall of greedy answers", "Unlearning", r"eval_.+_Q_A_ROUGE"),
    _s("model_utility", "Model utility", "Unlearning", r"eval_model_utility"),
    _s("forget_quality", "Forget quality (KS p-value vs the retain model; higher is better)", "Unlearning",
       r"eval_forget_quality", yscale="log"),
    _s("mia", "Membership-inference AUC, forget vs holdout (closer to the retain model's / 0.5 is better)",
       "Unlearning", r"eval_mia_.+"),
    _s("privleak", "Privacy leakage (privleak, %; 0 is ideal, < 0: the forget set is still detectable)", "Unlearning",
       r"eval_privleak"),
    _s("memorisation", "Memorisation (ROUGE-L F1): verbatim and knowledge of the forget set (lower is better), "
       "knowledge of the retain set (higher is better)", "Unlearning", r"eval_(verbmem_f|knowmem_f|knowmem_r)"),
    _s("extraction", "Extraction strength and exact memorisation of the forget set (lower is better)", "Unlearning",
       r"eval_(extraction_strength|exact_memorization)"),
    _s("unlearning_terms", "Forget / retain loss terms", "Unlearning", r"(forget|retain)_loss"),
    _s("unlearning_nll", "Forget / retain answer NLL on training batches", "Unlearning", r"(forget|retain)_nll"),
    _s("npo", "NPO / SimNPO weights", "Unlearning", r"(npo|simnpo)/.+"),
    # adapters
    _s("plora", "PeriodicLoRA", "Adapters", r"plora/.+"),
    _s("goat", "GOAT experts", "Adapters", r"goat/.+"),
    _s("ggpo", "LoRA-GGPO perturbation", "Adapters", r"ggpo/.+"),
]
SECTIONS = ["Optimisation", "Evaluation", "SFT", "Preference", "RL", "Unlearning", "Regularisation", "Adapters",
            "Other"]
# Bookkeeping values that are not curves.
IGNORED = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
           "train_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_periodic_runtime",
           "step_time", "num_tokens", "eval_num_tokens"}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


@dataclasses.dataclass
class Run:
    """One run folder: its name on the page, metric series ``{name: [(step, value), ...]}``, recipe and summary."""

    name: str
    path: Path
    series: dict[str, list[tuple[float, float]]]
    recipe: dict[str, Any] | None
    summary: dict[str, Any] | None


@dataclasses.dataclass
class Plot:
    signal: Signal
    metrics: list[str]
    labels: list[str]
    png: bytes


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a last line cut short by a crash is skipped with a warning."""
    rows, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                logger.warning("%s:%d: skipped a truncated last line", path, i)
                continue
            raise UserError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{path}:{i}: expected a JSON object with a 'step'")
        rows.append(row)
    return rows


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run folder (``metrics.jsonl``, and ``recipe.yaml`` / ``summary.json`` when present)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: run directory not found")
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(f"{path}: no metrics.jsonl (not a posttrain run directory, or a run that has not logged yet)")
    series: dict[str, list[tuple[float, float]]] = {}
    for row in read_metrics(metrics_file):
        step = _number(row["step"])
        for key, value in row.items():
            v = _number(value)
            if key in IGNORED or v is None or step is None:
                continue
            series.setdefault(key, []).append((step, v))
    recipe = summary = None
    if (path / "recipe.yaml").is_file():
        recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        # the before/after accuracy on the whole data.test, as two points of the test-accuracy plot
        last = float(summary.get("steps") or 0)
        points = [(0.0, summary.get("accuracy_before")), (last, summary.get("accuracy_after"))]
        points = [(s, float(v)) for s, v in points if _number(v) is not None]
        if points:
            series["summary/test_accuracy"] = points
    return Run(name or path.resolve().name, path, series, recipe, summary)


def _unique_names(paths: list[Path]) -> list[str]:
    """Folder names, made unique with their parents' names where two runs share one."""
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


def assign_metrics(names: set[str]) -> list[tuple[Signal, list[str]]]:
    """Each signal with the logged metric names it shows (in a stable order); unclaimed names grouped under
    "Other" by their prefix. Signals with no metric are left out."""
    claimed: set[str] = set()
    out = []
    for signal in SIGNALS:
        found = sorted(n for n in names - claimed if any(re.fullmatch(p, n) for p in signal.patterns))
        found.sort(key=lambda n: next(i for i, p in enumerate(signal.patterns) if re.fullmatch(p, n)))
        if found:
            claimed.update(found)
            out.append((signal, found))
    others: dict[str, list[str]] = {}
    for n in sorted(names - claimed):
        prefix = n.removeprefix("eval_").split("/")[0]
        others.setdefault(prefix, []).append(n)
    for prefix, found in others.items():
        sid = "other_" + re.sub(r"[^A-Za-z0-9_]+", "_", prefix).strip("_")
        out.append((Signal(sid, prefix, "Other", tuple(re.escape(n) for n in found)), found))
    return out


def _label(metric: str) -> str:
    return "full data.test (before / after)" if metric == "summary/test_accuracy" else metric


def draw(signal: Signal, metrics: list[str], runs: list[Run]):
    """One matplotlib figure (Agg, no pyplot) with every run's series of ``metrics`` on the same axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(max(len(runs), len(metrics)))]
    labels = []
    for r, run in enumerate(runs):
        for m, metric in enumerate(metrics):
            points = run.series.get(metric)
            if not points:
                continue
            xs, ys = zip(*points)
            if len(runs) > 1:  # one colour per run, one line style per metric
                colour, style = colours[r], LINESTYLES[m % len(LINESTYLES)]
                label = run.name if len(metrics) == 1 else f"{run.name} · {_label(metric)}"
            else:
                colour, style = colours[m], "-"
                label = _label(metric)
            if metric == "summary/test_accuracy":
                style = "none"
            marker = MARKERS[m % len(MARKERS)] if len(points) <= 60 or metric == "summary/test_accuracy" else None
            ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4 if marker else 0, color=colour,
                    label=label, linewidth=1.5)
            labels.append(label)
    values = [v for run in runs for m in metrics for _, v in run.series.get(m, [])]
    if signal.yscale == "log" and min(values) > 0 and max(values) / min(values) >= 100:  # log only when it helps
        ax.set_yscale("log")
    ax.set_title(signal.title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(labels) > 6 else 1, loc="best")
    fig.subplots_adjust(left=0.12, right=0.98, top=0.91, bottom=0.13)  # fixed margins: tight_layout costs 2x the draw
    return fig, labels


# Forget vs utility (unlearning): the first logged metric of each list is drawn against the first of the other.
FORGET_METRICS = ("eval_knowmem_f", "eval_verbmem_f", "eval_forget_Q_A_Prob")
UTILITY_METRICS = ("eval_knowmem_r", "eval_model_utility", "eval_retain_Q_A_Prob")
FORGET_UTILITY = _s("forget_utility", "Forget vs utility over steps (forget: lower is better; utility: higher)",
                    "Unlearning")
TRADEOFF = _s("forget_utility_scatter", "Forget / utility trade-off per run (star: last evaluation; top left is best)",
              "Unlearning")


def forget_utility_pair(names: set[str]) -> tuple[str, str] | None:
    """The (forget metric, utility metric) the trade-off plots show, or None when either is missing."""
    forget = next((m for m in FORGET_METRICS if m in names), None)
    utility = next((m for m in UTILITY_METRICS if m in names), None)
    return (forget, utility) if forget and utility else None


def draw_tradeoff(pair: tuple[str, str], runs: list[Run]):
    """Utility against forgetting: one line per run through its evaluations (x: the forget metric, y: utility)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    forget, utility = pair
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = []
    for r, run in enumerate(runs):
        ys = dict(run.series.get(utility, []))
        points = [(x, ys[step]) for step, x in run.series.get(forget, []) if step in ys]
        if not points:
            continue
        xs, us = zip(*points)
        colour = f"C{r % 10}"
        ax.plot(xs, us, marker="o", markersize=3, color=colour, linewidth=1.2, label=run.name)
        ax.plot(xs[-1:], us[-1:], marker="*", markersize=12, color=colour, linestyle="none")
        labels.append(run.name)
    ax.set_title(TRADEOFF.title, fontsize=9)
    ax.set_xlabel(f"{forget} (forget; lower is better)", fontsize=8)
    ax.set_ylabel(f"{utility} (utility)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.14)
    return fig, labels


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def build_plots(runs: list[Run]) -> list[Plot]:
    """Every non-empty signal of ``runs`` drawn as PNG bytes, and for unlearning runs the forget / utility plots."""
    names = {n for run in runs for n, points in run.series.items() if points}
    plots = []
    for signal, metrics in assign_metrics(names):
        fig, labels = draw(signal, metrics, runs)
        plots.append(Plot(signal, metrics, labels, _png(fig)))
    pair = forget_utility_pair(names)
    if pair is not None:
        fig, labels = draw(FORGET_UTILITY, list(pair), runs)
        plots.append(Plot(FORGET_UTILITY, list(pair), labels, _png(fig)))
        fig, labels = draw_tradeoff(pair, runs)
        plots.append(Plot(TRADEOFF, list(pair), labels, _png(fig)))
    return plots


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "null" if value is None else str(value)


def _table(title_row: list[str], rows: list[tuple[str, list[Any]]], table_id: str) -> str:
    """A key x runs table; rows whose values differ between runs get class ``diff``."""
    e = html.escape
    out = [f'<table id="{table_id}"><thead><tr>' + "".join(f"<th>{e(t)}</th>" for t in title_row) + "</tr></thead>",
           "<tbody>"]
    for key, values in rows:
        texts = [_value_text(v) for v in values]
        cls = ' class="diff"' if len(values) > 1 and len(set(texts)) > 1 else ""
        out.append(f"<tr{cls}><th>{e(key)}</th>" + "".join(f"<td>{e(t)}</td>" for t in texts) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:16px 24px;
color:#1d2330;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #d5d9e0;padding-bottom:4px;margin-top:1.6em}
nav a{margin-right:12px;color:#2b5bb5;text-decoration:none}.meta{color:#5a6270;font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
figure.plot{margin:0;border:1px solid #e1e4ea;border-radius:6px;padding:6px;background:#fafbfc}
figure.plot img{width:100%;height:auto;display:block}
figcaption{font-size:.8em;color:#5a6270;padding:4px 2px 0;word-break:break-word}
table{border-collapse:collapse;font-size:.85em;margin:6px 0}th,td{border:1px solid #e1e4ea;padding:3px 8px;
text-align:left;vertical-align:top}thead th{background:#f0f2f5}tbody th{font-weight:normal;color:#3a4150;
font-family:ui-monospace,monospace}td{font-family:ui-monospace,monospace;max-width:520px;word-break:break-word}
tr.diff td{background:#fff6d6;font-weight:600}
"""


def render_html(runs: list[Run], plots: list[Plot], png_names: dict[str, str] | None = None) -> str:
    """The page: runs, plots by section (PNG embedded as base64), summary and resolved recipe tables."""
    e = html.escape
    names = [run.name for run in runs]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [s for s in SECTIONS if any(p.signal.section == s for p in plots)]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>posttrain report: {e(', '.join(names))}</title><style>{CSS}</style></head><body>",
             "<header><h1>posttrain report</h1>",
             f'<p class="meta">{len(runs)} run{"s" if len(runs) > 1 else ""}: {e(", ".join(names))} · '
             f"{len(plots)} plots · written {now}</p><nav>"]
    parts += [f'<a href="#section-{s.lower()}">{e(s)}</a>' for s in sections]
    parts.append('<a href="#runs">Runs</a><a href="#summary">Summary</a><a href="#recipe">Recipe</a></nav></header>')

    for section in sections:
        parts.append(f'<section id="section-{section.lower()}"><h2>{e(section)}</h2><div class="grid">')
        for p in (p for p in plots if p.signal.section == section):
            b64 = base64.b64encode(p.png).decode("ascii")
            file_note = f" · {png_names[p.signal.id]}" if png_names and p.signal.id in png_names else ""
            parts.append(
                f'<figure class="plot" id="plot-{e(p.signal.id)}" data-signal="{e(p.signal.id)}" '
                f'data-metrics="{e(" ".join(p.metrics))}" data-labels="{e(json.dumps(p.labels))}">'
                f'<img alt="{e(p.signal.id)}: {e(p.signal.title)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{e(', '.join(p.metrics))}{e(file_note)}</figcaption></figure>"
            )
        parts.append("</div></section>")

    parts.append('<section id="runs"><h2>Runs</h2>')
    rows = [("folder", [str(r.path) for r in runs]),
            ("method", [(r.recipe or {}).get("method", {}).get("name") for r in runs]),
            ("model", [_flatten((r.recipe or {}).get("model")).get("path") for r in runs])]
    parts.append(_table(["run", *names], rows, "runs-table") + "</section>")

    parts.append('<section id="summary"><h2>Summary (summary.json)</h2>')
    keys = list(dict.fromkeys(k for r in runs for k in _flatten(r.summary or {}) if k))
    if keys:
        flat = [_flatten(r.summary or {}) for r in runs]
        parts.append(_table(["key", *names], [(k, [f.get(k) for f in flat]) for k in keys], "summary-table"))
    else:
        parts.append("<p>No summary.json (the run has not finished).</p>")
    parts.append("</section>")

    parts.append('<section id="recipe"><h2>Recipe (resolved recipe.yaml)</h2>')
    if len(runs) > 1:
        parts.append('<p class="meta">Highlighted rows differ between runs.</p>')
    keys = list(dict.fromkeys(k for r in runs for k in _flatten(r.recipe or {}) if k))
    if keys:
        flat = [_flatten(r.recipe or {}) for r in runs]
        parts.append(_table(["key", *names], [(k, [f.get(k) for f in flat]) for k in keys], "recipe-table"))
    else:
        parts.append("<p>No recipe.yaml.</p>")
    parts.append("</section></body></html>\n")
    return "\n".join(parts)


def write_report(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Write the report of ``run_dirs`` to ``output`` (default ``RUN_DIR/report.html`` for one run, else
    ``report.html``) and its PNGs to ``<output stem>_plots/``; return the page's path."""
    if not run_dirs:
        raise UserError("RUN_DIR: give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    names = _unique_names(paths)
    runs = [load_run(p, n) for p, n in zip(paths, names, strict=True)]
    out = Path(output) if output else (paths[0] / "report.html" if len(paths) == 1 else Path("report.html"))
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--output: expected an .html file name, got '{out}'")
    plots = build_plots(runs)
    png_dir = out.with_name(out.stem + "_plots")
    png_dir.mkdir(parents=True, exist_ok=True)
    for old in png_dir.glob("*.png"):
        old.unlink()
    png_names = {}
    for p in plots:
        (png_dir / f"{p.signal.id}.png").write_bytes(p.png)
        png_names[p.signal.id] = f"{png_dir.name}/{p.signal.id}.png"
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.write_text(render_html(runs, plots, png_names))
    tmp.replace(out)
    return out
