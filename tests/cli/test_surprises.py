"""What the command used to do silently, now said or refused: instance norm that drops every
normalization, frozen BN from scratch (it would normalize with mean 0 and variance 1), a batch
larger than the training set, relative paths stored as typed, and `compare --resume` with --norm
given explicitly."""
import json
import os

from cli_support import FASHION, metrics, normkit, train_args


def test_norm_instance_that_drops_every_normalization_is_refused(tmp_path):
    result = normkit("train", "--model", "mlp-paper", "--norm", "instance", "--out", tmp_path / "i", check=2)
    assert "--norm instance: every batchnorm layer of the model follows flat features" in result.stderr
    assert not (tmp_path / "i").exists()
    result = normkit("compare", "--model", "mlp-paper", "--norm", "instance", "--out", tmp_path / "c", check=2)
    assert "--norm instance: every batchnorm layer" in result.stderr


def test_norm_instance_that_drops_some_layers_warns(tmp_path):
    assert FASHION.is_dir()
    result = normkit("train", "--model", "cnn-small", "--norm", "instance", "--epochs", 1, "--limit-train", 64,
                     "--limit-test", 32, "--threads", 2, "--out", tmp_path / "i", check=0)
    assert ("normkit: warning: --norm instance: 1 of the model's batchnorm layers follows flat features"
            in result.stderr)


def test_frozen_batch_norm_from_scratch_is_refused(table, tmp_path):
    result = normkit(*train_args(table, tmp_path / "f", "--norm", "frozen"), check=2)
    assert "--norm frozen: layer 2 (batchnorm frozen=1): a model trained from scratch has no statistics" \
        in result.stderr
    spec = table["dir"] / "frozen.spec"
    spec.write_text("input 6; linear 16 bias=0; batchnorm frozen=1; relu; linear 3")
    result = normkit(*train_args(table, tmp_path / "g", "--model", spec), check=2)
    assert "--model: layer 2 (batchnorm frozen=1)" in result.stderr
    result = normkit("compare", "--model", table["spec"], "--data", table["csv"], "--norm", "frozen",
                     "--out", tmp_path / "c", check=2)
    assert "--norm frozen" in result.stderr


def test_a_batch_larger_than_the_data_says_so(table, tmp_path):
    small = table["dir"] / "small.csv"
    small.write_text("\n".join(table["csv"].read_text().splitlines()[:180]) + "\n")  # 179 rows: 35 held out, 144 train
    result = normkit(*train_args(table, tmp_path / "b", "--data", small, "--batch-size", 1000, epochs=1), check=0)
    assert "batch 144 (--batch-size 1000 is more than the 144 training samples: one batch per epoch)" \
        in result.stdout, result.stdout


def test_relative_paths_work_from_another_directory(table, tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "blobs.csv").write_text(table["csv"].read_text())
    (work / "mlp.spec").write_text(table["spec"].read_text())
    normkit("train", "--model", "mlp.spec", "--data", "blobs.csv", "--epochs", 1, "--batch-size", 32,
            "--threads", 2, "--out", "run", cwd=work, check=0)
    checkpoint = work / "run" / "checkpoint.nkc"
    options = json.loads(normkit("info", checkpoint, "--json", check=0).stdout)["options"]
    assert options["data"] == str(work / "blobs.csv") and options["model"] == str(work / "mlp.spec")
    # From another directory: eval finds the run's test rows, --resume its data.
    report = json.loads(normkit("eval", checkpoint, "--json", cwd=elsewhere, check=0).stdout)
    assert report["samples"] == 120
    normkit("train", "--resume", "--epochs", 2, "--out", os.path.relpath(work / "run", elsewhere),
            cwd=elsewhere, check=0)
    assert len(metrics(work / "run" / "metrics.jsonl")) == 2
