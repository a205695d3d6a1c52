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


def combined_verdict(outcomes, sentences, first, unit, **extra):
    """The verdict of a claim tested in parts (per model, per optimizer, ...):
    the parts' outcomes combined, their sentences as the summary, the first
    part's effect and interval as the headline."""
    first = first or {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    return verdict(labstats.combine(outcomes), " ".join(p + "." for p in sentences), effect=first["mean"],
                   ci=(first["lo"], first["hi"]), unit=unit, **extra)


def ci_text(r, digits=3):
    return f"{fmt(r['mean'], digits)} [{fmt(r['lo'], digits)}, {fmt(r['hi'], digits)}]"


def reaches(r, need):
    """For a claim that an effect reaches `need`: supported when the interval lies
    at or above it (and above 0), not supported when entirely below it."""
    if r["n"] >= 2 and r["lo"] >= need - 1e-9 and r["hi"] > 0 and r["mean"] > 0:
        return "supported"
    if r["n"] >= 2 and r["hi"] < need - 1e-9:
        return "not supported"
    return "inconclusive"


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
        outcome = reaches(r, math.log10(c.get("min_ratio", 3.0)))
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
    v = combined_verdict(outcomes, parts, bars[0][1] if bars else None,
                         f"log10(steps ratio), {bars[0][0] if bars else ''}",
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
    v = combined_verdict(outcomes, parts, results[0][1] if results else None,
                         f"{metric} difference, {results[0][0] if results else ''} (90% CI)",
                         parts={r[0]: {k: r[1][k] for k in ("mean", "lo", "hi", "p", "equivalent", "n")}
                                for r in results})
    return {"verdict": v, "tables": [(["model", "arm A", f"{metric} A", "arm B", f"{metric} B",
                                       "A − B [90% CI]", "TOST p", "outcome"], rows)]}


# ---------------------------------------------------------------- shared by the probe analyses

def probe_series(run, layer_pick=-1):
    """(steps, percentiles[probe][unit][q], gammas, betas) of one activation
    layer (default: the last) from the run's probes."""
    steps, pct, gam, bet = [], [], [], []
    for s in run.steps():
        p = s.get("probe")
        if not p or not p["activations"]:
            continue
        act = p["activations"][layer_pick]
        steps.append(s["step"])
        pct.append(act["percentiles"])
        norm = [n for n in p["norms"] if n["layer"] < act["layer"]]
        gam.append(norm[-1]["gamma"] if norm else None)
        bet.append(norm[-1]["beta"] if norm else None)
    return steps, pct, gam, bet


def drift(run, layer_pick=-1):
    """Mean over the probed units of D = sum over probes of |change of the median|."""
    _, pct, _, _ = probe_series(run, layer_pick)
    if len(pct) < 2:
        return None
    med = np.asarray([[u[len(u) // 2] for u in probe] for probe in pct])  # probes × units
    return float(np.mean(np.sum(np.abs(np.diff(med, axis=0)), axis=0)))


def curve(run, key):
    pts = [(s["step"], s[key]) for s in run.steps() if s.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_band(ax, runs, key, colour, label):
    """Mean ± 95% band of a per-step series over runs (aligned on the first run's steps)."""
    runs = [r for r in runs if curve(r, key)[0]]
    if not runs:
        return
    x = curve(runs[0], key)[0]
    ys = np.full((len(runs), len(x)), np.nan)
    for i, r in enumerate(runs):
        xs, y = curve(r, key)
        for j, v in enumerate(y[:len(x)]):
            ys[i, j] = v
    band(ax, x, ys, colour, label)
    for r in runs:
        if r.diverged:
            xs, y = curve(r, key)
            if xs:
                ax.plot(xs[-1], y[-1], "x", color=colour, ms=9, mew=2)


# ---------------------------------------------------------------- 1: the BN paper's Figure 1

def figure1(exp, figure):
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    arm, base = c["arm"], c["baseline"]
    alpha = c.get("alpha", 0.05)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), gridspec_kw={"width_ratios": [1.3, 1, 1, 0.8]})
    ax = axes[0]
    for i, name in enumerate((arm, base)):
        curves_band(ax, exp.select(name), "test_acc", COLOURS[i], name)
    ax.set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy (mean, 95% CI)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    for k, name in enumerate((base, arm)):
        ax = axes[1 + k]
        runs = exp.select(name)
        if runs:
            steps, pct, gam, bet = probe_series(runs[0])
            if pct:
                p = np.asarray([probe[0] for probe in pct])  # unit 0: probes × q
                ax.fill_between(steps, p[:, 0], p[:, -1], color=COLOURS[1 - k], alpha=0.25, lw=0,
                                label="15th-85th percentile")
                ax.plot(steps, p[:, len(p[0]) // 2], color=COLOURS[1 - k], label="median")
                if gam[0] is not None:
                    g = np.asarray([x[0] for x in gam])
                    b = np.asarray([x[0] for x in bet])
                    ax.plot(steps, b + 1.036 * g, "k--", lw=1, label="β ± 1.036γ (by construction)")
                    ax.plot(steps, b - 1.036 * g, "k--", lw=1)
                ax.legend(fontsize=7, loc="upper left")
        ax.set(xlabel="training step", ylabel="input of a last-layer sigmoid",
               title=f"({'bc'[k]}) {name}, one unit, seed 1")
        ax.grid(True, alpha=0.3)
    # shared y range for (b) and (c): the same scale makes the stability visible
    lo = min(axes[1].get_ylim()[0], axes[2].get_ylim()[0])
    hi = max(axes[1].get_ylim()[1], axes[2].get_ylim()[1])
    axes[1].set_ylim(lo, hi)
    axes[2].set_ylim(lo, hi)
    ax = axes[3]
    drifts = {name: [drift(r) for r in exp.select(name)] for name in (arm, base)}
    for i, name in enumerate((arm, base)):
        vals = [d for d in drifts[name] if d is not None]
        ax.plot([i] * len(vals), vals, "o", color=COLOURS[i], alpha=0.7)
    ax.set_xticks([0, 1], [arm, base])
    ax.set(ylabel="drift D (mean over units)", title="(d) drift of the medians", xlim=(-0.5, 1.5))
    ax.grid(True, alpha=0.3)
    save(fig, figure, exp.decl["title"])

    early = a.get("early_steps", 2000)

    def early_mean(run):
        xs, ys = curve(run, "test_acc")
        v = [y for x, y in zip(xs, ys) if 0 < x <= early]
        return float(np.mean(v)) if v and not run.diverged else None

    ra = {r.seed: r for r in exp.select(arm)}
    rb = {r.seed: r for r in exp.select(base)}
    seeds = sorted(set(ra) & set(rb))
    pairs = [(early_mean(ra[s]), early_mean(rb[s])) for s in seeds]
    d1 = [x - y for x, y in pairs if x is not None and y is not None]
    p1 = labstats.superiority(d1, alpha, 1)
    dd = [(drift(rb[s]), drift(ra[s])) for s in seeds]
    d2 = [x - y for x, y in dd if x is not None and y is not None]
    p2 = labstats.superiority(d2, alpha, 1)
    finals = {name: [r.value("test_acc") for r in exp.select(name)] for name in (arm, base)}
    rows = [[name, mean_ci_text([early_mean(r) for r in exp.select(name)]),
             mean_ci_text(finals[name]), mean_ci_text(drifts[name]),
             sum(r.diverged for r in exp.select(name))] for name in (arm, base)]
    v = verdict(labstats.combine([p1["outcome"], p2["outcome"]]),
                f"Early training (steps ≤ {early}): BN − no BN test accuracy {pp(p1['mean'])} "
                f"(95% CI [{pp(p1['lo'])}, {pp(p1['hi'])}], {p1['n']} seeds) → {p1['outcome']}. "
                f"Drift of the last layer's sigmoid inputs: no BN − BN = {fmt(p2['mean'], 3)} "
                f"(95% CI [{fmt(p2['lo'], 3)}, {fmt(p2['hi'], 3)}]) → {p2['outcome']}; with BN the "
                f"15th/85th percentiles sit at β ± 1.04γ by construction, so stability there mostly shows "
                f"that γ and β move slowly.",
                effect=p1["mean"], ci=(p1["lo"], p1["hi"]), unit="early test accuracy difference",
                parts={"early_accuracy": {k: p1[k] for k in ("mean", "lo", "hi", "n", "outcome")},
                       "drift": {k: p2[k] for k in ("mean", "lo", "hi", "n", "outcome")}})
    return {"verdict": v, "tables": [(["arm", f"mean test acc, steps ≤ {early}", "final test acc",
                                       "drift D", "diverged"], rows)]}


# ---------------------------------------------------------------- 4: init-scale sweep

def init_sweep(exp, figure):
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    metric, within = a.get("metric", "val_acc"), a.get("within", 0.03)
    pairs = c["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 4.4), squeeze=False)
    outcomes, parts, rows, first = [], [], [], None
    for k, (arm, base, label) in enumerate(pairs):
        ax = axes[0][k]
        widths = {}
        for i, name in enumerate((arm, base)):
            scales = sorted(exp.grid_values("init_std", name))
            seeds = sorted({r.seed for r in exp.select(name)})
            acc = np.full((len(seeds), len(scales)), np.nan)
            for j, sc in enumerate(scales):
                for r in exp.select(name, init_std=sc):
                    if r.diverged:
                        ax.plot(sc, 0.02, "x", color=COLOURS[i], ms=9, mew=2, transform=ax.get_xaxis_transform())
                    else:
                        acc[seeds.index(r.seed), j] = r.value(metric)
            if seeds:
                band(ax, scales, acc, COLOURS[i], name, marker="o")
            means = np.nanmean(np.where(np.isnan(acc), 0.0, acc), axis=0) if seeds else []
            best = float(np.max(means)) if len(means) else math.nan
            # per seed: usable scales (within `within` of the arm's best mean), half a decade each
            step = np.median(np.diff(np.log10(scales))) if len(scales) > 1 else 0.5
            widths[name] = {s: step * sum(1 for j in range(len(scales))
                                          if not np.isnan(acc[si, j]) and acc[si, j] >= best - within)
                            for si, s in enumerate(seeds)}
            for j, sc in enumerate(scales):
                rows.append([label, name, fmt(sc), mean_ci_text(list(acc[:, j][~np.isnan(acc[:, j])])),
                             sum(r.diverged for r in exp.select(name, init_std=sc))])
        ax.set(xscale="log", xlabel="init std s (weights ~ N(0, s²))", ylabel=metric.replace("_", " "),
               title=f"{label}: final {metric.replace('_', ' ')} (95% CI; × diverged)")
        for std, name in ((math.sqrt(2 / 50), "He (hidden)"), (math.sqrt(2 / 784), "He (first)")):
            ax.axvline(std, color="grey", ls=":", lw=1)
            ax.text(std, 0.98, name, rotation=90, va="top", ha="right", fontsize=7, transform=ax.get_xaxis_transform())
        ax.grid(True, alpha=0.3)
        ax.legend(loc="center left")
        seeds = sorted(set(widths[arm]) & set(widths[base]))
        d = [widths[arm][s] - widths[base][s] for s in seeds]
        r = labstats.paired(d, [0.0] * len(d), c.get("alpha", 0.05))
        need = c.get("min_decades", 2)
        if r["n"] >= 2 and r["mean"] >= need and r["lo"] > 0:
            outcome = "supported"
        elif r["n"] >= 2 and r["hi"] < need:
            outcome = "not supported"
        else:
            outcome = "inconclusive"
        outcomes.append(outcome)
        first = first or r
        parts.append(f"{label}: usable range {np.mean([widths[arm][s] for s in seeds]) if seeds else math.nan:.2g} "
                     f"decades with BN, {np.mean([widths[base][s] for s in seeds]) if seeds else math.nan:.2g} without; "
                     f"difference {fmt(r['mean'], 3)} decades (95% CI [{fmt(r['lo'], 3)}, {fmt(r['hi'], 3)}], "
                     f"{r['n']} seeds) → {outcome}")
    save(fig, figure, exp.decl["title"])
    v = combined_verdict(outcomes, parts, first, f"decades of usable init scale, {pairs[0][2]}")
    return {"verdict": v, "tables": [(["optimizer", "arm", "init std", f"{metric} [95% CI]", "diverged"], rows)]}


# ---------------------------------------------------------------- 5: regularization

def gap(run):
    if run.diverged or run.value("test_acc") is None:
        return None
    return run.value("train_acc") - run.value("test_acc")


def regularization(exp, figure):
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    arm, base, alpha = c["arm"], c["baseline"], c.get("alpha", 0.05)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    ax = axes[0]
    rows = []
    names = exp.arms()
    for i, name in enumerate(names):
        runs = exp.select(name)
        g = [gap(r) for r in runs]
        t = [r.value("test_acc") for r in runs]
        vals = [100 * x for x in g if x is not None]
        ax.plot([i] * len(vals), vals, "o", color=COLOURS[i % len(COLOURS)], alpha=0.6)
        if len(vals) >= 2:
            m, lo, hi = labstats.t_interval(vals)
            ax.errorbar(i + 0.15, m, yerr=[[m - lo], [hi - m]], fmt="s", color="black", capsize=4)
        rows.append([name, mean_ci_text([r.value("train_acc") for r in runs]), mean_ci_text(t),
                     mean_ci_text(g, scale=100, digits=3), sum(r.diverged for r in runs)])
    ax.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ").replace(", ", "\n") for n in names], fontsize=8)
    ax.set(ylabel="train acc − test acc (pp)", title="generalization gap per seed (95% CI)")
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    for i, name in enumerate([n for n in (base, arm, "BN frozen after epoch 2") if n in names]):
        runs = exp.select(name)
        if not runs:
            continue
        ep = [m["epoch"] for m in runs[0].metrics()]
        for key, ls in (("train_acc", "-"), ("val_acc", "--")):
            ys = np.full((len(runs), len(ep)), np.nan)
            for si, r in enumerate(runs):
                for j, m in enumerate(r.metrics()[:len(ep)]):
                    ys[si, j] = m.get(key, np.nan)
            means = np.nanmean(ys, axis=0)
            ax.plot(ep, means, ls, color=COLOURS[i], label=f"{name}, {key.split('_')[0]}")
    ax.set(xlabel="epoch", ylabel="accuracy", title="train (solid) and validation (dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[2]
    xs, ms, los, his = [], [], [], []
    for name, batch in a.get("batch_arms", []):
        g = [100 * x for x in (gap(r) for r in exp.select(name)) if x is not None]
        if g:
            m, lo, hi = labstats.t_interval(g)
            xs.append(batch), ms.append(m), los.append(lo if not math.isnan(lo) else m), his.append(hi if not math.isnan(hi) else m)
    if xs:
        ax.plot(xs, ms, "-o", color=COLOURS[1])
        ax.fill_between(xs, los, his, color=COLOURS[1], alpha=0.2)
    ax.set(xscale="log", xlabel="batch size (lr scaled linearly)", ylabel="gap (pp)", title="BN: gap vs batch size")
    ax.grid(True, alpha=0.3)
    save(fig, figure, exp.decl["title"])
    ra = {r.seed: r for r in exp.select(arm)}
    rb = {r.seed: r for r in exp.select(base)}
    seeds = sorted(set(ra) & set(rb))
    d1 = [gap(rb[s]) - gap(ra[s]) for s in seeds if gap(ra[s]) is not None and gap(rb[s]) is not None]
    d2 = [ra[s].value("test_acc") - rb[s].value("test_acc") for s in seeds
          if ra[s].value("test_acc") is not None and rb[s].value("test_acc") is not None]
    p1 = labstats.superiority(d1, alpha, 1)
    p2 = labstats.superiority(d2, alpha, 1)
    extra = ""
    fz = {r.seed: r for r in exp.select("BN frozen after epoch 2")}
    d3 = [gap(fz[s]) - gap(ra[s]) for s in sorted(set(fz) & set(ra)) if gap(fz[s]) is not None and gap(ra[s]) is not None]
    if len(d3) >= 2:
        p3 = labstats.paired(d3, [0.0] * len(d3), alpha)
        extra = (f" Control: frozen BN (no batch noise after epoch 2) − BN gap {pp(p3['mean'])} "
                 f"(95% CI [{pp(p3['lo'])}, {pp(p3['hi'])}]).")
    v = verdict(labstats.combine([p1["outcome"], p2["outcome"]]),
                f"Gap no BN − BN {pp(p1['mean'])} (95% CI [{pp(p1['lo'])}, {pp(p1['hi'])}], {p1['n']} seeds) → "
                f"{p1['outcome']}; test accuracy BN − no BN {pp(p2['mean'])} (95% CI [{pp(p2['lo'])}, "
                f"{pp(p2['hi'])}]) → {p2['outcome']}.{extra}",
                effect=p1["mean"], ci=(p1["lo"], p1["hi"]), unit="gap reduction (accuracy fraction)",
                parts={"gap": {k: p1[k] for k in ("mean", "lo", "hi", "n", "outcome")},
                       "test_acc": {k: p2[k] for k in ("mean", "lo", "hi", "n", "outcome")}})
    return {"verdict": v, "tables": [(["arm", "train acc", "test acc", "gap (pp)", "diverged"], rows)]}


# ---------------------------------------------------------------- 6: input standardization

def condition_number(path):
    """cond(X_cᵀX_c) of a scikit-learn CSV (raw) and after z-scoring."""
    try:
        x = np.loadtxt(path, delimiter=",", skiprows=1)[:, :-1]
    except Exception:  # noqa: BLE001 - a missing table only loses this number
        return None
    xc = x - x.mean(axis=0)
    z = xc / np.where(x.std(axis=0) > 0, x.std(axis=0), 1)
    return float(np.linalg.cond(xc.T @ xc)), float(np.linalg.cond(z.T @ z))


def input_scaling(exp, figure):
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    alpha = c.get("alpha", 0.05)
    datasets, kinds = a["datasets"], a["arms"]
    present = [d for d in datasets if any(exp.select(f"{d} {k}") for k in kinds)]
    fig, axes = plt.subplots(2, max(len(present), 1), figsize=(5.5 * max(len(present), 1), 8.2), squeeze=False)
    outcomes, parts, rows = [], [], []
    first = None
    for k, ds in enumerate(present):
        ax, hx = axes[0][k], axes[1][k]
        best, grid = {}, None
        heat = []
        for i, kind in enumerate(kinds):
            name = f"{ds} {kind}"
            if not exp.select(name):
                continue
            lrs = sorted(exp.grid_values("lr", name))
            grid = lrs
            best[kind], _ = best_lr(exp, name, lambda r: 0.0 if r.diverged else (r.value("val_acc") or 0.0))
            runs = exp.select(name, lr=best[kind])
            if runs and runs[0].metrics():
                ep = [m["epoch"] for m in runs[0].metrics()]
                ys = np.full((len(runs), len(ep)), np.nan)
                for si, r in enumerate(runs):
                    for j, m in enumerate(r.metrics()[:len(ep)]):
                        ys[si, j] = math.log10(max(m["train_loss"], 1e-6))
                band(ax, ep, ys, COLOURS[i], f"{kind} (lr {fmt(best[kind])})")
                for r in runs:
                    if r.diverged and r.metrics():
                        m = r.metrics()[-1]
                        ax.plot(m["epoch"], math.log10(max(m["train_loss"], 1e-6)), "x", color=COLOURS[i], ms=9, mew=2)
            row = []
            for lr in lrs:
                rs = exp.select(name, lr=lr)
                ok = [r.value("val_acc") for r in rs if not r.diverged and r.value("val_acc") is not None]
                row.append(np.mean(ok) if ok and len(ok) == len(rs) else np.nan)
            heat.append(row)
            stable = [lr for lr in lrs if all(not r.diverged for r in exp.select(name, lr=lr))]
            rows.append([ds, kind, fmt(best[kind]),
                         mean_ci_text([r.value("train_loss") for r in exp.select(name, lr=best[kind])]),
                         mean_ci_text([r.value("test_acc") for r in exp.select(name, lr=best[kind])]),
                         fmt(max(stable)) if stable else "–",
                         f"{sum(r.diverged for r in exp.select(name))}/{len(exp.select(name))}"])
        ax.set(xlabel="epoch", ylabel="log10 training loss", title=f"{ds}: at each arm's best lr (95% CI)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        if heat and grid:
            h = np.asarray(heat, dtype=float)
            cmap = plt.get_cmap("viridis").copy()
            cmap.set_bad("#cf222e")
            hx.imshow(np.ma.masked_invalid(h), cmap=cmap, vmin=0, vmax=1, aspect="auto")
            hx.set_xticks(range(len(grid)), [fmt(g) for g in grid])
            hx.set_yticks(range(len(heat)), [kd for kd in kinds if exp.select(f"{ds} {kd}")])
            for yi in range(h.shape[0]):
                for xi in range(h.shape[1]):
                    hx.text(xi, yi, "div." if np.isnan(h[yi, xi]) else f"{h[yi, xi]:.2f}", ha="center",
                            va="center", fontsize=8, color="white" if np.isnan(h[yi, xi]) or h[yi, xi] < 0.6 else "black")
            hx.set(xlabel="learning rate", title=f"{ds}: validation accuracy (red: a seed diverged)")
        arm, base = f"{ds} {c['arm']}", f"{ds} {c['baseline']}"
        if c["arm"] in best and c["baseline"] in best:
            ra = {r.seed: r for r in exp.select(arm, lr=best[c["arm"]])}
            rb = {r.seed: r for r in exp.select(base, lr=best[c["baseline"]])}
            seeds = sorted(set(ra) & set(rb))
            d = [rb[s].value("train_loss") - ra[s].value("train_loss") for s in seeds
                 if ra[s].value("train_loss") is not None and rb[s].value("train_loss") is not None]
            r = labstats.superiority(d, alpha, 1)
            # Raw inputs that diverge at every learning rate of the grid, where the
            # standardized ones train: no loss to pair, and the claim holds for that seed.
            lost = [s for s in seeds if rb[s].diverged and not ra[s].diverged]
            if lost and len(lost) == len(seeds) and len(seeds) >= 2:
                r["outcome"] = "supported"
            outcomes.append(r["outcome"])
            first = first or r
            parts.append(f"{ds}: final training loss raw − standardized {fmt(r['mean'], 3)} (95% CI "
                         f"[{fmt(r['lo'], 3)}, {fmt(r['hi'], 3)}], {r['n']} seeds"
                         + (f"; raw diverged at every learning rate in {len(lost)} of {len(seeds)} seeds" if lost else "")
                         + f") → {r['outcome']}")
    save(fig, figure, exp.decl["title"])
    notes = []
    for ds in ("cancer", "wine"):
        for arm in exp.decl["arms"]:
            if arm["name"].startswith(ds) and "data" in arm["train"]:
                cn = condition_number(arm["train"]["data"])
                if cn:
                    notes.append(f"{ds}: cond(XᵀX) of the centred features {cn[0]:.3g} raw, {cn[1]:.3g} standardized")
                break
    v = combined_verdict(outcomes, parts, first, f"training-loss difference, {present[0] if present else ''}")
    return {"verdict": v, "notes": "; ".join(notes) + ("." if notes else ""),
            "tables": [(["data", "arm", "best lr", "train loss", "test acc", "largest stable lr", "diverged"], rows)]}


# ---------------------------------------------------------------- 8: internal covariate shift

def mean_ics(run):
    v = [w["ics_distance"] for s in run.steps() if s.get("probe") and s["step"] > 0
         for w in s["probe"]["weights"] if "ics_distance" in w]
    return float(np.mean(v)) if v and not run.diverged else None


def covariate_shift(exp, figure):
    c = exp.decl["criterion"]
    alpha = c.get("alpha", 0.05)
    names = exp.arms()
    lrs = sorted(exp.grid_values("lr"))
    fig, axes = plt.subplots(len(lrs), 3, figsize=(16, 4.0 * len(lrs)), squeeze=False)
    outcomes, parts, rows = [], [], []
    first = None
    for k, lr in enumerate(lrs):
        ax, px, ix = axes[k]
        for i, name in enumerate(names):
            curves_band(ax, exp.select(name, lr=lr), "train_loss", COLOURS[i], name)
            runs = exp.select(name, lr=lr)
            if runs:
                steps, pct, _, _ = probe_series(runs[0])
                if pct:
                    p = np.asarray([probe[0] for probe in pct])
                    px.fill_between(steps, p[:, 0], p[:, -1], color=COLOURS[i], alpha=0.2, lw=0)
                    px.plot(steps, p[:, len(p[0]) // 2], color=COLOURS[i], label=name)
            ics = []
            for r in runs:
                pts = [(s["step"], np.mean([w["ics_distance"] for w in s["probe"]["weights"] if "ics_distance" in w]))
                       for s in r.steps() if s.get("probe") and s["step"] > 0]
                ics.append(pts)
            if ics and ics[0]:
                x = [p[0] for p in ics[0]]
                ys = np.full((len(ics), len(x)), np.nan)
                for si, pts in enumerate(ics):
                    for j, (_, y) in enumerate(pts[:len(x)]):
                        ys[si, j] = y
                band(ix, x, ys, COLOURS[i], name)
            rows.append([fmt(lr), name, mean_ci_text([r.value("train_loss") for r in runs]),
                         mean_ci_text([drift(r) for r in runs if not r.diverged], digits=3),
                         mean_ci_text([mean_ics(r) for r in runs], digits=3), sum(r.diverged for r in runs)])
        ax.set(yscale="log", xlabel="step", ylabel="training loss (last 50 steps)", title=f"lr {fmt(lr)}: training loss")
        px.set(xlabel="step", ylabel="input of a last-layer ReLU", title="one unit (seed 1): median, 15th-85th pct")
        ix.set(xlabel="step", ylabel="‖G − G'‖ / ‖G‖ (mean over layers)", title="gradient ICS (Santurkar)")
        for x in (ax, px, ix):
            x.grid(True, alpha=0.3)
            x.legend(fontsize=7)
        by = {name: {r.seed: r for r in exp.select(name, lr=lr)} for name in names}
        none, bn, noisy = by.get("no BN", {}), by.get("BN", {}), by.get("noisy BN", {})
        seeds = sorted(set(none) & set(bn) & set(noisy))

        def vals(f, x, y):
            out = []
            for s in seeds:
                fx, fy = f(x[s]), f(y[s])
                if fx is not None and fy is not None:
                    out.append(fx - fy)
            return out

        loss = lambda r: r.value("train_loss")  # noqa: E731
        a1 = labstats.superiority(vals(loss, none, noisy), alpha, 1)       # noisy trains better than none
        if len(seeds) >= 2 and all(none[s].diverged and not noisy[s].diverged for s in seeds):
            a1["outcome"] = "supported"  # no BN diverged in every seed, noisy BN trained
        b1 = labstats.superiority(vals(drift, noisy, none), alpha, 1)      # noisy drifts more than none
        if a1["outcome"] == "supported" and b1["outcome"] == "supported":
            o1 = "not supported"
        elif a1["outcome"] == "not supported":
            o1 = "supported"
        else:
            o1 = "inconclusive"
        c2 = labstats.superiority(vals(mean_ics, none, bn), alpha, 1)     # BN reduces gradient ICS
        outcomes += [o1, c2["outcome"]]
        first = first or c2
        parts.append(f"lr {fmt(lr)}: final training loss no BN − noisy BN {ci_text(a1)} (95% CI), drift "
                     f"noisy BN − no BN {ci_text(b1)} → {o1}; gradient ICS no BN − BN {ci_text(c2)} → {c2['outcome']}")
    save(fig, figure, exp.decl["title"])
    v = combined_verdict(outcomes, parts, first, f"gradient ICS, no BN − BN, lr {fmt(lrs[0]) if lrs else ''}")
    return {"verdict": v, "tables": [(["lr", "arm", "final train loss", "drift D", "gradient ICS", "diverged"], rows)]}


# ---------------------------------------------------------------- 9: gradient flow and depth

def grad_norms(run, step):
    for s in run.steps():
        if s["step"] == step and s.get("probe"):
            return [w["grad_norm"] for w in s["probe"]["weights"]]
    return None


def log_ratio(run, step=0):
    """log10(first weight layer's gradient norm / last hidden weight layer's)."""
    g = grad_norms(run, step)
    if not g or len(g) < 3 or g[0] <= 0 or g[-2] <= 0:
        return None
    return math.log10(g[0] / g[-2])


def gradient_flow(exp, figure):
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    alpha = c.get("alpha", 0.05)
    names = exp.arms()
    depths = sorted(exp.grid_values("depth"))
    deepest = depths[-1] if depths else None
    probe_steps = sorted({s["step"] for r in exp.runs for s in r.steps() if s.get("probe")})
    shown = [st for st in (0, probe_steps[-1] if probe_steps else 0)]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, st in enumerate(dict.fromkeys(shown)):
        ax = axes[k]
        for i, name in enumerate(names):
            runs = exp.select(name, depth=deepest)
            gs = [grad_norms(r, st) for r in runs]
            gs = [g for g in gs if g]
            if not gs:
                continue
            L = len(gs[0])
            ys = np.asarray([[math.log10(max(x, 1e-30)) for x in g[:L]] for g in gs])
            band(ax, list(range(1, L + 1)), ys, COLOURS[i], name)
            if len(gs[0]) > 3:
                slope = np.polyfit(np.arange(1, L), ys.mean(axis=0)[:L - 1], 1)[0]
                ax.text(0.01, 0.97 - 0.06 * i, f"{name}: {-slope:+.3f} decades/layer toward the input",
                        transform=ax.transAxes, fontsize=7, color=COLOURS[i], va="top")
        ax.set(xlabel="weight layer (1 = input side)", ylabel="log10 ‖∂L/∂W‖",
               title=f"depth {deepest}, step {st}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    rows = []
    for i, name in enumerate(names):
        seeds = sorted({r.seed for r in exp.select(name)})
        acc = np.full((len(seeds), len(depths)), np.nan)
        for j, d in enumerate(depths):
            for r in exp.select(name, depth=d):
                if r.diverged:
                    ax.plot(d, 0.02, "x", color=COLOURS[i], ms=9, mew=2, transform=ax.get_xaxis_transform())
                else:
                    acc[seeds.index(r.seed), j] = r.value("val_acc")
            rs = exp.select(name, depth=d)
            rows.append([name, d, mean_ci_text([r.value("val_acc") for r in rs]),
                         mean_ci_text([log_ratio(r) for r in rs], digits=3), sum(r.diverged for r in rs)])
        if seeds:
            band(ax, depths, acc, COLOURS[i], name, marker="o")
    ax.axhline(a.get("trainable", 0.5), color="grey", ls=":", lw=1)
    ax.set(xscale="log", xlabel="depth (hidden layers)", ylabel="final validation accuracy",
           title="trainability by depth (× diverged)")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, figure, exp.decl["title"])
    outcomes, parts = [], []
    first = None
    for act in ("sigmoid", "ReLU"):
        bn = {r.seed: r for r in exp.select(f"{act}, BN", depth=deepest)}
        nb = {r.seed: r for r in exp.select(f"{act}, no BN", depth=deepest)}
        seeds = sorted(set(bn) & set(nb))
        d = [abs(log_ratio(nb[s])) - abs(log_ratio(bn[s])) for s in seeds
             if log_ratio(nb[s]) is not None and log_ratio(bn[s]) is not None]
        r = labstats.superiority(d, alpha, 1)
        outcomes.append(r["outcome"])
        first = first or r
        rb = [log_ratio(bn[s]) for s in seeds if log_ratio(bn[s]) is not None]
        rn = [log_ratio(nb[s]) for s in seeds if log_ratio(nb[s]) is not None]
        parts.append(f"{act}, depth {deepest}, at init: log10(first/last-hidden gradient norm) "
                     f"{fmt(np.mean(rb) if rb else math.nan, 3)} with BN, {fmt(np.mean(rn) if rn else math.nan, 3)} "
                     f"without; |r_noBN| − |r_BN| = {fmt(r['mean'], 3)} [{fmt(r['lo'], 3)}, {fmt(r['hi'], 3)}] → {r['outcome']}")
    trainable = a.get("trainable", 0.5)

    def max_depth(name, seed):
        ok = [d for d in depths for r in exp.select(name, depth=d)
              if r.seed == seed and not r.diverged and (r.value("val_acc") or 0) >= trainable]
        return max(ok) if ok else None

    dd = []
    for act in ("ReLU", "sigmoid"):
        for s in sorted({r.seed for r in exp.runs}):
            x, y = max_depth(f"{act}, BN", s), max_depth(f"{act}, no BN", s)
            if x is not None and y is not None:
                dd.append(math.log2(x / y))
    r3 = labstats.superiority(dd, alpha, 1)
    if r3["n"] >= 2 and r3["lo"] == r3["hi"] == 0:
        r3["outcome"] = "not supported"  # every seed: the same largest trainable depth
    outcomes.append(r3["outcome"])
    parts.append(f"largest trainable depth, log2(BN / no BN) {fmt(r3['mean'], 3)} [{fmt(r3['lo'], 3)}, "
                 f"{fmt(r3['hi'], 3)}] over {r3['n']} seed × activation pairs → {r3['outcome']}")
    v = combined_verdict(outcomes, parts, first, "decades of gradient imbalance removed (sigmoid)")
    return {"verdict": v, "tables": [(["arm", "depth", "val acc", "log10 grad ratio at init", "diverged"], rows)]}


KINDS = {
    "figure1": figure1,
    "time_to_target": time_to_target,
    "lr_sweep": lr_sweep,
    "init_sweep": init_sweep,
    "regularization": regularization,
    "input_scaling": input_scaling,
    "equivalence": equivalence,
    "covariate_shift": covariate_shift,
    "gradient_flow": gradient_flow,
}
