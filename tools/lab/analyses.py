"""The lab's analysis kinds: each turns an experiment's runs into a figure, tables
and a verdict by the criterion its declaration fixed. KINDS maps the
declaration's "analysis": {"kind": ...} to the function.

Every function takes (exp, figure_path) and returns
    {"verdict": {"verdict", "summary", "effect", "ci", "unit", ...},
     "tables": [(header, rows), ...], "notes": str}
Diverged runs are kept: counted and drawn (× marks), left out of accuracy means.
"""
import math

import matplotlib.pyplot as plt
import numpy as np

import labstats

COLOURS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#57606a", "#bf3989", "#0a3069"]


def fmt(x, digits=4):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}"


def pp(x):
    return "–" if x is None or math.isnan(x) else f"{100 * x:+.2f} pp"


def mean_ci_text(values, scale=1.0, digits=4):
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    m, lo, hi = labstats.t_interval(np.asarray(v) * scale)
    if math.isnan(lo):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def band(ax, x, rows, colour, label, marker=None):
    """Mean over seeds with a 95% t band; rows: seeds × len(x), NaN where missing."""
    rows = np.asarray(rows, dtype=float)
    means, los, his = [], [], []
    for j in range(rows.shape[1]):
        col = rows[:, j][~np.isnan(rows[:, j])]
        m, lo, hi = labstats.t_interval(col) if len(col) else (math.nan,) * 3
        means.append(m)
        los.append(lo if not math.isnan(lo) else m)
        his.append(hi if not math.isnan(hi) else m)
    ax.plot(x, means, color=colour, label=label, marker=marker, lw=1.8)
    ax.fill_between(x, los, his, color=colour, alpha=0.18, lw=0)


def verdict(outcome, summary, effect=None, ci=(math.nan, math.nan), unit="", **extra):
    v = {"verdict": outcome, "summary": summary, "effect": effect,
         "ci": [float(ci[0]), float(ci[1])], "unit": unit}
    v.update(extra)
    return v


def best_lr(exp, arm, score, key="lr"):
    """The grid value of `key` with the best mean score over seeds (diverged
    runs score chance level: they count against the setting)."""
    scores = {}
    for lr in exp.grid_values(key, arm):
        runs = exp.select(arm, **{key: lr})
        scores[lr] = [score(r) for r in runs]
    return labstats.best_setting(scores), scores


def chance(exp):
    return 1.0 / exp.decl["analysis"].get("classes", 10)


def val_score(exp, metric="val_acc"):
    c = chance(exp)
    return lambda r: c if r.diverged or r.value(metric) is None else r.value(metric)


def save(fig, path, title):
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- 3: learning-rate sweep

