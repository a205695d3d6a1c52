#!/usr/bin/python3
"""The claims lab's report: for every experiment directory in a lab directory
(written by `normkit lab run`), its figure (figure.png), report section
(report.md) and verdict (verdict.json); then LAB.md and a self-contained
lab.html with all of them.

    report.py --lab DIR [--experiments DIR]

`normkit lab run` and `normkit lab report` run this with Debian's
/usr/bin/python3 (numpy, matplotlib, scipy). Each experiment names its
analysis in its declaration ("analysis": {"kind": ...}); the kinds live in
analyses.py, the statistics in labstats.py. A verdict is computed from the
runs by the declared criterion; an experiment with missing runs is reported
as incomplete and its verdict is inconclusive.
"""
import argparse
import base64
import html
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import analyses  # noqa: E402
import weak_points  # noqa: E402

KINDS = {**analyses.KINDS, **weak_points.KINDS}

VERDICT_COLOURS = {"supported": "#1a7f37", "not supported": "#cf222e", "mixed": "#9a6700",
                   "inconclusive": "#6e7781"}


class Run:
    """One finished run: its record in runs.jsonl and, read when asked, its
    per-epoch metrics and per-step lines."""

    def __init__(self, record, exp_dir):
        self.record = record
        self.arm = record["arm"]
        self.grid = record.get("grid", {})
        self.seed = record["seed"]
        self.diverged = record["status"] == "diverged"
        self.last = record.get("last") or {}
        self.dir = exp_dir / record["dir"]
        self._metrics = self._steps = None

    def value(self, key):
        """A metric of the last epoch; None when the run diverged or lacks it."""
        if self.diverged:
            return None
        return self.last.get(key)

    def metrics(self):
        if self._metrics is None:
            self._metrics = read_jsonl(self.dir / "metrics.jsonl")
        return self._metrics

    def steps(self):
        if self._steps is None:
            self._steps = read_jsonl(self.dir / "steps.jsonl")
        return self._steps


def read_jsonl(path):
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a crash
    return out


class Experiment:
    def __init__(self, exp_dir):
        self.dir = exp_dir
        self.decl = json.loads((exp_dir / "experiment.json").read_text())
        records = {}
        for r in read_jsonl(exp_dir / "runs.jsonl"):
            records[r["run"]] = r
        self.runs = [Run(r, exp_dir) for r in records.values()]
        self.expected = self.decl.get("run_count", len(self.runs))
        self.name = self.decl["name"]

    @property
    def complete(self):
        return len(self.runs) >= self.expected

    def select(self, arm=None, **grid):
        """The runs of an arm (and grid values), sorted by seed."""
        out = [r for r in self.runs if (arm is None or r.arm == arm)
               and all(r.grid.get(k) == v for k, v in grid.items())]
        return sorted(out, key=lambda r: r.seed)

    def arms(self):
        return [a["name"] for a in self.decl["arms"]]

    def grid_values(self, key, arm=None):
        grid = self.decl.get("grid", {})
        if arm is not None:
            for a in self.decl["arms"]:
                if a["name"] == arm and "grid" in a:
                    grid = a["grid"]
        return list(grid.get(key, []))


# ---------------------------------------------------------------- output

