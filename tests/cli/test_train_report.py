"""`normkit train --report`: OUT/report.md (the run in one page: per-epoch table, outcome,
files) and OUT/curves.png drawn by plot_metrics.py, which plots what a run has: validation
losses, a test set evaluated only at the end, the training loss per logged step."""
import importlib.util
import sys
from pathlib import Path

import matplotlib
import matplotlib.figure

from cli_support import metrics, normkit, train_args

matplotlib.use("Agg")
PLOT_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "plot_metrics.py"


def test_report_and_curves_of_a_run_with_a_validation_split(table, tmp_path):
    out = tmp_path / "run"
    result = normkit(*train_args(table, out, "--val-fraction", 0.25, "--log-every", 2, "--keep", "best",
                                 "--report", epochs=3), check=0)
    assert f"report: {out / 'report.md'}\n" in result.stdout, result.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    lines = metrics(out / "metrics.jsonl")
    assert "![loss and accuracy per epoch" in report and "No plot" not in report
    for m in lines:
        row = f"| {m['epoch']} | {m['lr']:.4g} | {m['train_loss']:.4f} | {m['train_acc']:.4f} | " \
              f"{m['val_loss']:.4f} | {m['val_acc']:.4f} |"
        assert row in report, (row, report)
    assert f"| {lines[-1]['test_loss']:.4f} | {lines[-1]['test_acc']:.4f} |" in report
    assert "`best.nkc`" in report and "`steps.jsonl`" in report and "3 of 3 epochs trained" in report
    # Without --report, neither file.
    normkit(*train_args(table, tmp_path / "plain"), check=0)
    assert not (tmp_path / "plain" / "report.md").exists() and not (tmp_path / "plain" / "curves.png").exists()


def test_plot_has_the_curves_the_run_logged(table, tmp_path, monkeypatch):
    out = tmp_path / "run"
    normkit(*train_args(table, out, "--val-fraction", 0.25, "--log-every", 3, epochs=2), check=0)
    spec = importlib.util.spec_from_file_location("plot_metrics", PLOT_SCRIPT)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    monkeypatch.setattr(sys, "argv", ["plot_metrics.py", "--out", str(tmp_path / "c.png"), f"r={out / 'metrics.jsonl'}"])
    assert plot.main() == 0
    loss_ax, acc_ax = figures[0].axes
    curves = {line.get_label(): line.get_xydata().tolist() for line in loss_ax.get_lines()}
    steps = [m for m in metrics(out / "steps.jsonl") if "train_loss" in m]
    assert curves["r, train per step"] == [[m["epoch"], m["train_loss"]] for m in steps]
    epochs = metrics(out / "metrics.jsonl")
    assert curves["r, validation"] == [[m["epoch"], m["val_loss"]] for m in epochs]
    assert curves["r, test"] == [[epochs[-1]["epoch"], epochs[-1]["test_loss"]]]  # evaluated at the end only
    assert {line.get_label() for line in acc_ax.get_lines()} == {"r, validation", "r, test"}
