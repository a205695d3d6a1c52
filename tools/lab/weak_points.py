"""The analyses of BN's weak points and its relatives (experiments 10-13):
batch-size dependence, train vs inference statistics, shift robustness, and the
normalization family side by side (with their invariances checked numerically on
normkit's kernels). Same contract as analyses.py: each takes (exp, figure_path)
and returns {"verdict", "tables", "notes"}; KINDS maps the declaration's
"analysis": {"kind": ...} to the function.

Runs declared with "evaluate" carry the results of `normkit eval --json` after
training in their record ("evals": shift × batch-norm statistics source →
accuracy); Run.evaluation reads them.
"""
import math

import matplotlib.pyplot as plt
import numpy as np

import labstats
from analyses import COLOURS, band, ci_text, fmt, mean_ci_text, save, verdict


def evaluation(run, bn_stats="running", shift="none", key="accuracy"):
    """A result of the run's evaluation after training, or None (diverged, missing)."""
    if run.diverged:
        return None
    for e in run.record.get("evals") or []:
        if e["bn_stats"] == bn_stats and e["shift"] == shift:
            return e[key]
    return None


def error_pct(acc):
    return None if acc is None else 100.0 * (1.0 - acc)


def claim_outcome(d, alpha, margin, direction=1):
    """Paired differences d for a claim that the effect is positive (direction +1) or
    negative (-1): supported when the (1 - alpha) t interval lies on the claimed side
    of 0; not supported when it lies on the other side, or when the effect is
    equivalent to 0 (TOST at alpha within ±margin); else inconclusive."""
    r = labstats.superiority(d, alpha, direction)
    if r["outcome"] == "inconclusive" and len(d) >= 2 and margin > 0:
        t = labstats.tost(d, margin, alpha)
        if t["equivalent"]:
            r["outcome"] = "not supported"
            r["equivalent"] = True
    return r


def paired_by_seed(a, b):
    """Paired differences a[seed] - b[seed] over the seeds both have (values not None)."""
    seeds = sorted(set(a) & set(b))
    return [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]


def by_seed(runs, value):
    return {r.seed: value(r) for r in runs}


def diverged_marks(ax, x, colour):
    ax.plot(x, 0.03, "x", color=colour, ms=9, mew=2, transform=ax.get_xaxis_transform())


def log2_axis(ax, values, reverse=True):
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()
    if reverse:
        ax.invert_xaxis()


def rows_by_seed(runs_by_x, xs, value):
    """seeds × len(xs) array of value(run) (NaN where missing or diverged)."""
    seeds = sorted({r.seed for runs in runs_by_x.values() for r in runs})
    m = np.full((max(len(seeds), 1), len(xs)), np.nan)
    for j, x in enumerate(xs):
        for r in runs_by_x.get(x, []):
            v = value(r)
            if v is not None:
                m[seeds.index(r.seed), j] = v
    return m


def outcome_sentence(label, r, unit="pp"):
    eq = " (equivalent to 0)" if r.get("equivalent") else ""
    return (f"{label}: {fmt(r['mean'], 3)} {unit} (95% CI [{fmt(r['lo'], 3)}, {fmt(r['hi'], 3)}], "
            f"{r['n']} seeds) → {r['outcome']}{eq}")


