"""Learning-rate sweeps at several widths, side by side: does the wider range of good learning
rates hold as the model grows, and does the best learning rate stay put?

    python -m research.width --config FILE --name NAME --width W=EXPERIMENT[,EXPERIMENT...] ...
                             [--reports docs/experiments] [--out-dir docs/experiments]

Each --width names the learning-rate sweeps (research.experiment reports, read from their
results.json under --reports) trained at d_model W: the config's model with its head dim, its
query/key-value head ratio and its feed-forward ratio kept, so a width needs nothing else to be
reproduced. Several sweeps of one width are merged, a later one's run replacing an earlier one's
of the same name (the report says which sweep each point came from). Writes NAME/README.md
(per width and variant: the best learning rate, the loss there, the LR sensitivity, the band
within 0.1 nats; the largest attention logit and kappa(O) at the highest learning rate),
summary.json and two plots. Reads only committed results, so it regenerates anywhere.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from core.cli import is_count, run_main
from core.errors import ConfigError
from research import report as rep

RUN_NAME = re.compile(r"lr=(?P<lr>[0-9.eE+-]+)/(?P<variant>[a-z]+)-seed(?P<seed>\d+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m research.width", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="the sweeps' run config (its model is scaled in width)")
    p.add_argument("--name", required=True, help="the report's folder name under --out-dir")
    p.add_argument("--width", action="append", default=[], metavar="W=EXPERIMENT[,EXPERIMENT]", help="repeatable")
    p.add_argument("--reports", type=Path, default=Path("docs/experiments"), help="where the sweeps' reports are")
    p.add_argument("--out-dir", type=Path, default=Path("docs/experiments"), help="where the report goes")
    return p.parse_args(argv)


def model_at(model, width: int):
    """The config's model at d_model `width`: head dim, q/kv head ratio and ffn ratio kept."""
    head_dim, ratio = model.d_model // model.n_heads, model.n_heads // model.n_kv_heads
    if width % (head_dim * ratio):
        raise ConfigError(f"--width {width}: expected a multiple of {head_dim * ratio} (head dim {head_dim} x {ratio})")
    heads = width // head_dim
    return replace(
        model,
        d_model=width,
        n_heads=heads,
        n_kv_heads=heads // ratio,
        ffn_hidden=width * model.ffn_hidden // model.d_model,
    )


def overrides(model) -> str:
    """The command-line overrides that give a sweep this model."""
    keys = ("d_model", "n_heads", "n_kv_heads", "ffn_hidden")
    return " ".join(f"model.{k}={getattr(model, k)}" for k in keys)


def parameters(model) -> int:
    import torch

    from model import Transformer, count_parameters

    with torch.device("meta"):
        return count_parameters(Transformer(model))


def parse_widths(args: argparse.Namespace) -> dict[int, list[str]]:
    widths: dict[int, list[str]] = {}
    for spec in args.width:
        w, eq, names = spec.partition("=")
        if not eq or not is_count(w.strip()) or not names.strip():
            raise ConfigError(f"--width {spec!r}: expected W=EXPERIMENT[,EXPERIMENT], W >= 1, e.g. 128=lr-width-d128")
        if int(w) in widths:
            raise ConfigError(f"--width {spec!r}: width {int(w)} is given twice; list its sweeps once, W=A,B")
        widths[int(w)] = [n.strip() for n in names.split(",") if n.strip()]
    if len(widths) < 2:
        raise ConfigError("--width: give two or more widths, e.g. --width 128=lr-width-d128 --width 256=lr-sweep-cpu")
    return dict(sorted(widths.items()))


