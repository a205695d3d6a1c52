"""Model selection in `normkit train`, on the validation split only (the test set never
chooses): --keep best writes OUT/best.nkc at each new lowest validation loss, and
--early-stop N ends the run N epochs after the last improvement (the test set is then
evaluated once, on the last epoch, as at the end of a full run)."""
import json
import random

import pytest

from cli_support import metrics, normkit


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Random labels: a model can only memorize them, so its validation loss has a
    minimum and then rises. 400 rows, 6 features, 3 classes."""
    directory = tmp_path_factory.mktemp("noisy")
    rng = random.Random(7)
    rows = ["a,b,c,d,e,f,label"]
    for _ in range(400):
        rows.append(",".join(f"{rng.gauss(0.0, 1.0):.5f}" for _ in range(6)) + f",{rng.randrange(3)}")
    (directory / "noisy.csv").write_text("\n".join(rows) + "\n")
    (directory / "wide.spec").write_text("input 6\nlinear 64 bias=0\nbatchnorm\nrelu\nlinear 3\n")
    return directory


def run(noisy, out, *extra, epochs, check=0):
    return normkit("train", "--model", noisy / "wide.spec", "--data", noisy / "noisy.csv", "--epochs", epochs,
                   "--batch-size", 16, "--lr", 0.1, "--threads", 2, "--seed", 3, "--val-fraction", 0.25,
                   "--out", out, *extra, check=check)


def best_epoch(lines):
    """1-based epoch of the lowest validation loss (the first, on ties)."""
    losses = [m["val_loss"] for m in lines]
    return losses.index(min(losses)) + 1


def info(path):
    return json.loads(normkit("info", path, "--json", check=0).stdout)


def test_keep_best_keeps_the_epoch_of_the_lowest_validation_loss(noisy, tmp_path):
    out = tmp_path / "best"
    result = run(noisy, out, "--keep", "best", epochs=12)
    lines = metrics(out / "metrics.jsonl")
    best = best_epoch(lines)
    assert best < len(lines), "the data should make the validation loss rise again"
    assert info(out / "best.nkc")["epochs_done"] == best
    assert info(out / "checkpoint.nkc")["epochs_done"] == 12  # the last, for --resume
    assert f"best epoch {best} (validation loss {lines[best - 1]['val_loss']:.4f}): {out / 'best.nkc'}" \
        in result.stdout, result.stdout
    # The kept model is that epoch's: the same validation loss from the same rows.
    report = json.loads(normkit("eval", out / "best.nkc", "--json", check=0).stdout)
    whole = json.loads(normkit("eval", out / "checkpoint.nkc", "--json", check=0).stdout)
    assert report["samples"] == whole["samples"] and report["loss"] != whole["loss"]


def test_early_stop_ends_the_run_patience_epochs_after_the_best(noisy, tmp_path):
    out = tmp_path / "early"
    result = run(noisy, out, "--early-stop", 3, epochs=200)
    lines = metrics(out / "metrics.jsonl")
    best = best_epoch(lines)
    assert len(lines) == best + 3 < 200
    # Every epoch before the last improved on the best so far or was within the patience.
    assert ["test_acc" in m for m in lines] == [False] * (len(lines) - 1) + [True]
    outcome = json.loads((out / "run.json").read_text())
    assert outcome["status"] == "finished" and outcome["stopped_early"] and outcome["best_epoch"] == best
    assert f"stopped early after epoch {len(lines)}: no lower validation loss for 3 epochs (best: epoch {best})" \
        in result.stdout, result.stdout
    # The same run without early stopping trains the same first epochs.
    run(noisy, tmp_path / "full", epochs=len(lines) + 1)
    full = metrics(tmp_path / "full" / "metrics.jsonl")
    assert [m["val_loss"] for m in full[:len(lines)]] == [m["val_loss"] for m in lines]
    # Resumed with more epochs, a stopped run stays stopped.
    result = normkit("train", "--resume", "--epochs", 300, "--out", out, check=0)
    assert "stopped early after epoch" in result.stdout and "nothing to do" in result.stdout
    assert len(metrics(out / "metrics.jsonl")) == len(lines)


def test_model_selection_needs_a_validation_split(noisy, tmp_path):
    for option in (["--early-stop", 3], ["--keep", "best"]):
        result = normkit("train", "--model", noisy / "wide.spec", "--data", noisy / "noisy.csv", *option,
                         "--out", tmp_path / "x", check=2)
        assert f"{option[0]} chooses by the validation loss: give --val-fraction" in result.stderr
    assert not (tmp_path / "x").exists()