def headline(outcomes, parts, first, unit, **extra):
    first = first or {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    return verdict(labstats.combine(outcomes), " ".join(p + "." for p in parts), effect=first["mean"],
                   ci=(first["lo"], first["hi"]), unit=unit, **extra)


# ---------------------------------------------------------------- 10: batch-size dependence

def batch_size(exp, figure):
    """Test error vs the training batch size, one line per normalization (the GN
    paper's Figure 1); BN also evaluated with precise and batch statistics; the
    BN − GN gap next to the published one. Criterion: the BN − GN error gap at the
    small batch minus the gap at the reference batch (a difference in differences:
    what the training budget does to both at each batch size cancels) must exceed
    0; Batch Renorm's error below BN's at the renorm batch."""
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    alpha, margin = c.get("alpha", 0.05), c.get("margin", 1.0)
    small, ref, renorm_b = c["small"], c["reference"], c.get("renorm_batch", 4)
    bn, gn, brn = c["arm"], c["baseline"], c.get("renorm_arm")
    arms = exp.arms()
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(19, 5))
    rows = []
    all_b = sorted({r.grid["batch_size"] for r in exp.runs})

    def test_error(r):
        return error_pct(r.value("test_acc"))

    for i, name in enumerate(arms):
        bs = sorted({r.grid["batch_size"] for r in exp.select(name)})
        groups = {b: exp.select(name, batch_size=b) for b in bs}
        band(ax, bs, rows_by_seed(groups, bs, test_error), COLOURS[i % len(COLOURS)], name, marker="o")
        for b in bs:
            for r in groups[b]:
                if r.diverged:
                    diverged_marks(ax, b, COLOURS[i % len(COLOURS)])
            rows.append([name, b, fmt(groups[b][0].grid.get("lr")) if groups[b] else "–",
                         mean_ci_text([test_error(r) for r in groups[b]], digits=3),
                         f"{sum(r.diverged for r in groups[b])}/{len(groups[b])}"])
    published = a.get("published_error", {})
    for i, name in enumerate(arms):
        pts = sorted((int(b), e) for b, e in published.get(name, {}).items())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ":", color=COLOURS[i % len(COLOURS)], alpha=0.6)
    if all_b:
        log2_axis(ax, all_b)
    ax.set(xlabel="training batch size (samples)", ylabel="test error (%)",
           title="test error by batch size (mean, 95% CI; × diverged;\ndotted: Wu & He's ImageNet numbers)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    # (b) BN evaluated several ways
    sources = a.get("bn_sources", [["running", "running averages (EMA)"]])
    bn_bs = sorted({r.grid["batch_size"] for r in exp.select(bn)})
    bn_rows = []
    for k, (template, label) in enumerate(sources):
        def value(r, template=template):
            return error_pct(evaluation(r, template.replace("{B}", str(r.grid["batch_size"]))))
        groups = {b: exp.select(bn, batch_size=b) for b in bn_bs}
        band(bx, bn_bs, rows_by_seed(groups, bn_bs, value), COLOURS[k], label, marker="o")
        for b in bn_bs:
            bn_rows.append([label, b, mean_ci_text([value(r) for r in groups[b]], digits=3)])
    if bn_bs:
        log2_axis(bx, bn_bs)
    bx.set(xlabel="training batch size", ylabel="test error (%)", title=f"{bn}: statistics at evaluation")
    bx.grid(True, alpha=0.3)
    bx.legend(fontsize=8)

    # (c) the BN − GN gap by batch size, with the published gap
    gap_rows = []
    gaps = {}
    for b in all_b:
        d = paired_by_seed(by_seed(exp.select(bn, batch_size=b), test_error),
                           by_seed(exp.select(gn, batch_size=b), test_error))
        gaps[b] = labstats.paired(d, [0.0] * len(d), alpha) if d else None
    xs = [b for b in all_b if gaps[b] and not math.isnan(gaps[b]["mean"])]
    if xs:
        m = [gaps[b]["mean"] for b in xs]
        lo = [gaps[b]["lo"] if not math.isnan(gaps[b]["lo"]) else gaps[b]["mean"] for b in xs]
        hi = [gaps[b]["hi"] if not math.isnan(gaps[b]["hi"]) else gaps[b]["mean"] for b in xs]
        cx.plot(xs, m, "-o", color=COLOURS[0], label=f"{bn} − {gn}, here (95% CI)")
        cx.fill_between(xs, lo, hi, color=COLOURS[0], alpha=0.18, lw=0)
        log2_axis(cx, all_b)
    pub_gap = sorted((int(b), published.get(bn, {})[b] - published.get(gn, {})[b])
                     for b in published.get(bn, {}) if b in published.get(gn, {}))
    if pub_gap:
        cx.plot([p[0] for p in pub_gap], [p[1] for p in pub_gap], "s--", color="black",
                label="Wu & He 2018 (ResNet-50, ImageNet)")
    cx.axhline(0, color="grey", lw=1)
    cx.set(xlabel="training batch size", ylabel="error gap (pp)", title=f"{bn} − {gn} test error gap")
    cx.grid(True, alpha=0.3)
    cx.legend(fontsize=8)
    save(fig, figure, exp.decl["title"])
    for b in all_b:
        g = gaps[b]
        pub = dict(pub_gap).get(b)
        gap_rows.append([b, ci_text(g) if g else "–", fmt(pub, 3) if pub is not None else "–"])

    # The verdict.
    outcomes, parts = [], []
    e = {(name, b): by_seed(exp.select(name, batch_size=b), test_error)
         for name in (bn, gn) for b in (small, ref)}
    dd = []
    for s in sorted(set(e[(bn, small)]) & set(e[(gn, small)]) & set(e[(bn, ref)]) & set(e[(gn, ref)])):
        vals = [e[(bn, small)][s], e[(gn, small)][s], e[(bn, ref)][s], e[(gn, ref)][s]]
        if None not in vals:
            dd.append((vals[0] - vals[1]) - (vals[2] - vals[3]))
    r1 = claim_outcome(dd, alpha, margin, 1)
    outcomes.append(r1["outcome"])
    parts.append(outcome_sentence(f"({bn} − {gn} error at batch {small}) − (the same at batch {ref})", r1))
    if brn and exp.select(brn):
        d2 = paired_by_seed(by_seed(exp.select(bn, batch_size=renorm_b), test_error),
                            by_seed(exp.select(brn, batch_size=renorm_b), test_error))
        r2 = claim_outcome(d2, alpha, margin, 1)
        outcomes.append(r2["outcome"])
        parts.append(outcome_sentence(f"{bn} − {brn} error at batch {renorm_b}", r2))
    v = headline(outcomes, parts, r1, f"pp, gap({small}) − gap({ref})")
    return {"verdict": v,
            "tables": [(["arm", "batch", "lr", "test error % [95% CI]", "diverged"], rows),
                       ([f"{bn} evaluated with", "batch", "test error % [95% CI]"], bn_rows),
                       (["batch", f"{bn} − {gn} gap here, pp [95% CI]", "published gap (Wu & He)"], gap_rows)],
            "notes": a.get("notes", "")}


# ---------------------------------------------------------------- 11: train vs inference

def train_inference(exp, figure):
    """Test accuracy with the running statistics (EMA) against precise statistics
    over N samples, batch statistics and frozen BN, per training batch size and EMA
    momentum; the gap per epoch on the validation split. Criterion: at the small
    batch, precise − running accuracy > 0; and that gap larger at the small batch
    than at the large one."""
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    alpha, margin = c.get("alpha", 0.05), c.get("margin", 0.5)
    main, small, large = c["arm"], c["small"], c["large"]
    precise = c["precise"]            # e.g. "precise:10000": the statistics the claim compares with
    ns = a["precise_samples"]          # [100, 300, ...]
    bs = sorted({r.grid["batch_size"] for r in exp.runs})
    arms = exp.arms()
    frozen_arm = a.get("frozen_arm")
    momentum_arms = [n for n in arms if n != frozen_arm]
    fig, axes = plt.subplots(2, max(len(bs), 2), figsize=(6 * max(len(bs), 2), 9.5), squeeze=False)

    def acc(source):
        return lambda r: evaluation(r, source.replace("{B}", str(r.grid["batch_size"])))

    rows = []
    for j, b in enumerate(bs):
        ax = axes[0][j]
        for i, name in enumerate(momentum_arms):
            runs = exp.select(name, batch_size=b)
            seeds = sorted({r.seed for r in runs})
            m = np.full((max(len(seeds), 1), len(ns)), np.nan)
            for k, n in enumerate(ns):
                for r in runs:
                    v = evaluation(r, f"precise:{n}")
                    if v is not None:
                        m[seeds.index(r.seed), k] = 100 * v
            band(ax, ns, m, COLOURS[i], f"{name}: precise BN", marker="o")
            run_acc = [100 * x for x in (acc("running")(r) for r in runs) if x is not None]
            if run_acc:
                mu, lo, hi = labstats.t_interval(run_acc)
                ax.axhline(mu, color=COLOURS[i], ls="--", lw=1.2, label=f"{name}: running (EMA)")
                if not math.isnan(lo):
                    ax.axhspan(lo, hi, color=COLOURS[i], alpha=0.08, lw=0)
            bat = [100 * x for x in (acc("batch:{B}")(r) for r in runs) if x is not None]
            if bat and i == 0:
                ax.axhline(np.mean(bat), color="grey", ls=":", lw=1.5, label=f"batch statistics (batches of {b})")
        if frozen_arm:
            fr = [100 * x for x in (acc("running")(r) for r in exp.select(frozen_arm, batch_size=b)) if x is not None]
            if fr:
                ax.plot([ns[-1]], [np.mean(fr)], "D", color="black", label=f"{frozen_arm} (running)")
        ax.set_xscale("log")
        ax.set(xlabel="precise BN: samples N", ylabel="test accuracy (%)", title=f"trained at batch {b}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        for name in arms:
            runs = exp.select(name, batch_size=b)
            for label, source in (("running (EMA)", "running"), *((f"precise N={n}", f"precise:{n}") for n in ns),
                                  ("precise, train pass", a.get("train_pass", "precise:1000:{B}")),
                                  ("batch statistics", "batch:{B}")):
                vals = [acc(source)(r) for r in runs]
                if any(v is not None for v in vals):
                    rows.append([name, b, label, mean_ci_text([None if v is None else 100 * v for v in vals], digits=4)])
    # (d) the gap precise − running by batch size, per momentum arm
    gx = axes[1][0]
    gap = {}
    for i, name in enumerate(momentum_arms):
        pts = []
        for b in bs:
            runs = exp.select(name, batch_size=b)
            d = paired_by_seed(by_seed(runs, acc(precise)), by_seed(runs, acc("running")))
            r = labstats.paired([100 * x for x in d], [0.0] * len(d), alpha) if d else None
            gap[(name, b)] = r
            if r:
                pts.append((b, r))
        if pts:
            gx.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                        yerr=[[p[1]["mean"] - (p[1]["lo"] if not math.isnan(p[1]["lo"]) else p[1]["mean"]) for p in pts],
                              [(p[1]["hi"] if not math.isnan(p[1]["hi"]) else p[1]["mean"]) - p[1]["mean"] for p in pts]],
                        fmt="-o", color=COLOURS[i], capsize=4, label=name)
    gx.axhline(0, color="grey", lw=1)
    if bs:
        log2_axis(gx, bs)
    gx.set(xlabel="training batch size", ylabel="pp", title=f"{precise} − running, test accuracy (95% CI)")
    gx.grid(True, alpha=0.3)
    gx.legend(fontsize=8)
    # (e) per epoch on the validation split: running vs the per-epoch sources
    ex = axes[1][1]
    epoch_sources = a.get("epoch_sources", [])
    for k, b in enumerate([small, large]):
        runs = exp.select(main, batch_size=b)
        if not runs or not runs[0].metrics():
            continue
        ep = [m["epoch"] for m in runs[0].metrics()]
        for q, (template, label, style) in enumerate([("running", "running", "-")] +
                                                      [(s, s.replace("{B}", str(b)), "--" if q == 0 else ":")
                                                       for q, s in enumerate(epoch_sources)]):
            source = template.replace("{B}", str(b))
            ys = np.full((len(runs), len(ep)), np.nan)
            for si, r in enumerate(runs):
                for t, m in enumerate(r.metrics()[:len(ep)]):
                    v = m.get("val_acc") if source == "running" else (m.get("bn_stats", {}).get(source) or {}).get("val_acc")
                    if v is not None:
                        ys[si, t] = 100 * v
            means = np.nanmean(ys, axis=0) if np.isfinite(ys).any() else None
            if means is not None:
                ex.plot(ep, means, style, color=COLOURS[k], marker="o", ms=3, label=f"batch {b}: {label}")
    ex.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"{main}: per epoch (mean over seeds)")
    ex.grid(True, alpha=0.3)
    ex.legend(fontsize=7)
    for extra in axes[1][2:]:
        extra.axis("off")
    save(fig, figure, exp.decl["title"])

    outcomes, parts = [], []
    runs_s = exp.select(main, batch_size=small)
    d1 = [100 * x for x in paired_by_seed(by_seed(runs_s, acc(precise)), by_seed(runs_s, acc("running")))]
    r1 = claim_outcome(d1, alpha, margin, 1)
    outcomes.append(r1["outcome"])
    parts.append(outcome_sentence(f"{main} at batch {small}: accuracy with {precise} − with the running averages", r1))
    runs_l = exp.select(main, batch_size=large)
    gs = by_seed(runs_s, lambda r: None if acc(precise)(r) is None or acc("running")(r) is None
                 else 100 * (acc(precise)(r) - acc("running")(r)))
    gl = by_seed(runs_l, lambda r: None if acc(precise)(r) is None or acc("running")(r) is None
                 else 100 * (acc(precise)(r) - acc("running")(r)))
    r2 = claim_outcome(paired_by_seed(gs, gl), alpha, margin, 1)
    outcomes.append(r2["outcome"])
    parts.append(outcome_sentence(f"that gap at batch {small} − at batch {large}", r2))
    gap_rows = [[name, b, ci_text(gap[(name, b)]) if gap.get((name, b)) else "–"]
                for name in momentum_arms for b in bs]
    v = headline(outcomes, parts, r1, f"pp accuracy, {precise} − running at batch {small}")
    return {"verdict": v,
            "tables": [(["arm", "batch", "statistics at evaluation", "test accuracy % [95% CI]"], rows),
                       (["arm", "batch", f"{precise} − running, pp [95% CI]"], gap_rows)],
            "notes": a.get("notes", "")}