def load_runs(reports: Path, names: list[str]) -> tuple[dict, dict[str, str]]:
    """(lr, variant, seed) -> run of the merged sweeps, and run name -> the sweep it came from: a
    later sweep's run replaces an earlier one's of the same name unless it is unfinished."""
    runs, source = {}, {}
    for name in names:
        path = reports / name / "results.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such report; train the sweep {name!r} first (python -m launcher.experiment)")
        for run_name, run in rep.read_results(path).items():
            m = RUN_NAME.fullmatch(run_name)
            if m is None:
                raise ConfigError(f"{path}: run {run_name!r} is not from a train.lr sweep (expected lr=X/V-seedS)")
            key = float(m["lr"]), m["variant"], int(m["seed"])
            if run.get("unfinished") and key in runs:  # a later sweep not yet there keeps what an earlier one has
                continue
            runs[key] = run
            source[run_name] = name
    return runs, source


def sweep_view(runs: dict, variants: list[str], lrs: list[float]) -> tuple[SimpleNamespace, dict]:
    """The sweep report's view of one width over `lrs`: args (variants, points, seeds) and results
    keyed (point, variant, seed), a run not there counted as unfinished."""
    seeds = sorted({s for _, _, s in runs})
    points = [{"name": f"lr={lr:g}", "values": {"train.lr": lr}} for lr in lrs]
    results = {
        (p["name"], v, s): runs.get((lr, v, s), {"evals": [], "unfinished": True})
        for p, lr in zip(points, lrs, strict=True)
        for v in variants
        for s in seeds
    }
    return SimpleNamespace(variants=variants, points=points, seeds=seeds), results


def probe_at(runs: dict, lr: float, variant: str) -> dict:
    """At one learning rate, over the seeds that logged it: the largest attention logit (max over
    layers) at the end and at its peak during training, and kappa(O) at the end (median over layers)."""

    def layers_at_end(run: dict, suffix: str) -> list[float]:
        series = [pts for tag, pts in run.get("cond_logged", {}).items() if tag.endswith(suffix)]
        return [pts[-1][1] for pts in series if pts]

    end, peak, kappa = [], [], []
    for (r_lr, v, _), run in runs.items():
        if r_lr != lr or v != variant or run.get("unfinished"):
            continue
        logits = [pts for tag, pts in run.get("cond_logged", {}).items() if tag.startswith("logit/")]
        if logits:
            end.append(max(pts[-1][1] for pts in logits))
            peak.append(max(val for pts in logits for _, val in pts))
        kap = layers_at_end(run, "/O")
        if kap:
            kappa.append(rep.median(kap))
    return {"logit_end": rep.summary(end), "logit_peak": rep.summary(peak), "kappa_O_end": rep.summary(kappa)}


def analyse(args: argparse.Namespace, cfg) -> dict:
    """Per width: the model, where its runs came from, and per variant the sweep's numbers."""
    widths = parse_widths(args)
    loaded = {w: load_runs(args.reports, names) for w, names in widths.items()}
    present = [{v for _, v, _ in runs} for runs, _ in loaded.values()]
    variants = [v for v in ("none", "qk", "qkv", "row") if all(v in p for p in present)]  # at every width
    if not variants:
        raise ConfigError("--width: no variant was trained at every width")
    grids = [sorted({lr for lr, _, _ in runs}) for runs, _ in loaded.values()]
    common = sorted(set.intersection(*(set(g) for g in grids)))
    if not common:
        raise ConfigError("--width: the sweeps share no learning rate; sweep the same grid at every width")
    cap = rep.init_loss(cfg)
    out = {"grid": common, "cap": cap, "widths": {}}
    for w, (runs, source) in loaded.items():
        model = model_at(cfg.model, w)
        view, results = sweep_view(runs, variants, common)
        finals = rep.point_finals(view, results)
        lr_of = {p["name"]: p["values"]["train.lr"] for p in view.points}
        per = {}
        for v in variants:
            best = rep.best_point(finals[v])
            near = rep.near_best(finals[v])
            per[v] = {
                "finals": finals[v],
                "best_lr": lr_of.get(best),
                "loss": finals[v][best] if best else None,
                "sensitivity": rep.sensitivity(finals[v], cap),
                "band": rep.width_text(view, near, rep.done(finals[v])),
                "probe": probe_at(runs, max(common), v),
            }
        sources = sorted(set(source.values()), key=widths[w].index)
        out["widths"][w] = {
            "model": overrides(model), "parameters": parameters(model), "experiments": sources,
            "seeds": view.seeds, "variants": per,
            "unfinished": sum(s["unfinished"] for f in finals.values() for s in f.values()),
            "runs": sum(s["runs"] for f in finals.values() for s in f.values()),
            "points_from": {name: exp for name, exp in sorted(source.items())},
        }  # fmt: skip
    partial_view(out)
    return out