def lr_sweep(exp, figure):
    """Final validation accuracy and divergence over a log grid of learning rates.
    Criterion "divergence_range": per seed, each arm's largest stable learning
    rate (not diverged, validation accuracy >= trainable); the paired log10
    ratio arm/baseline over seeds must reach log10(min_ratio) across its interval."""
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    arm, base = c["arm"], c["baseline"]
    metric = a.get("metric", "val_acc")
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [2.2, 1]})
    rows = []
    for i, name in enumerate(exp.arms()):
        lrs = sorted(exp.grid_values("lr", name))
        seeds = sorted({r.seed for r in exp.select(name)})
        acc = np.full((len(seeds), len(lrs)), np.nan)
        div = np.zeros(len(lrs))
        for j, lr in enumerate(lrs):
            runs = exp.select(name, lr=lr)
            for r in runs:
                if r.diverged:
                    div[j] += 1
                    ax.plot(lr, 0.02, "x", color=COLOURS[i], ms=9, mew=2, transform=ax.get_xaxis_transform())
                else:
                    acc[seeds.index(r.seed), j] = r.value(metric)
            vals = [r.value(metric) for r in runs if not r.diverged]
            rows.append([name, fmt(lr), mean_ci_text(vals), f"{int(div[j])}/{len(runs)}"])
        band(ax, lrs, acc, COLOURS[i], name, marker="o")
        dx.plot(lrs, div / max(len(seeds), 1), "-o", color=COLOURS[i], label=name)
    ax.set(xscale="log", xlabel="learning rate", ylabel=metric.replace("_", " "),
           title=f"final {metric.replace('_', ' ')} (mean, 95% CI over seeds; × = diverged run)")
    ax.axhline(a.get("trainable", 0.5), color="grey", ls=":", lw=1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    dx.set(xscale="log", xlabel="learning rate", ylabel="fraction of seeds diverged", title="divergence",
           ylim=(-0.05, 1.05))
    dx.grid(True, alpha=0.3)
    save(fig, figure, exp.decl["title"])

    trainable = a.get("trainable", 0.5)

    def max_stable(name, seed):
        ok = [lr for lr in exp.grid_values("lr", name)
              for r in exp.select(name, lr=lr) if r.seed == seed
              and not r.diverged and (r.value(metric) or 0) >= trainable]
        return max(ok) if ok else None

    seeds = sorted({r.seed for r in exp.runs})
    pairs = [(max_stable(arm, s), max_stable(base, s)) for s in seeds]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    best_arm, _ = best_lr(exp, arm, val_score(exp, metric))
    best_base, _ = best_lr(exp, base, val_score(exp, metric))
    table2 = [[name, fmt(best), ", ".join(fmt(max_stable(name, s)) for s in seeds)]
              for name, best in ((arm, best_arm), (base, best_base))]
    if not pairs:
        v = verdict("inconclusive", "No seed has a stable learning rate in both arms.")
    else:
        d = [math.log10(x / y) for x, y in pairs]
        r = labstats.paired(d, [0.0] * len(d), c.get("alpha", 0.05))
        need = math.log10(c.get("min_ratio", 3.0)) - 1e-9
        if r["n"] >= 2 and r["lo"] >= need:
            outcome = "supported"
        elif r["n"] >= 2 and r["hi"] < need:
            outcome = "not supported"
        else:
            outcome = "inconclusive"
        ratio = 10 ** r["mean"]
        v = verdict(outcome,
                    f"The largest stable learning rate with {arm} is {ratio:.3g}× that without "
                    f"(geometric mean over {r['n']} seeds; log10 ratio {r['mean']:.2f}, 95% CI "
                    f"[{r['lo']:.2f}, {r['hi']:.2f}]; the claim needs ≥ {c.get('min_ratio', 3)}×). "
                    f"Best learning rate by {metric}: {fmt(best_arm)} with {arm}, {fmt(best_base)} "
                    f"with {base}.",
                    effect=r["mean"], ci=(r["lo"], r["hi"]), unit="log10(max stable LR ratio)",
                    best_lr={arm: best_arm, base: best_base})
    return {"verdict": v,
            "tables": [(["arm", "lr", f"{metric} mean [95% CI]", "diverged"], rows),
                       (["arm", "best lr", "largest stable lr per seed"], table2)]}


# ---------------------------------------------------------------- 2: time to a target accuracy

def first_reaching(run, metric, target):
    """(step, seconds) of the first evaluation at or above target, or None."""
    for s in run.steps():
        if s.get(metric) is not None and s[metric] >= target:
            return s["step"], s["seconds"]
    return None


def time_to_target(exp, figure):
    """Steps (and seconds) until the validation accuracy first reaches a target,
    each arm at its own best learning rate (fewest mean steps; runs that never
    reach it count as the run's length). Criterion "paired_speedup": per model,
    the paired log10(steps baseline / steps arm) over seeds must exclude 0."""
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    metric, target = a.get("metric", "val_acc"), a["target"]
    comparisons = c["pairs"]  # [[arm, baseline, label], ...]
    fig, axes = plt.subplots(1, len(comparisons) + 1, figsize=(5.2 * (len(comparisons) + 1), 4.3))
    tables, outcomes, parts = [], [], []
    bars = []

    def steps_to(run):
        hit = None if run.diverged else first_reaching(run, metric, target)
        total = run.record.get("steps_done") or 0
        return (hit[0], hit[1], True) if hit else (total, run.record.get("train_seconds") or 0, False)

    def mean_steps(run_list):
        return -np.mean([steps_to(r)[0] for r in run_list]) if run_list else -math.inf

    rows = []
    for k, (arm, base, label) in enumerate(comparisons):
        ax = axes[k]
        best = {}
        for i, name in enumerate((arm, base)):
            scores = {lr: [-steps_to(r)[0] for r in exp.select(name, lr=lr)] for lr in exp.grid_values("lr", name)}
            best[name] = labstats.best_setting(scores)
            runs = exp.select(name, lr=best[name])
            curves = [[(s["step"], s[metric]) for s in r.steps() if s.get(metric) is not None] for r in runs]
            if curves and curves[0]:
                x = [p[0] for p in curves[0]]
                ys = np.full((len(curves), len(x)), np.nan)
                for si, cur in enumerate(curves):
                    for xi, (st, y) in enumerate(cur[:len(x)]):
                        ys[si, xi] = y
                band(ax, x, ys, COLOURS[i], f"{name} (lr {fmt(best[name])})")
            for r in runs:
                st, sec, hit = steps_to(r)
                rows.append([label, name, fmt(best[name]), r.seed, st if hit else f"> {st}", fmt(sec, 3) if hit else "–"])
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set(xlabel="training step", ylabel=metric.replace("_", " "), title=f"{label}: at each arm's best lr",
               ylim=(max(0.0, target - 0.25), min(1.0, target + 0.12)))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
        ra = exp.select(arm, lr=best[arm])
        rb = exp.select(base, lr=best[base])
        common = sorted({r.seed for r in ra} & {r.seed for r in rb})
        sa = {r.seed: steps_to(r) for r in ra}
        sb = {r.seed: steps_to(r) for r in rb}
        d = [math.log10(sb[s][0] / sa[s][0]) for s in common if sa[s][0] > 0 and sb[s][0] > 0 and sa[s][2]]
        r = labstats.superiority(d, c.get("alpha", 0.05), direction=1)
        sec = [math.log10(sb[s][1] / sa[s][1]) for s in common if sa[s][1] > 0 and sb[s][1] > 0 and sa[s][2]]
        rs = labstats.superiority(sec, c.get("alpha", 0.05), direction=1) if len(sec) >= 2 else None
        outcomes.append(r["outcome"])
        parts.append(f"{label}: {arm} reached {target:.0%} in {10 ** r['mean']:.2f}× fewer steps than {base} "
                     f"(log10 ratio {r['mean']:.2f}, 95% CI [{r['lo']:.2f}, {r['hi']:.2f}], {r['n']} seeds; "
                     + (f"in seconds {10 ** rs['mean']:.2f}× [{10 ** rs['lo']:.2f}, {10 ** rs['hi']:.2f}]"
                        if rs else "seconds: too few pairs") + f") → {r['outcome']}")
        bars.append((label, r))
    bx = axes[-1]
    for k, (label, r) in enumerate(bars):
        if not math.isnan(r["mean"]):
            bx.bar(k, 10 ** r["mean"], color=COLOURS[k])
            if not math.isnan(r["lo"]):
                bx.errorbar(k, 10 ** r["mean"], yerr=[[10 ** r["mean"] - 10 ** r["lo"]], [10 ** r["hi"] - 10 ** r["mean"]]],
                            color="black", capsize=6)
    bx.axhline(1, color="grey", lw=1)
    bx.set_xticks(range(len(bars)), [b[0] for b in bars])
    bx.set(ylabel="steps without BN / steps with BN", title=f"speed-up to {target:.0%} (95% CI)")
    bx.grid(True, axis="y", alpha=0.3)
    save(fig, figure, exp.decl["title"])
    outcome = labstats.combine(outcomes)
    first = bars[0][1] if bars else {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    v = verdict(outcome, " ".join(p + "." for p in parts), effect=first["mean"], ci=(first["lo"], first["hi"]),
                unit=f"log10(steps ratio), {bars[0][0] if bars else ''}",
                parts={b[0]: {k: b[1][k] for k in ("mean", "lo", "hi", "n", "outcome")} for b in bars})
    return {"verdict": v,
            "tables": [(["model", "arm", "best lr", "seed", f"steps to {target:.0%}", "seconds"], rows)]}


# ---------------------------------------------------------------- 7: equivalence ("both work")

def equivalence(exp, figure):
    """Each arm at its own best learning rate (by mean validation accuracy); the
    paired test-accuracy difference of each declared pair over seeds. Criterion
    "tost": equivalent (90% CI inside ±margin) -> supported; 95% CI excluding 0
    with |mean| > margin -> not supported; else inconclusive. Pairs combine."""
    c = exp.decl["criterion"]
    metric = c.get("metric", "test_acc")
    margin = c["margin"]
    alpha = c.get("alpha", 0.05)
    pairs = c["pairs"]
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(4.2 * (len(pairs) + 1), 4.3))
    outcomes, parts, rows, results = [], [], [], []
    for k, (a, b, label) in enumerate(pairs):
        ax = axes[k]
        la, _ = best_lr(exp, a, val_score(exp))
        lb, _ = best_lr(exp, b, val_score(exp))
        ra = {r.seed: r for r in exp.select(a, lr=la)}
        rb = {r.seed: r for r in exp.select(b, lr=lb)}
        seeds = sorted(set(ra) & set(rb))
        xa = [ra[s].value(metric) for s in seeds]
        xb = [rb[s].value(metric) for s in seeds]
        ok = [i for i in range(len(seeds)) if xa[i] is not None and xb[i] is not None]
        diverged = len(seeds) - len(ok)
        for i in ok:
            ax.plot([0, 1], [xa[i], xb[i]], "-o", color="grey", alpha=0.6)
        ax.set_xticks([0, 1], [f"{a}\n(lr {fmt(la)})", f"{b}\n(lr {fmt(lb)})"])
        ax.set(ylabel=metric.replace("_", " "), title=f"{label}: per seed", xlim=(-0.4, 1.4))
        ax.grid(True, alpha=0.3)
        d = [xa[i] - xb[i] for i in ok]
        t = labstats.tost(d, margin, alpha)
        p = labstats.paired([xa[i] for i in ok], [xb[i] for i in ok], alpha)
        if t["equivalent"]:
            outcome = "supported"
        elif p["n"] >= 2 and (p["lo"] > 0 or p["hi"] < 0) and abs(p["mean"]) > margin:
            outcome = "not supported"
        else:
            outcome = "inconclusive"
        if diverged:
            outcome = "not supported" if diverged > len(seeds) / 2 else outcome
        outcomes.append(outcome)
        results.append((label, t, p))
        parts.append(f"{label}: {a} − {b} = {pp(t['mean'])} (90% CI [{pp(t['lo'])}, {pp(t['hi'])}], "
                     f"TOST p {fmt(t['p'], 2)}, {t['n']} seeds{f', {diverged} diverged' if diverged else ''}) → {outcome}")
        rows.append([label, f"{a} @ {fmt(la)}", mean_ci_text(xa), f"{b} @ {fmt(lb)}", mean_ci_text(xb),
                     f"{pp(t['mean'])} [{pp(t['lo'])}, {pp(t['hi'])}]", fmt(t["p"], 2), outcome])
    ax = axes[-1]
    ax.axvspan(-100 * margin, 100 * margin, color="#1a7f37", alpha=0.12, label=f"equivalence ±{100 * margin:g} pp")
    for k, (label, t, p) in enumerate(results):
        if not math.isnan(t["mean"]):
            ax.errorbar(100 * t["mean"], k, xerr=[[100 * (t["mean"] - t["lo"])], [100 * (t["hi"] - t["mean"])]],
                        fmt="o", color=COLOURS[k], capsize=6, label=f"{label}: 90% CI")
            ax.errorbar(100 * p["mean"], k - 0.15, xerr=[[100 * (p["mean"] - p["lo"])], [100 * (p["hi"] - p["mean"])]],
                        fmt="s", color=COLOURS[k], alpha=0.5, capsize=3, label=f"{label}: 95% CI")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(results)), [r[0] for r in results])
    ax.set(xlabel="difference (pp)", title="paired difference")
    ax.legend(fontsize=7, loc="best")
    save(fig, figure, exp.decl["title"])
    first = results[0][1] if results else {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    v = verdict(labstats.combine(outcomes), " ".join(p + "." for p in parts), effect=first["mean"],
                ci=(first["lo"], first["hi"]), unit=f"{metric} difference, {results[0][0] if results else ''} (90% CI)",
                parts={r[0]: {k: r[1][k] for k in ("mean", "lo", "hi", "p", "equivalent", "n")} for r in results})
    return {"verdict": v, "tables": [(["model", "arm A", f"{metric} A", "arm B", f"{metric} B",
                                       "A − B [90% CI]", "TOST p", "outcome"], rows)]}


KINDS = {
    "lr_sweep": lr_sweep,
    "time_to_target": time_to_target,
    "equivalence": equivalence,
}