# ---------------------------------------------------------------- 12: shift robustness

def shift_robustness(exp, figure):
    """Test accuracy under input shifts of rising severity for each line (arm ×
    batch-norm statistics: running, or adapted on unlabeled shifted samples).
    Criterion: (1) robustness without adaptation: the mean accuracy drop over all
    shifts of `baseline` minus that of `arm` (running statistics) > 0; (2) adaptation:
    the mean over all shifts of accuracy(adapted) − accuracy(running) for `arm` > 0."""
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    alpha, margin = c.get("alpha", 0.05), c.get("margin", 0.5)
    kinds = a["shifts"]            # {"noise": [["noise:0.1", 0.1], ...], ...}
    lines = a["lines"]             # [[arm, bn_stats, label], ...]
    all_shifts = [s for k in kinds for s, _ in kinds[k]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.6), squeeze=False)
    for p, (kind, levels) in enumerate(kinds.items()):
        ax = axes[0][p]
        xs = [0.0] + [sev for _, sev in levels]
        names = ["none"] + [s for s, _ in levels]
        for i, (arm, source, label) in enumerate(lines):
            runs = exp.select(arm)
            seeds = sorted({r.seed for r in runs})
            m = np.full((max(len(seeds), 1), len(xs)), np.nan)
            for r in runs:
                for j, s in enumerate(names):
                    v = evaluation(r, source, s)
                    if v is not None:
                        m[seeds.index(r.seed), j] = 100 * v
            band(ax, xs, m, COLOURS[i % len(COLOURS)], label, marker="o")
        ax.set(xlabel=f"{kind} severity", ylabel="test accuracy (%)", title=kind)
        ax.grid(True, alpha=0.3)
        if p == 0:
            ax.legend(fontsize=7)
    save(fig, figure, exp.decl["title"])

    rows = []
    for arm, source, label in lines:
        runs = exp.select(arm)
        row = [label]
        for s in ["none"] + all_shifts:
            row.append(mean_ci_text([None if evaluation(r, source, s) is None else 100 * evaluation(r, source, s)
                                     for r in runs], digits=3))
        rows.append(row)

    def mean_over_shifts(r, source):
        v = [evaluation(r, source, s) for s in all_shifts]
        return None if any(x is None for x in v) else 100 * float(np.mean(v))

    def mean_drop(r, source):
        clean = evaluation(r, source, "none")
        m = mean_over_shifts(r, source)
        return None if clean is None or m is None else 100 * clean - m

    arm, base, adapted = c["arm"], c["baseline"], c["adapted"]
    outcomes, parts = [], []
    d1 = paired_by_seed(by_seed(exp.select(base), lambda r: mean_drop(r, "running")),
                        by_seed(exp.select(arm), lambda r: mean_drop(r, "running")))
    r1 = claim_outcome(d1, alpha, margin, 1)
    outcomes.append(r1["outcome"])
    parts.append(outcome_sentence(f"mean accuracy drop under shift, {base} − {arm} (running statistics)", r1))
    runs = exp.select(arm)
    d2 = [x for x in (None if mean_over_shifts(r, adapted) is None or mean_over_shifts(r, "running") is None
                      else mean_over_shifts(r, adapted) - mean_over_shifts(r, "running") for r in runs)
          if x is not None]
    r2 = claim_outcome(d2, alpha, margin, 1)
    outcomes.append(r2["outcome"])
    parts.append(outcome_sentence(f"{arm}: mean accuracy under shift, {adapted} − running", r2))
    drops = []
    for arm_name, source, label in lines:
        vals = [mean_drop(r, source) for r in exp.select(arm_name)]
        drops.append([label, mean_ci_text([100 * evaluation(r, source, "none") if evaluation(r, source, "none") is not None
                                           else None for r in exp.select(arm_name)], digits=3),
                      mean_ci_text(vals, digits=3)])
    # A shift per-sample affine in intensity (contrast) or global (brightness)
    # passes linearly through the first convolution; its BN, re-estimated, cancels
    # the global part: the note reports how close adapted BN stays to clean there.
    notes = a.get("notes", "")
    v = verdict(labstats.combine(outcomes), " ".join(p + "." for p in parts), effect=r1["mean"],
                ci=(r1["lo"], r1["hi"]), unit=f"pp, drop({base}) − drop({arm})",
                parts={"robust_without_adaptation": {k: r1[k] for k in ("mean", "lo", "hi", "n", "outcome")},
                       "adaptation": {k: r2[k] for k in ("mean", "lo", "hi", "n", "outcome")}})
    return {"verdict": v,
            "tables": [(["line", "clean accuracy %", "mean drop under shift, pp [95% CI]"], drops),
                       (["line", "none"] + all_shifts, rows)],
            "notes": notes}


