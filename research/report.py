"""The experiment's report: markdown tables, an honest verdict, PNG plots (research.experiment).

results: (variant, seed) -> {"evals": [(tokens, val_loss)], "tokens_per_sec", "cond_before",
"cond_after" (per layer: name -> kappa, median over heads), "cond_logged" (tag -> [(step, value)])}.
Spreads are over seeds: mean ± sample standard deviation (min-max, n).
With --sweep the keys are (point, variant, seed) and the report is the sweep's (write_sweep_report).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from core.config import check_output_path
from core.errors import ConfigError
from core.files import write_atomic
from model.config import ModelConfig
from model.probe import PROBED
from research.conditioning import jsonable, kappa_fmt


# ---- statistics ----------------------------------------------------------------------------
def summary(xs: list[float]) -> dict:
    """mean, sample sd (None for one value), min, max, n of the finite values."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    sd = statistics.stdev(xs) if len(xs) > 1 else None
    return {"mean": statistics.fmean(xs), "sd": sd, "min": min(xs), "max": max(xs), "n": len(xs)}


def final_loss(run: dict) -> float | None:
    return run["evals"][-1][1] if run.get("evals") else None


def common_tokens(runs) -> list[int]:
    """The token counts at which every run was evaluated, ascending."""
    return sorted(set.intersection(*(set(t for t, _ in r["evals"]) for r in runs)))


def fmt_summary(s: dict, digits: int = 4) -> str:
    if s["n"] == 0:
        return "n/a"
    if s["sd"] is None:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"


def val_at(evals: list, tokens: int) -> float | None:
    """Validation loss at `tokens`, linearly interpolated between evaluations."""
    for (t0, v0), (t1, v1) in zip(evals, evals[1:], strict=False):
        if t0 <= tokens <= t1:
            return v0 + (v1 - v0) * (tokens - t0) / max(t1 - t0, 1)
    return evals[0][1] if evals and evals[0][0] == tokens else None


def tokens_to_reach(evals: list, target: float) -> float | None:
    """Tokens at which the validation loss first reaches `target` (interpolated), None if never."""
    prev = None
    for t, v in evals:
        if v <= target:
            if prev is None or prev[1] == v:
                return float(t)
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - v)
        prev = (t, v)
    return None


def tokens_fmt(x: float) -> str:
    return f"{x:.0f}" if x < 1e4 else f"{x / 1e3:.0f}k" if x < 1e6 else f"{x / 1e6:.2f}M"


def median(xs: list[float]) -> float | None:
    """Median that keeps infinities (a singular matrix is a result, not a gap)."""
    xs = sorted(x for x in xs if x is not None)
    return statistics.median(xs) if xs else None


# ---- tables ---------------------------------------------------------------------------------
def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, a line per row of cells."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def by_variant(args, results: dict) -> dict[str, list[dict]]:
    """variant -> its runs over the seeds; a partial report leaves out what has not finished."""
    runs = {v: [results[v, s] for s in args.seeds if (v, s) in results] for v in args.variants}
    return {v: r for v, r in runs.items() if r}


def fixed_tokens(results: dict) -> list[int]:
    """Up to three evaluation points every run shares (a quarter, half, three quarters in)."""
    common = common_tokens(results.values())
    inner = common[:-1]
    if len(inner) <= 3:
        return inner
    return sorted({inner[int(len(common) * f) - 1] for f in (0.25, 0.5, 0.75)})