MIN_SETTLED = 3
"""Fewest learning rates a partial study's sensitivity is taken over (settled at every width)."""


def partial_view(data: dict) -> None:
    """While runs are unfinished: the learning rates where every width and variant has a finished
    (or diverged) run, and each one's LR sensitivity over just those ("settled"), so that widths
    are compared on the same points. Empty when every point is settled or fewer than MIN_SETTLED are."""
    every = [s["finals"] for d in data["widths"].values() for s in d["variants"].values()]
    settled = [lr for lr in data["grid"] if all(f[f"lr={lr:g}"]["n"] or f[f"lr={lr:g}"]["diverged"] for f in every)]
    data["settled"] = settled if MIN_SETTLED <= len(settled) < len(data["grid"]) else []
    for d in data["widths"].values():
        for s in d["variants"].values():
            sub = {f"lr={lr:g}": s["finals"][f"lr={lr:g}"] for lr in data["settled"]}
            s["sensitivity_settled"] = rep.sensitivity(sub, data["cap"]) if sub else None


# ---- the report -------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def trend(values: list[float | None]) -> str:
    """grows / shrinks / no monotone trend, over widths in order (None: unfinished)."""
    if None in values or len(values) < 2:
        return "not yet known (unfinished points)"
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    if all(d > 0 for d in steps):
        return "grows with width"
    if all(d < 0 for d in steps):
        return "shrinks with width"
    return "no monotone trend"


def summary_table(data: dict) -> list[str]:
    head = ["d_model", "parameters", "variant", "best lr", "final val loss there", "LR sensitivity (nats)"]
    head.append("within 0.1 nats of the best")
    if data["settled"]:
        head.append(f"LR sensitivity over {settled_text(data)} only")
    rows = []
    for w, d in data["widths"].items():
        for v, s in d["variants"].items():
            loss = rep.fmt_summary(s["loss"]) if s["loss"] else "n/a"
            best = f"{s['best_lr']:g}" if s["best_lr"] is not None else "n/a"
            row = [str(w), f"{d['parameters'] / 1e6:.2f}M", f"`{v}`", best, loss, fmt(s["sensitivity"]), s["band"]]
            rows.append(row + ([fmt(s["sensitivity_settled"])] if data["settled"] else []))
    return rep.md_table(head, rows)


def settled_text(data: dict) -> str:
    return "lr " + ", ".join(f"{lr:g}" for lr in data["settled"])


def loss_tables(data: dict) -> list[str]:
    """One table per width: final validation loss per learning rate and variant."""
    lines = []
    for w, d in data["widths"].items():
        variants = list(d["variants"])
        rows = [
            [f"{lr:g}", *[rep.finals_cell(d["variants"][v]["finals"][f"lr={lr:g}"]) for v in variants]]
            for lr in data["grid"]
        ]
        lines += [f"**d_model {w}** ({d['model']}; from {', '.join(f'`{e}`' for e in d['experiments'])})", ""]
        lines += [*rep.md_table(["lr", *[f"`{v}`" for v in variants]], rows), ""]
        for exp in d["experiments"][1:]:  # the later sweeps: what each one gave
            mine = ", ".join(f"`{n}`" for n in dict.fromkeys(
                name.rsplit("-seed", 1)[0] for name, e in d["points_from"].items() if e == exp
            ))  # fmt: skip
            lines += [f"From `{exp}`: {mine}; the rest from `{d['experiments'][0]}`.", ""]
    return lines