# ---------------------------------------------------------------- 13: the relatives

TRANSFORMS = [
    ("x → 3x", "scale"),
    ("per-sample scale", "sample_scale"),
    ("per-sample affine", "sample_affine"),
    ("per-channel scale", "channel_scale"),
    ("per-channel affine", "channel_affine"),
    ("per-(sample, channel) affine", "instance_affine"),
]


def _invariance_table(norms):
    """Relative change max|N(T x) − N(x)| / max|N(x)| of each normalization under
    each transform, on normkit's own kernels (its NumPy module), float32, random
    x of shape (8, 6, 5, 5). None when the module cannot be imported."""
    try:
        import normkit  # the build's python/ directory, put on PYTHONPATH by `normkit lab`
    except ImportError:
        return None
    rng = np.random.default_rng(13)
    N, C, H, W = 8, 6, 5, 5
    x = rng.normal(0.5, 1.0, (N, C, H, W)).astype(np.float32)
    a = rng.uniform(0.5, 2.0, (N, 1, 1, 1)).astype(np.float32)
    b = rng.normal(0, 1, (N, 1, 1, 1)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, (1, C, 1, 1)).astype(np.float32)
    t = rng.normal(0, 1, (1, C, 1, 1)).astype(np.float32)
    ai = rng.uniform(0.5, 2.0, (N, C, 1, 1)).astype(np.float32)
    bi = rng.normal(0, 1, (N, C, 1, 1)).astype(np.float32)
    transforms = {"scale": x * 3, "sample_scale": x * a, "sample_affine": x * a + b,
                  "channel_scale": x * s, "channel_affine": x * s + t, "instance_affine": x * ai + bi}
    eps = 1e-10  # invariance is exact only without eps; float32 rounding is what remains
    fns = {
        "BN": lambda v: normkit.batch_norm_forward_training(v, eps=eps)[0],
        "LN": lambda v: normkit.layer_norm_forward(v, [C, H, W], None, None, eps)[0],
        "RMSNorm": lambda v: normkit.rms_norm_forward(v, [C, H, W], None, eps)[0],
        "IN": lambda v: normkit.group_norm_forward(v, C, None, None, eps)[0],
        "none": lambda v: v,
    }
    for g in (2, 3):
        fns[f"GN G={g}"] = lambda v, g=g: normkit.group_norm_forward(v, g, None, None, eps)[0]
    out = {}
    for name in norms:
        key = name if name in fns else None
        if key is None:
            continue
        y = np.asarray(fns[key](np.ascontiguousarray(x)), dtype=np.float64)
        out[name] = {}
        for label, tkey in TRANSFORMS:
            yt = np.asarray(fns[key](np.ascontiguousarray(transforms[tkey])), dtype=np.float64)
            out[name][tkey] = float(np.max(np.abs(yt - y)) / max(np.max(np.abs(y)), 1e-30))
    # Identities of the family: GN with one group is LN, with C groups IN; BN of one sample is IN.
    one_sample_bn = np.concatenate([normkit.batch_norm_forward_training(np.ascontiguousarray(x[i:i + 1]), eps=eps)[0]
                                    for i in range(N)])
    ident = {
        "GN with 1 group ≡ LN": (normkit.group_norm_forward(x, 1, None, None, eps)[0],
                                 normkit.layer_norm_forward(x, [C, H, W], None, None, eps)[0]),
        "BN of a single sample ≡ IN (GN with C groups)": (one_sample_bn,
                                                          normkit.group_norm_forward(x, C, None, None, eps)[0]),
    }
    identities = {k: float(np.max(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)))) for k, (p, q) in ident.items()}
    return out, identities