def table_md(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table_html(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def published_items(decl):
    p = decl["published"]
    return p if isinstance(p, list) else [p]


def section_md(exp, result, heading="##"):
    d = exp.decl
    v = result["verdict"]
    out = [f"{heading} {d.get('number', '')}. {d['title']}", "",
           f"**Claim.** {d['claim']}", ""]
    for p in published_items(d):
        out.append(f"**Published.** {p['result']} — *{p['source']}*")
        out.append("")
    out += [f"**Setup** ({d['tier']} tier, {d['seeds']} seed{'s' if d['seeds'] != 1 else ''}, {len(exp.runs)} runs"
            f"{'' if exp.complete else f' of {exp.expected}: INCOMPLETE'}). {d.get('design', '')}",
            "", f"**Criterion** (fixed before the runs). {d['criterion']['text']}", "",
            f"![{d['title']}]({exp.name}/figure.png)" if heading == "##" else "![figure](figure.png)", ""]
    for header, rows in result["tables"]:
        out += [table_md(header, rows), ""]
    out += [f"**Verdict: {v['verdict']}.** {v['summary']}", ""]
    if result.get("notes"):
        out += [result["notes"], ""]
    return "\n".join(out)


def section_html(exp, result, figure_png):
    d = exp.decl
    v = result["verdict"]
    colour = VERDICT_COLOURS.get(v["verdict"], "#6e7781")
    e = html.escape
    pub = "".join(f"<p class='pub'><b>Published.</b> {e(p['result'])} <i>({e(p['source'])})</i></p>"
                  for p in published_items(d))
    image = ""
    if figure_png.exists():
        data = base64.b64encode(figure_png.read_bytes()).decode("ascii")
        image = f"<img alt='{e(d['title'])}' src='data:image/png;base64,{data}'>"
    tables = "".join(table_html(h, r) for h, r in result["tables"])
    incomplete = "" if exp.complete else f" of {exp.expected}: <b>incomplete</b>"
    notes = f"<p>{e(result['notes'])}</p>" if result.get("notes") else ""
    return (f"<section id='{e(exp.name)}'><h2>{d.get('number', '')}. {e(d['title'])} "
            f"<span class='badge' style='background:{colour}'>{e(v['verdict'])}</span></h2>"
            f"<p><b>Claim.</b> {e(d['claim'])}</p>{pub}"
            f"<p><b>Setup</b> ({e(d['tier'])} tier, {d['seeds']} seed{'s' if d['seeds'] != 1 else ''}, "
            f"{len(exp.runs)} runs{incomplete}). "
            f"{e(d.get('design', ''))}</p>"
            f"<p><b>Criterion</b> (fixed before the runs). {e(d['criterion']['text'])}</p>"
            f"{image}{tables}<p class='verdict'><b>Verdict: {e(v['verdict'])}.</b> {e(v['summary'])}</p>"
            f"{notes}</section>")


HTML_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #d0d7de;padding-bottom:.3em;margin-top:2em}
.badge{color:#fff;border-radius:1em;padding:.1em .7em;font-size:.7em;vertical-align:middle}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} td,th{border:1px solid #d0d7de;padding:.25em .6em;text-align:left}
th{background:#f6f8fa}
img{max-width:100%;border:1px solid #d0d7de;margin:.5em 0}
.pub{background:#f6f8fa;border-left:4px solid #8c959f;padding:.4em .8em}
.verdict{font-size:1.05em}
"""


def summary_rows(items):
    rows = []
    for exp, result in items:
        v = result["verdict"]
        effect = v.get("effect")
        number = lambda x: "–" if x is None or x != x else f"{x:.3g}"  # noqa: E731 (x != x: NaN)
        effect_text = ("–" if effect is None or effect != effect
                       else f"{number(effect)} [{number(v['ci'][0])}, {number(v['ci'][1])}] {v.get('unit', '')}")
        rows.append([exp.decl.get("number", ""), exp.decl["title"], v["verdict"], effect_text,
                     f"{len(exp.runs)}/{exp.expected}", exp.decl["tier"]])
    return ["#", "claim", "verdict", "effect [95% CI]", "runs", "tier"], rows


def write_lab(lab, items):
    header, rows = summary_rows(items)
    md = ["# The claims lab", "",
          "Each claim made for batch normalization, put to a test declared before it ran "
          "(experiments/NAME.json), with the published result it is compared with. "
          "Verdicts are computed from the runs by the declared criterion.", "",
          table_md(header, rows), ""]
    for exp, result in items:
        md.append(section_md(exp, result))
    (lab / "LAB.md").write_text("\n".join(md))
    body = "".join(section_html(exp, result, exp.dir / "figure.png") for exp, result in items)
    index = table_html(header, rows)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>normkit claims lab</title>"
            f"<style>{HTML_STYLE}</style></head><body><h1>The claims lab</h1>"
            f"<p>Each claim made for batch normalization, put to a test declared before it ran, next to "
            f"the published result. Verdicts are computed from the runs by the declared criterion.</p>"
            f"{index}{body}</body></html>")
    (lab / "lab.html").write_text(page)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", required=True, help="the lab directory (normkit lab run --out)")
    parser.add_argument("--experiments", default="", help="unused; kept for the CLI")
    args = parser.parse_args()
    lab = Path(args.lab)
    import matplotlib
    matplotlib.use("Agg")
    items = []
    for exp_dir in sorted(p for p in lab.iterdir() if (p / "experiment.json").exists()):
        exp = Experiment(exp_dir)
        kind = exp.decl["analysis"]["kind"]
        if kind not in KINDS:
            raise SystemExit(f"{exp_dir}: unknown analysis kind {kind!r}")
        result = KINDS[kind](exp, exp_dir / "figure.png")
        v = result["verdict"]
        if not exp.complete:
            v["summary"] = (f"Only {len(exp.runs)} of {exp.expected} runs finished; the verdict waits "
                            f"for the rest (would be: {v['verdict']}). " + v["summary"])
            v["verdict"] = "inconclusive"
        v.update({"experiment": exp.name, "claim": exp.decl["claim"], "tier": exp.decl["tier"],
                  "criterion": exp.decl["criterion"], "runs": len(exp.runs), "expected_runs": exp.expected})
        (exp_dir / "verdict.json").write_text(json.dumps(v, indent=2, default=float) + "\n")
        (exp_dir / "report.md").write_text(section_md(exp, result, heading="#"))
        items.append((exp, result))
    items.sort(key=lambda item: item[0].decl.get("number", 0))
    write_lab(lab, items)
    for exp, result in items:
        print(f"{exp.name}: {result['verdict']['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
