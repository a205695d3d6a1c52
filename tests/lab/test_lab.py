"""`normkit lab` end to end: every experiment's --quick tier runs and leaves its
artefacts (figure, report section, verdict; LAB.md and a self-contained
lab.html); a second run resumes without redoing finished runs, redoes a
half-written one from scratch and resumes one a signal stopped; diverged runs are kept as results; bad
declarations and mismatched directories are clear errors. Verdicts are not
checked here: the quick tiers are too small to decide anything.

    NORMKIT_CLI=<build>/normkit /usr/bin/python3 -m pytest tests/lab
"""
import base64
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

CLI = os.environ.get("NORMKIT_CLI", "")
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
VERDICTS = {"supported", "not supported", "mixed", "inconclusive"}

if not CLI or not Path(CLI).is_file():
    pytest.exit("set NORMKIT_CLI to the normkit executable (ctest does)", returncode=2)


def normkit(*args, check=0):
    result = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert result.returncode == check, (
        f"normkit {' '.join(map(str, args))}: exit {result.returncode}, expected {check}\n"
        f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
    return result


def names():
    return sorted(p.stem for p in EXPERIMENTS.glob("*.json"))


def records(path):
    """The records of runs.jsonl; a line cut by a crash is not one."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "quick"
    result = normkit("lab", "run", "all", "--quick", "--jobs", 2, "--out", out)
    return {"out": out, "stdout": result.stdout}


def test_list_names_every_declaration():
    out = normkit("lab", "list").stdout
    for name in names():
        assert name in out
    assert len(names()) >= 9


def test_every_quick_tier_leaves_its_artefacts(lab):
    out = lab["out"]
    for name in names():
        d = out / name
        declared = json.loads((d / "experiment.json").read_text())
        assert declared["tier"] == "quick"
        runs = records(d / "runs.jsonl")
        assert len(runs) == declared["run_count"] > 0, name
        for r in runs:
            assert r["status"] in ("finished", "diverged")
            assert (d / r["dir"] / "metrics.jsonl").exists()
        png = (d / "figure.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000, name
        report = (d / "report.md").read_text()
        assert "**Verdict:" in report and "**Published.**" in report and "**Criterion**" in report
        verdict = json.loads((d / "verdict.json").read_text())
        assert verdict["verdict"] in VERDICTS
        for key in ("effect", "ci", "criterion", "summary", "runs"):
            assert key in verdict, (name, key)
        assert verdict["runs"] == declared["run_count"]
    lab_md = (out / "LAB.md").read_text()
    page = (out / "lab.html").read_text()
    for name in names():
        title = json.loads((EXPERIMENTS / f"{name}.json").read_text())["title"]
        assert title in lab_md
        assert f"id='{name}'" in page
        # self-contained: the figure itself is in the page
        figure = base64.b64encode((out / name / "figure.png").read_bytes()).decode()
        assert figure[:200] in page
    assert "src='http" not in page and "src=\"http" not in page


def test_divergence_is_kept_as_a_result(lab):
    runs = records(lab["out"] / "higher-lr" / "runs.jsonl")
    diverged = [r for r in runs if r["status"] == "diverged"]
    assert diverged, "the quick tier's learning rate 10 diverges"
    for r in diverged:
        assert r["divergence"]["reason"]
    report = (lab["out"] / "higher-lr" / "report.md").read_text()
    assert "1/1" in report  # the diverged count in the table


def test_a_second_run_redoes_nothing(lab):
    out = lab["out"] / "rerun"
    shutil.copytree(lab["out"] / "placement", out / "placement")
    before = (out / "placement" / "runs.jsonl").read_text()
    result = normkit("lab", "run", "placement", "--quick", "--out", out, "--no-report")
    assert "8 already done" in result.stdout
    assert (out / "placement" / "runs.jsonl").read_text() == before


def test_an_interrupted_run_is_redone_from_scratch(lab):
    out = lab["out"] / "interrupted"
    shutil.copytree(lab["out"] / "placement", out / "placement")
    path = out / "placement" / "runs.jsonl"
    lines = path.read_text().splitlines()
    lost = json.loads(lines[-1])
    # The last record never got written, and its run directory was left half-written.
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    run_dir = out / "placement" / lost["dir"]
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "cut')
    (run_dir / "run.json").unlink()
    result = normkit("lab", "run", "placement", "--quick", "--out", out, "--no-report")
    assert "7 already done" in result.stdout
    redone = records(path)[-1]
    assert redone["run"] == lost["run"]
    assert redone["last"]["train_loss"] == lost["last"]["train_loss"]  # same seed: same numbers
    assert len({r["run"] for r in records(path)}) == 8


def test_a_signal_stops_the_lab_and_the_next_run_resumes_where_it_stopped(lab, tmp_path):
    # One run at a time; SIGINT to the lab once the first run is recorded: the run in
    # progress finishes its step and saves, no run is started, the lab exits 130.
    out = tmp_path / "lab"
    args = ["lab", "run", "placement", "--quick", "--jobs", 1, "--out", out, "--no-report"]
    proc = subprocess.Popen([CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    path = out / "placement" / "runs.jsonl"
    while proc.poll() is None and not (path.exists() and records(path)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted by SIGINT" in stderr and "run the same command again" in stderr
    done_before = len(records(path))
    assert 1 <= done_before < 8
    result = normkit(*args)
    assert f"{done_before} already done" in result.stdout
    # Every run, the interrupted one included, has the numbers of the uninterrupted lab.
    def by_run(p):
        return {r["run"]: (r["status"], r["last"]["train_loss"], r["epochs_done"]) for r in records(p)}
    assert by_run(path) == by_run(lab["out"] / "placement" / "runs.jsonl")


def test_a_directory_of_another_tier_is_refused(lab):
    out = lab["out"] / "tiers"
    shutil.copytree(lab["out"] / "placement", out / "placement")
    result = normkit("lab", "run", "placement", "--out", out, check=2)
    assert "different declaration" in result.stderr and "tier quick" in result.stderr


def test_bad_declarations_are_named(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    decl = json.loads((EXPERIMENTS / "placement.json").read_text())
    decl["train"]["learning_rate"] = 0.1  # not an option of normkit train
    (experiments / "placement.json").write_text(json.dumps(decl))
    result = normkit("lab", "run", "placement", "--quick", "--experiments", experiments,
                     "--out", tmp_path / "out", check=1)
    assert "'learning_rate' is not an option of normkit train" in result.stderr
    result = normkit("lab", "run", "nothing", "--experiments", experiments, "--out", tmp_path / "out", check=2)
    assert "no experiment 'nothing'" in result.stderr
    (experiments / "placement.json").write_text(json.dumps({**decl, "name": "other"}))
    result = normkit("lab", "list", "--experiments", experiments, check=1)
    assert "must be the file's name" in result.stderr


def test_a_failing_run_stops_the_lab_and_says_why(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    decl = json.loads((EXPERIMENTS / "placement.json").read_text())
    decl["train"]["data"] = str(tmp_path / "missing")
    (experiments / "placement.json").write_text(json.dumps(decl))
    result = normkit("lab", "run", "placement", "--quick", "--experiments", experiments,
                     "--out", tmp_path / "out", check=1)
    assert "failed" in result.stderr and "no such file or directory" in result.stderr
    assert not (tmp_path / "out" / "placement" / "runs.jsonl").exists()