def loss_table(args, results: dict, target: float) -> list[str]:
    points = fixed_tokens(results)
    head = ["variant", *[f"val loss @ {tokens_fmt(t)} tok" for t in points], "final val loss", "Δ final vs none"]
    head += [f"tokens to val {target:.3f}", "tokens/s (median)"]
    rows = []
    base = summary([final_loss(r) for r in by_variant(args, results).get("none", [])])
    for v, runs in by_variant(args, results).items():
        final = summary([final_loss(r) for r in runs])
        cells = [f"`{v}`", *[fmt_summary(summary([val_at(r["evals"], t) for r in runs])) for t in points]]
        delta = final["mean"] - base["mean"] if base["n"] and final["n"] else None
        cells += [fmt_summary(final), "n/a" if delta is None else "-" if v == "none" else f"{delta:+.4f}"]
        reach = [tokens_to_reach(r["evals"], target) for r in runs]
        missed = sum(x is None for x in reach)
        reached = summary(reach)
        cells.append(
            ("n/a" if not reached["n"] else fmt_tokens_summary(reached))
            + (f" ({missed}/{len(runs)} never)" if missed else "")
        )
        tps = summary([r["tokens_per_sec"] for r in runs])
        rows.append([*cells, "n/a" if not tps["n"] else f"{tps['mean']:.0f}"])
    return md_table(head, rows)


def layer_kappa(runs: list[dict], which: str, layer: int, name: str) -> float | None:
    """Median over seeds of one layer's kappa (itself the median over heads)."""
    return median([r[which][layer][name] for r in runs if len(r[which]) > layer])


def cond_table(args, results: dict) -> list[str]:
    """Per variant and layer: kappa before -> after training (median over heads, then seeds)."""
    head = ["variant", "layer", "O before", "O after", "O_plain after", "Q / Q_plain after", "K / K_plain after"]
    head += ["A after", "A_plain after"]
    rows = []
    for v, runs in by_variant(args, results).items():
        for i in range(max(len(r["cond_after"]) for r in runs)):
            after = {n: kappa_fmt(layer_kappa(runs, "cond_after", i, n)) for n in PROBED}
            cells = [f"`{v}`", str(i), kappa_fmt(layer_kappa(runs, "cond_before", i, "O")), after["O"]]
            cells += [after["O_plain"], f"{after['Q']} / {after['Q_plain']}", f"{after['K']} / {after['K_plain']}"]
            rows.append([*cells, after["A"], after["A_plain"]])
    return md_table(head, rows)


# ---- the verdict ----------------------------------------------------------------------------
def verdict(args, results: dict) -> list[str]:
    """Which variant ended lowest, whether the gap beats the seed noise, what would settle it."""
    finals = {v: summary([final_loss(r) for r in runs]) for v, runs in by_variant(args, results).items()}
    best = min(finals, key=lambda v: finals[v]["mean"])
    n = len(args.seeds)
    lines = [f"- Lowest mean final validation loss: `{best}` ({fmt_summary(finals[best])})."]
    if "none" in finals:
        for v, s in finals.items():
            if v != "none":
                lines.append("- " + compare(v, s, finals["none"]))
    if n < 2:
        lines.append("- One seed only: the spread is unknown, so no difference here is evidence; run >= 3 seeds.")
    default = ModelConfig().precondition
    if default in finals and best != default:
        lines.append(
            f"- Default (`{default}`) versus the best here: "
            + compare(best, finals[best], finals[default], default)
            + " Change the default only when this gap is larger than 2 SE, and say why in the README."
        )
    lines.append(conditioning_line(args, results))
    lines.append(
        "- Scale: this is a small model over a small token budget on one machine. A firm conclusion on "
        "training efficiency needs enough seeds for the gaps above (see the seed estimates), and runs "
        "long and large enough for the paper's setting (e.g. configs/gpu-125m.yaml over >= 1B tokens, "
        ">= 3 seeds), reporting tokens-to-target-loss with error bars."
    )
    return lines


def compare(v: str, s: dict, base: dict, base_name: str = "none") -> str:
    """One variant's final loss against a baseline's, with the standard error of the gap (each
    a mean over the seeds it has, which a partial report may make unequal)."""
    d = s["mean"] - base["mean"]
    word = "lower" if d < 0 else "higher"
    n = min(s["n"], base["n"])
    if n < 2 or s["sd"] is None or base["sd"] is None:
        return f"`{v}` vs `{base_name}`: {abs(d):.4f} {word} (one seed: no error bar)."
    se = math.sqrt(s["sd"] ** 2 / s["n"] + base["sd"] ** 2 / base["n"])
    firm = abs(d) > 2 * se
    need = math.ceil(8 * ((s["sd"] ** 2 + base["sd"] ** 2) / 2) / d**2) if d else None
    text = f"`{v}` vs `{base_name}`: {abs(d):.4f} {word}, standard error of the gap {se:.4f} over {n} seeds: "
    if firm:
        return text + "larger than 2 SE, a difference at this scale."
    more = f"about {need} seeds per variant would resolve a gap this size" if need else "no gap at all"
    return text + f"within 2 SE, not distinguishable from seed noise ({more})."