def probe_table(data: dict) -> list[str]:
    top = max(data["grid"])
    head = [
        "d_model",
        "variant",
        f"largest attention logit at lr {top:g}, end",
        "peak during training",
        "kappa(O), end",
    ]
    rows = []
    for w, d in data["widths"].items():
        for v, s in d["variants"].items():
            p = s["probe"]
            cell = lambda x: rep.fmt_summary(x, 2) if x["n"] else "not logged"
            rows.append([str(w), f"`{v}`", cell(p["logit_end"]), cell(p["logit_peak"]), cell(p["kappa_O_end"])])
    return rep.md_table(head, rows)


def verdict(data: dict) -> list[str]:
    widths = list(data["widths"])
    variants = list(next(iter(data["widths"].values()))["variants"])
    lines = []
    for v in variants:
        sens = [data["widths"][w]["variants"][v]["sensitivity"] for w in widths]
        best = [data["widths"][w]["variants"][v]["best_lr"] for w in widths]
        text = ", ".join(f"d{w} {fmt(x)}" for w, x in zip(widths, sens, strict=True))
        lines.append(f"- `{v}`: LR sensitivity {text} nats: {trend(sens)}.")
        if data["settled"]:
            part = [data["widths"][w]["variants"][v]["sensitivity_settled"] for w in widths]
            text = ", ".join(f"d{w} {fmt(x)}" for w, x in zip(widths, part, strict=True))
            lines.append(
                f"- `{v}`: over the learning rates every width has finished ({settled_text(data)}), LR sensitivity "
                f"{text} nats: {trend(part)} on those points (provisional: the full grid decides)."
            )
        stays = None not in best and len(set(best)) == 1
        lines.append(
            f"- `{v}`: best lr {', '.join('n/a' if b is None else f'{b:g}' for b in best)}"
            + (": the same at every width." if stays else ".")
        )
    if "none" in variants:
        for v in variants:
            if v == "none":
                continue
            for w in widths:
                a, b = data["widths"][w]["variants"][v]["loss"], data["widths"][w]["variants"]["none"]["loss"]
                if a and b and a["n"] and b["n"]:
                    lines.append(f"- d{w}, at each one's best lr: {rep.compare(v, a, b)}")
    return lines


# ---- plots ----------------------------------------------------------------------------------------
def plot_losses(data: dict, path: Path) -> None:
    """Final loss against learning rate, one panel per width, one line per variant (bars: sd)."""
    widths = list(data["widths"])
    fig, axes = rep.pyplot().subplots(1, len(widths), figsize=(4.5 * len(widths), 4), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], widths, strict=True):
        for v, s in data["widths"][w]["variants"].items():
            cells = [s["finals"][f"lr={lr:g}"] for lr in data["grid"]]
            ys = [c["mean"] if c["n"] else float("nan") for c in cells]
            ax.errorbar(data["grid"], ys, yerr=[c["sd"] or 0.0 for c in cells], marker="o", ms=4, capsize=3, label=v)
        ax.set(
            xscale="log", xlabel="learning rate", title=f"d_model {w} ({data['widths'][w]['parameters'] / 1e6:.1f}M)"
        )
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (gaps: diverged or unfinished)")
    axes[0][0].legend()
    rep.save_png(fig, path)