def relatives(exp, figure):
    """The normalization family on the same CNN: test error at the reference batch
    (Wu & He's Table 1 analogue), its change at the small batch, training speed, and
    each one's invariances measured on normkit's kernels against the prediction the
    declaration states. Criterion: every invariance as predicted; GN within ±margin
    of BN at the reference batch (TOST); LN's error above GN's and IN's above LN's
    (paired CIs)."""
    a = exp.decl["analysis"]
    c = exp.decl["criterion"]
    alpha, margin = c.get("alpha", 0.05), c.get("margin", 1.0)
    small, ref = c["small"], c["reference"]
    arms = exp.arms()

    def test_error(r):
        return error_pct(r.value("test_acc"))

    fig, axes = plt.subplots(1, 4, figsize=(24, 5.2), gridspec_kw={"width_ratios": [1.3, 1.1, 1, 1.4]})
    ax, sx, px, ix = axes
    rows = []
    published = a.get("published_error", {})
    for i, name in enumerate(arms):
        er = [test_error(r) for r in exp.select(name, batch_size=ref)]
        es = [test_error(r) for r in exp.select(name, batch_size=small)]
        good = [e for e in er if e is not None]
        if good:
            m, lo, hi = labstats.t_interval(good)
            ax.bar(i, m, color=COLOURS[i % len(COLOURS)], alpha=0.8)
            if not math.isnan(lo):
                ax.errorbar(i, m, yerr=[[m - lo], [hi - m]], color="black", capsize=5)
        if name in published:
            ax.plot(i, published[name], "k_", ms=22, mew=2.5)
        sens = paired_by_seed(by_seed(exp.select(name, batch_size=small), test_error),
                              by_seed(exp.select(name, batch_size=ref), test_error))
        rs = labstats.paired(sens, [0.0] * len(sens), alpha) if sens else None
        if rs and not math.isnan(rs["mean"]):
            sx.errorbar(i, rs["mean"], yerr=None if math.isnan(rs["lo"]) else [[rs["mean"] - rs["lo"]], [rs["hi"] - rs["mean"]]],
                        fmt="o", color=COLOURS[i % len(COLOURS)], capsize=5)
        speed = [m_["samples_per_second"] for r in exp.select(name) if not r.diverged for m_ in r.metrics()]
        if speed:
            px.bar(i, np.median(speed), color=COLOURS[i % len(COLOURS)], alpha=0.8)
        secs = [m_["seconds"] for r in exp.select(name, batch_size=ref) if not r.diverged for m_ in r.metrics()]
        rows.append([name, mean_ci_text(er, digits=3), fmt(published.get(name), 3) if name in published else "–",
                     mean_ci_text(es, digits=3), ci_text(rs) if rs else "–",
                     f"{np.median(speed):.0f}" if speed else "–", f"{np.median(secs):.2f}" if secs else "–",
                     sum(r.diverged for r in exp.select(name))])
    for x_ in (ax, sx, px):
        x_.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        x_.grid(True, axis="y", alpha=0.3)
    ax.set(ylabel="test error (%)", title=f"batch {ref}: test error (95% CI; black: Wu & He, ImageNet)")
    sx.axhline(0, color="grey", lw=1)
    sx.set(ylabel="pp", title=f"error at batch {small} − at batch {ref} (95% CI)")
    px.set(ylabel="training samples / s (median)", title="speed (2 runs at a time, shared machine)")

    # Invariances
    predicted = a.get("invariances", {})
    measured = _invariance_table(list(predicted))
    inv_rows, mismatches = [], []
    threshold_inv, threshold_not = a.get("invariant_below", 1e-4), a.get("variant_above", 1e-2)
    inv_outcome = "inconclusive"
    identity_rows = []
    if measured is not None:
        table, identities = measured
        names = [n for n in predicted if n in table]
        h = np.array([[math.log10(max(table[n][k], 1e-12)) for _, k in TRANSFORMS] for n in names])
        ix.imshow(h, cmap="viridis_r", vmin=-8, vmax=0, aspect="auto")
        ix.set_xticks(range(len(TRANSFORMS)), [t[0] for t in TRANSFORMS], rotation=30, ha="right")
        ix.set_yticks(range(len(names)), names)
        for yi, n in enumerate(names):
            for xi, (_, k) in enumerate(TRANSFORMS):
                want = predicted[n][xi]
                got = table[n][k]
                ok = got < threshold_inv if want else got > threshold_not
                if not ok:
                    mismatches.append(f"{n}: {TRANSFORMS[xi][0]} (predicted {'invariant' if want else 'not invariant'}, "
                                      f"relative change {got:.2g})")
                ix.text(xi, yi, ("✓" if want else "✗") + ("" if ok else "!"), ha="center", va="center",
                        color="white" if h[yi, xi] > -4 else "black", fontsize=11)
            inv_rows.append([n] + [f"{table[n][k]:.1e}" for _, k in TRANSFORMS])
        ix.set_title("invariances on normkit's kernels: log10 relative change\n(✓/✗ predicted; ! = not as predicted)")
        inv_outcome = "supported" if not mismatches else "not supported"
        identity_rows = [[k, f"{v:.1e}"] for k, v in identities.items()]
        if any(v > 1e-4 for v in identities.values()):
            inv_outcome = "not supported"
    else:
        ix.text(0.5, 0.5, "normkit's Python module not found:\ninvariances not checked", ha="center", va="center")
        ix.axis("off")
    save(fig, figure, exp.decl["title"])

    outcomes = [inv_outcome]
    parts = [f"invariances: {len(mismatches)} of {len(inv_rows) * len(TRANSFORMS)} measurements differ from the "
             f"prediction" + (f" ({'; '.join(mismatches)})" if mismatches else "") + f" → {inv_outcome}"
             if measured is not None else "invariances: not measured (normkit's Python module missing) → inconclusive"]
    bn, gn, ln, inn = c["bn"], c["gn"], c["ln"], c["in"]
    e = {n: by_seed(exp.select(n, batch_size=ref), test_error) for n in (bn, gn, ln, inn)}
    d = paired_by_seed(e[gn], e[bn])
    t = labstats.tost(d, margin, alpha) if len(d) >= 2 else {"equivalent": False, "mean": math.nan, "lo": math.nan, "hi": math.nan}
    p = labstats.paired(d, [0.0] * len(d), alpha) if d else {"lo": math.nan, "hi": math.nan, "mean": math.nan, "n": 0}
    o1 = ("supported" if t["equivalent"] else
          "not supported" if p["n"] >= 2 and (p["lo"] > margin or p["hi"] < -margin) else "inconclusive")
    outcomes.append(o1)
    parts.append(f"{gn} − {bn} error at batch {ref}: {fmt(p['mean'], 3)} pp (90% CI [{fmt(t['lo'], 3)}, "
                 f"{fmt(t['hi'], 3)}], margin ±{margin} pp) → {o1}")
    r2 = claim_outcome(paired_by_seed(e[ln], e[gn]), alpha, 0, 1)
    r3 = claim_outcome(paired_by_seed(e[inn], e[ln]), alpha, 0, 1)
    outcomes += [r2["outcome"], r3["outcome"]]
    parts.append(outcome_sentence(f"{ln} − {gn} error at batch {ref}", r2))
    parts.append(outcome_sentence(f"{inn} − {ln} error at batch {ref}", r3))
    v = headline(outcomes, parts, r2, f"pp, {ln} − {gn} error at batch {ref}")
    tables = [(["norm", f"test error % at batch {ref}", "published (Wu & He, ImageNet)", f"at batch {small}",
                f"batch {small} − batch {ref}, pp", "samples/s (median)", f"s/epoch at batch {ref}", "diverged"], rows)]
    if inv_rows:
        tables.append((["norm"] + [t[0] for t in TRANSFORMS], inv_rows))
        tables.append((["identity", "max |difference|"], identity_rows))
    return {"verdict": v, "tables": tables, "notes": a.get("notes", "")}


KINDS = {
    "batch_size": batch_size,
    "train_inference": train_inference,
    "shift_robustness": shift_robustness,
    "relatives": relatives,
}