def conditioning_line(args, results: dict) -> str:
    """The paper's first claim, checked: does the preconditioner lower kappa(O) of the same q, k, v?"""
    parts = []
    for v, runs in by_variant(args, results).items():
        if v == "none":
            continue
        layers = [layer for r in runs for layer in r["cond_after"]]
        ratios = [layer["O_plain"] / layer["O"] for layer in layers if math.isfinite(layer["O"] or math.inf)]
        if ratios:
            parts.append(f"`{v}` {median(ratios):.2g}x")
    if not parts:
        return "- Condition numbers: no after-training probe results."
    return (
        "- kappa(O_plain) / kappa(O) after training, same q, k, v, median over layers and seeds "
        "(> 1: the preconditioner lowers the head outputs' condition number): " + ", ".join(parts) + "."
    )


# ---- plots ----------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend: PNG files, no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Lay the figure out, write it to `path` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_loss(args, results: dict, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for v, runs in by_variant(args, results).items():
        tokens = common_tokens(runs)
        vals = [[dict(r["evals"])[t] for r in runs] for t in tokens]
        ax.plot(tokens, [statistics.fmean(x) for x in vals], marker="o", ms=3, label=v)
        ax.fill_between(tokens, [min(x) for x in vals], [max(x) for x in vals], alpha=0.2)
    ax.set(
        xlabel="tokens",
        ylabel="validation loss",
        title=f"validation loss (mean, band: min-max over {len(args.seeds)} seeds)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)


def plot_conditioning(args, results: dict, path: Path) -> None:
    """Bars: kappa before/after training (median over layers and seeds); logged curves if any."""
    logged = any(r["cond_logged"] for r in results.values())
    fig, axes = pyplot().subplots(1, 2 if logged else 1, figsize=(13 if logged else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    bars = [("cond_before", "O"), ("cond_after", "O"), ("cond_after", "O_plain")]
    bars += [("cond_after", "A"), ("cond_after", "A_plain")]
    width = 0.8 / len(bars)
    for j, (which, name) in enumerate(bars):
        for x, runs in enumerate(by_variant(args, results).values()):
            val = median([layer[name] for r in runs for layer in r[which]])
            shown = val if val is not None and math.isfinite(val) else float("nan")
            ax.bar(x + j * width, shown, width, color=f"C{j}", label=f"{name} {which[5:]}" if x == 0 else None)
            if val is not None and math.isinf(val):
                ax.text(x + j * width, 1, "inf", ha="center", va="bottom", rotation=90)
    names = list(by_variant(args, results))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set(yscale="log", ylabel="condition number", title="median over layers, heads, sequences, seeds")
    ax.legend(fontsize=8)
    if logged:
        plot_logged(args, results, axes[0][1])
    save_png(fig, path)


def plot_logged(args, results: dict, ax) -> None:
    """kappa(O) over training from the in-training probe, median over layers, mean over seeds."""
    for c, (v, runs) in enumerate(by_variant(args, results).items()):
        for name, style in (("O", "-"), ("O_plain", ":")):
            per_step: dict[int, list[float]] = {}
            for r in runs:
                for tag, pts in r["cond_logged"].items():
                    if tag.endswith(f"/{name}"):
                        for step, val in pts:
                            per_step.setdefault(step, []).append(val)
            steps = sorted(per_step)
            if steps:
                ax.plot(steps, [median(per_step[s]) for s in steps], style, color=f"C{c}", label=f"{v} {name}")
    ax.set(yscale="log", xlabel="step", ylabel="kappa (median over layers, seeds)", title="during training")
    ax.legend(fontsize=7, ncol=2)


# ---- the report -----------------------------------------------------------------------------
def default_target(args, results: dict) -> float:
    """`none`'s mean final validation loss (what the preconditioners must match, and how soon),
    or without `none` the worst variant's: a level every variant reaches on average."""
    finals = {v: summary([final_loss(r) for r in runs])["mean"] for v, runs in by_variant(args, results).items()}
    return finals["none"] if finals.get("none") is not None else max(x for x in finals.values() if x is not None)


def setup_lines(cfg, args, command: str) -> list[str]:
    m, t, d = cfg.model, cfg.train, cfg.data
    tok_step = t.micro_batch_size * t.grad_accum * d.seq_len
    return [
        f"- Command: `{command}`",
        f"- Model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads}/{m.n_kv_heads} q/kv heads, "
        f"vocab {m.vocab_size}; seq_len {d.seq_len}; {t.precision}; {lr_text(cfg, args)}",
        f"- Budget per run: {t.max_steps} steps x {tok_step} tokens (one rank) = {tokens_fmt(t.max_steps * tok_step)} "
        f"tokens; seeds {', '.join(map(str, args.seeds))}; variants {', '.join(args.variants)}",
        "- Every variant of a seed sees the same initial weights (same seed) and the same batches.",
        *[
            f"- `{v}` alone: {', '.join(f'`{o}`' for o in over)}"
            for v, over in getattr(args, "variant_sets", {}).items()
        ],
    ]


def lr_text(cfg, args) -> str:
    """The learning-rate schedule; the peak lr is named where no sweep or variant sets it."""
    t = cfg.train
    own = [o for over in getattr(args, "variant_sets", {}).values() for o in over]
    if any("train.lr" in p["values"] for p in getattr(args, "points", None) or []):
        peak = "lr swept"
    elif any(o.startswith("train.lr=") for o in own):
        peak = "lr per variant (below)"
    else:
        peak = f"lr {t.lr}"
    return f"{peak}, warmup {t.warmup_steps} steps, cosine to {t.min_lr:g}"


def write_files(out: Path, lines: list[str], raw: dict, results: str = "results.json") -> Path:
    """README.md from the report's lines, `results` from the raw results by run name; returns out."""
    write_atomic(out / "README.md", "\n".join(lines) + "\n")
    write_atomic(out / results, json.dumps(jsonable(raw), indent=1) + "\n")
    return out


def read_results(path: Path) -> dict[str, dict]:
    """A report's results.json: run name -> its result; one that is not is a ConfigError naming it."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:  # UnicodeDecodeError too
        raise ConfigError(f"{path}: not valid JSON ({e}); restore it from git or remove it") from None
    if not isinstance(raw, dict) or not all(isinstance(r, dict) for r in raw.values()):
        raise ConfigError(f"{path}: expected an object of run name -> result; restore it from git or remove it")
    return raw


def check_report_dir(out_dir: Path, name: str, example: str) -> None:
    """A report's --name is one folder under --out-dir, which can be written; checked before any work."""
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"--name {name!r}: expected a plain folder name, e.g. {example}")
    check_output_path("--out-dir", out_dir)
    if (out_dir / name).is_file():
        raise ConfigError(f"--name {name}: {out_dir / name} is a file; choose another --name")


def write_report(out: Path, cfg, args, results: dict, command: str, total: int | None = None) -> Path:
    """The report of a sweep, or of a plain experiment over `results` (its finished runs, of
    `total` planned: fewer make it partial)."""
    out.mkdir(parents=True, exist_ok=True)
    if getattr(args, "points", None):
        return write_sweep_report(out, cfg, args, results, command)
    target = args.target_loss if args.target_loss is not None else default_target(args, results)
    plot_loss(args, results, out / "val_loss.png")
    plot_conditioning(args, results, out / "conditioning.png")
    lines = [f"# Experiment `{args.name}`: plain versus preconditioned attention", "", *setup_lines(cfg, args, command)]
    if total is not None and len(results) < total:
        lines.append(f"- **Partial: {len(results)} of {total} runs finished**; the rest are left out (rerun to go on)")
    lines += ["", "## Validation loss", "", "Mean ± sample standard deviation over seeds (min-max, n).", ""]
    lines += loss_table(args, results, target)
    lines += ["", "![validation loss](val_loss.png)", "", "## Condition numbers", ""]
    lines += [
        "kappa = sigma_max / sigma_min in float64 (research.conditioning), median over heads, then over seeds;",
        "`_plain` = plain attention of the same q, k, v; before = the step-0 model; inf = numerically singular.",
        "",
    ]
    lines += cond_table(args, results)
    lines += ["", "![condition numbers](conditioning.png)", "", "## What this shows", "", *verdict(args, results)]
    return write_files(out, lines, {f"{v}-seed{s}": r for (v, s), r in results.items()})


# ---- sweeps ---------------------------------------------------------------------------------
SENSITIVITY_NATS = 0.1


def diverged(run: dict) -> bool:
    """Training failed, or the final validation loss is NaN/None or above the first one evaluated
    after training began (runs log the untrained loss at 0 tokens too)."""
    final = final_loss(run)
    if run.get("failed") or final is None or not math.isfinite(final):
        return True
    trained = [v for t, v in run["evals"] if t > 0]
    return final > (trained or [v for _, v in run["evals"]])[0]


def point_finals(args, results: dict) -> dict[str, dict[str, dict]]:
    """variant -> point -> summary of the final losses of the finished runs that did not diverge,
    with "diverged" (how many did), "unfinished" (not yet trained to the end) and "runs"."""
    out: dict[str, dict[str, dict]] = {}
    for v in args.variants:
        for p in args.points:
            runs = [results[p["name"], v, s] for s in args.seeds]
            done = [r for r in runs if not r.get("unfinished")]
            kept = [final_loss(r) for r in done if not diverged(r)]
            counts = {"diverged": len(done) - len(kept), "unfinished": len(runs) - len(done), "runs": len(runs)}
            out.setdefault(v, {})[p["name"]] = summary(kept) | counts
    return out


def finals_cell(s: dict) -> str:
    notes = [f"{s[k]}/{s['runs']} {k}" for k in ("diverged", "unfinished") if s.get(k)]
    if s["n"] == 0:
        return "diverged" if s["diverged"] == s["runs"] else " ".join(notes) or "n/a"
    return fmt_summary(s) + (f" ({', '.join(notes)})" if notes else "")


def best_point(finals: dict[str, dict]) -> str | None:
    """The point with the lowest mean final loss among those where no seed diverged."""
    ok = [p for p, s in finals.items() if s["n"] and not s["diverged"]]
    return min(ok, key=lambda p: finals[p]["mean"]) if ok else None


def near_best(finals: dict[str, dict], margin: float = SENSITIVITY_NATS) -> list[str]:
    """The points (in sweep order) within `margin` nats of the best point's mean final loss."""
    best = best_point(finals)
    if best is None:
        return []
    top = finals[best]["mean"] + margin
    return [p for p, s in finals.items() if s["n"] and not s["diverged"] and s["mean"] <= top]


def sweep_value(point: dict):
    """The swept value as a number when one key is swept and it is numeric, else None."""
    if len(point["values"]) != 1:
        return None
    value = next(iter(point["values"].values()))
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def width_text(args, names: list[str], finished_points: int | None = None) -> str:
    """How wide the near-best range is: a count of points, and the swept values at its ends."""
    if not names:
        return "n/a (no point has finished)" if finished_points == 0 else "n/a (every point diverged)"
    text = f"{len(names)} of {len(args.points)} points"
    if finished_points is not None and finished_points < len(args.points):
        text = f"{len(names)} of the {finished_points} points with a finished run"
    values = [sweep_value(p) for p in args.points if p["name"] in names]
    if None not in values:
        text += f" ({min(values):g}..{max(values):g})"
    elif len(names) > 1:
        text += f" ({names[0]} .. {names[-1]})"
    return text


def done(finals: dict[str, dict]) -> int:
    """How many points have a finished run (trained to the end, or diverged)."""
    return sum(1 for s in finals.values() if s["n"] or s["diverged"])


def sweep_table(args, finals: dict) -> list[str]:
    rows = [[f"`{p['name']}`", *[finals_cell(finals[v][p["name"]]) for v in args.variants]] for p in args.points]
    return md_table(["point", *[f"`{v}`" for v in args.variants]], rows)


def best_table(args, finals: dict) -> list[str]:
    head = ["variant", "best point", "final val loss there", f"within {SENSITIVITY_NATS} nats of the best"]
    rows = []
    for v in args.variants:
        best = best_point(finals[v])
        loss = fmt_summary(finals[v][best]) if best else "n/a"
        rows.append(
            [
                f"`{v}`",
                f"`{best}`" if best else "none (all diverged)",
                loss,
                width_text(args, near_best(finals[v]), done(finals[v])),
            ]
        )
    return md_table(head, rows)


def plot_sweep(args, finals: dict, path: Path) -> None:
    """Final validation loss against the swept value, one line per variant, sd over seeds as bars."""
    values = [sweep_value(p) for p in args.points]
    numeric = None not in values
    xs = values if numeric else list(range(len(args.points)))
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for v in args.variants:
        ss = [finals[v][p["name"]] for p in args.points]
        ys = [s["mean"] if s["n"] else float("nan") for s in ss]
        ax.errorbar(xs, ys, yerr=[s["sd"] or 0.0 for s in ss], marker="o", ms=4, capsize=3, label=v)
    if numeric and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, [p["name"] for p in args.points], rotation=30, ha="right", fontsize=8)
    label = next(iter(args.points[0]["values"])) if numeric else "sweep point"
    title = f"final validation loss (mean, bars: sd over {len(args.seeds)} seeds; gaps: diverged)"
    ax.set(xlabel=label, ylabel="final validation loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)


def init_loss(cfg) -> float:
    """The loss of a uniform prediction, ln(vocab): where a freshly initialised model starts."""
    return math.log(cfg.model.vocab_size)


def sensitivity(finals: dict[str, dict], cap: float) -> float | None:
    """LR sensitivity as Wortsman et al. (2023) define it: the mean over the swept points of
    min(final loss, cap) minus the best final loss, a diverged point counting as the cap (the
    loss at initialisation). None while a point has no finished run."""
    best = best_point(finals)
    if best is None or any(s["n"] == 0 and not s["diverged"] for s in finals.values()):
        return None
    capped = [min(s["mean"], cap) if s["n"] and not s["diverged"] else cap for s in finals.values()]
    return statistics.fmean(capped) - finals[best]["mean"]


def best_runs(args, results: dict, finals: dict, v: str) -> list[dict]:
    """The finished, non-diverged runs of variant v at its best point."""
    best = best_point(finals[v])
    if best is None:
        return []
    runs = [results[best, v, s] for s in args.seeds]
    return [r for r in runs if not r.get("unfinished") and not diverged(r)]


def reach_table(args, results: dict, finals: dict) -> tuple[list[str], float | None]:
    """At each variant's best point: the tokens it takes to reach `none`'s mean final loss at
    `none`'s best point (interpolated between evaluations), over seeds; and that target."""
    base = best_point(finals.get("none", {}))
    if base is None:
        return [], None
    target = finals["none"][base]["mean"]
    head = ["variant", "best point", f"tokens to val {target:.4f}", "vs `none`"]
    reach = {v: [tokens_to_reach(r["evals"], target) for r in best_runs(args, results, finals, v)] for v in finals}
    base_mean = summary(reach["none"])["mean"]
    rows = []
    for v in args.variants:
        got = summary(reach[v])
        missed = sum(x is None for x in reach[v])
        cell = "never" if not got["n"] else fmt_tokens_summary(got)
        cell += f" ({missed}/{len(reach[v])} never)" if missed and got["n"] else ""
        ratio = f"{got['mean'] / base_mean:.2f}x" if got["n"] and base_mean else "n/a"
        rows.append([f"`{v}`", f"`{best_point(finals[v])}`", cell, "-" if v == "none" else ratio])
    return md_table(head, rows), target


def fmt_tokens_summary(s: dict) -> str:
    text = tokens_fmt(s["mean"])
    if s["sd"] is not None:
        text += f" ± {tokens_fmt(s['sd'])} ({tokens_fmt(s['min'])}-{tokens_fmt(s['max'])}, n={s['n']})"
    return text


def sweep_verdict(args, cfg, finals: dict) -> list[str]:
    """Each variant at its best point against `none` at its best, with the standard error of the
    gap, and how wide each variant's range of good points is."""
    lines = []
    best = {v: best_point(finals[v]) for v in args.variants}
    if best.get("none"):
        for v in args.variants:
            if v != "none" and best[v]:
                gap = compare(v, finals[v][best[v]], finals["none"][best["none"]])
                lines.append(f"- At each one's best point: {gap}")
    for v in args.variants:
        sens = sensitivity(finals[v], init_loss(cfg))
        width = width_text(args, near_best(finals[v]), done(finals[v]))
        sens_text = "n/a (unfinished points)" if sens is None else f"{sens:.3f} nats"
        lines.append(f"- `{v}`: LR sensitivity {sens_text}; within {SENSITIVITY_NATS} nats of its best: {width}.")
    return lines


def plot_best_curves(args, results: dict, finals: dict, path: Path) -> None:
    """Validation loss over tokens of each variant at its best point (mean, band min-max)."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for v in args.variants:
        runs = best_runs(args, results, finals, v)
        if not runs:
            continue
        tokens = common_tokens(runs)
        vals = [[dict(r["evals"])[t] for r in runs] for t in tokens]
        ax.plot(tokens, [statistics.fmean(x) for x in vals], marker="o", ms=3, label=f"{v} ({best_point(finals[v])})")
        ax.fill_between(tokens, [min(x) for x in vals], [max(x) for x in vals], alpha=0.2)
    ax.set(xlabel="tokens", ylabel="validation loss", title="each variant at its best point (band: min-max over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)


def write_sweep_report(out: Path, cfg, args, results: dict, command: str) -> Path:
    finals = point_finals(args, results)
    plot_sweep(args, finals, out / "sweep.png")
    plot_best_curves(args, results, finals, out / "best_curves.png")
    lines = [f"# Sweep `{args.name}`: plain versus preconditioned attention", "", *setup_lines(cfg, args, command)]
    lines.append(f"- Sweep: {len(args.points)} points ({', '.join(f'`{p}`' for p in args.sweep)}) x variants x seeds")
    left = sum(s["unfinished"] for per in finals.values() for s in per.values())
    if left:
        total = sum(s["runs"] for per in finals.values() for s in per.values())
        lines.append(f"- **Partial: {total - left} of {total} runs finished**; the rest are left out (rerun to go on)")
    lines += ["", "## Final validation loss per point", "", "Mean ± sample standard deviation over seeds "]
    lines[-1] += "(min-max, n) of the runs that did not diverge (final loss NaN, or above the first evaluation)."
    lines += ["", *sweep_table(args, finals), "", "![final loss vs swept value](sweep.png)", ""]
    lines += ["## Best point and sensitivity", "", "The best point is the lowest mean final loss where no seed"]
    lines[-1] += f" diverged; the width is the range of points within {SENSITIVITY_NATS} nats of it."
    lines += ["", *best_table(args, finals)]
    reach, target = reach_table(args, results, finals)
    if reach:
        lines += ["", "## Tokens to `none`'s best loss", "", "Tokens each variant, at its best point, takes to reach"]
        lines[-1] += f" `none`'s mean final validation loss at its best point ({target:.4f}); mean ± sd over seeds."
        lines += ["", *reach, "", "![each variant at its best point](best_curves.png)"]
    lines += ["", "## What this shows", "", *sweep_verdict(args, cfg, finals)]
    return write_files(out, lines, {f"{p}/{v}-seed{s}": r for (p, v, s), r in results.items()})