def plot_sensitivity(data: dict, path: Path) -> None:
    """LR sensitivity against parameters, one line per variant."""
    fig, ax = rep.pyplot().subplots(figsize=(6, 4))
    widths = list(data["widths"])
    params = [data["widths"][w]["parameters"] for w in widths]
    for v in next(iter(data["widths"].values()))["variants"]:
        sens = [data["widths"][w]["variants"][v]["sensitivity"] for w in widths]
        line = ax.plot(params, [float("nan") if x is None else x for x in sens], marker="o", label=v)[0]
        if data["settled"]:  # a partial study: the provisional values, dashed
            part = [data["widths"][w]["variants"][v]["sensitivity_settled"] for w in widths]
            ax.plot(params, [float("nan") if x is None else x for x in part], marker="s", ls="--",
                    color=line.get_color(), label=f"{v} ({settled_text(data)} only)")  # fmt: skip
    ax.set(xscale="log", xlabel="parameters", ylabel="LR sensitivity (nats)", title="LR sensitivity against model size")
    ax.grid(alpha=0.3)
    ax.legend()
    rep.save_png(fig, path)


def write(out: Path, data: dict, command: str, cfg) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(data, out / "loss_vs_lr.png")
    plot_sensitivity(data, out / "sensitivity.png")
    t = cfg.train
    lines = [
        "# Learning-rate sweeps at several widths: plain versus preconditioned attention",
        "",
        f"- Command: `{command}`",
        f"- Every width: {cfg.model.n_layers} layers, head dim {cfg.model.d_model // cfg.model.n_heads}, "
        f"{cfg.model.n_heads // cfg.model.n_kv_heads} query heads per key/value head, feed-forward width "
        f"{cfg.model.ffn_hidden / cfg.model.d_model:g} x d_model, vocab {cfg.model.vocab_size}; "
        f"warmup {t.warmup_steps} steps, cosine to {t.min_lr:g}; {t.max_steps} steps x "
        f"{t.micro_batch_size * t.grad_accum * cfg.data.seq_len} tokens per run, as `{cfg_name(command)}`",
        f"- Learning rates compared at every width: {', '.join(f'{lr:g}' for lr in data['grid'])} "
        f"(the LR sensitivity is taken over these, capped at ln(vocab) = {data['cap']:.3f}; each sweep's own "
        "report has its other points)",
    ]
    left = sum(d["unfinished"] for d in data["widths"].values())
    if left:
        total = sum(d["runs"] for d in data["widths"].values())
        lines.append(f"- **Partial: {total - left} of {total} runs finished**; the unfinished ones are named below")
    lines += ["", "## Per width and variant", "", *summary_table(data), "", "![loss vs lr](loss_vs_lr.png)"]
    lines += ["![sensitivity vs parameters](sensitivity.png)", "", "## What this shows", "", *verdict(data)]
    lines += ["", "## The mechanism Wortsman et al. name: attention-logit growth", ""]
    lines += ["From the in-training probe (every 50 steps, two validation windows); mean ± sd over seeds.", ""]
    lines += [*probe_table(data), "", "## Final validation loss per learning rate", "", *loss_tables(data)]
    unfinished = [
        f"d{w} `{v}` {point} ({c['unfinished']} of {c['runs']} seeds)"
        for w, d in data["widths"].items()
        for v, sv in d["variants"].items()
        for point, c in sv["finals"].items()
        if c["unfinished"]
    ]
    if unfinished:
        lines += ["## Unfinished", "", "Not yet trained to the end (the sweeps resume where they stopped): "]
        lines[-1] += "; ".join(unfinished) + "."
    return rep.write_files(out, lines, data, results="summary.json")


def cfg_name(command: str) -> str:
    return command.split("--config ", 1)[1].split()[0] if "--config " in command else "the config"


def main(argv: list[str] | None = None) -> int:
    from run.config import load_run_config

    args = parse_args(argv)
    rep.check_report_dir(args.out_dir, args.name, "lr-width-cpu")
    cfg = load_run_config(args.config, [])
    data = analyse(args, cfg)
    command = "python -m research.width " + " ".join(argv if argv is not None else sys.argv[1:])
    out = write(args.out_dir / args.name, data, command, cfg)
    print(f"report: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
