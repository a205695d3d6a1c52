"""CSV tables in `normkit train` and `eval`: scikit-learn's bundled tables (their first line is
"n_samples,n_features,class names..."), --csv-header, --csv-delimiter, --csv-label-column
(counted from 1, as in error messages, or a header's name), string labels mapped in sorted
order and kept in the checkpoint, and errors that name the line, the column and the text."""
import json
from pathlib import Path

import pytest

from cli_support import metrics, normkit

SKLEARN_DATA = Path("/usr/lib/python3/dist-packages/sklearn/datasets/data")


def mlp_spec(directory, features, classes):
    spec = directory / f"mlp{features}x{classes}.spec"
    spec.write_text(f"input {features}\nlinear 16 bias=0\nbatchnorm\nrelu\nlinear {classes}\n")
    return spec


def train(directory, data, spec, *extra, out="run", check=0):
    return normkit("train", "--model", spec, "--data", data, "--epochs", 3, "--batch-size", 16,
                   "--threads", 2, "--out", directory / out, *extra, check=check)


@pytest.mark.parametrize("name, features, names", [
    ("wine_data.csv", 13, ["class_0", "class_1", "class_2"]),
    ("breast_cancer.csv", 30, ["malignant", "benign"]),
    ("iris.csv", 4, ["setosa", "versicolor", "virginica"]),  # its header is as wide as its rows
])
def test_scikit_learn_tables_train_and_name_their_classes(name, features, names, tmp_path):
    path = SKLEARN_DATA / name
    assert path.is_file(), f"{path} is missing; scripts/install-deps.sh installs python3-sklearn"
    train(tmp_path, path, mlp_spec(tmp_path, features, len(names)))
    history = metrics(tmp_path / "run" / "metrics.jsonl")
    total = int(path.read_text().split(",", 1)[0])
    assert history[0]["train_samples"] + history[0]["test_samples"] == total
    assert history[-1]["test_acc"] > 0.6
    report = json.loads(normkit("eval", tmp_path / "run" / "checkpoint.nkc", "--json", check=0).stdout)
    assert report["class_names"] == names
    assert json.loads(normkit("info", tmp_path / "run" / "checkpoint.nkc", "--json", check=0).stdout)[
        "class_names"] == names
    # Without the header line recognized, the first line is data of the wrong width.
    result = train(tmp_path, path, mlp_spec(tmp_path, features, len(names)), "--csv-header", "no",
                   out="no-header", check=1)
    assert f"{name}:1: column 3: '{names[0]}' is not a number" in result.stderr


def test_string_labels_are_mapped_and_kept_in_the_checkpoint(tmp_path):
    rows = ["petal;width;species"]
    for i in range(90):
        kind = ["virginica", "setosa", "versicolor"][i % 3]
        rows.append(f"{1.0 + (i % 3) * 2 + (i % 7) * 0.1:.2f};{0.5 + (i % 3) + (i % 5) * 0.05:.2f};{kind}")
    data = tmp_path / "flowers.csv"
    data.write_text("\n".join(rows) + "\n")
    spec = mlp_spec(tmp_path, 2, 3)
    train(tmp_path, data, spec, "--csv-delimiter", ";", "--csv-label-column", "species")
    checkpoint = tmp_path / "run" / "checkpoint.nkc"
    report = json.loads(normkit("eval", checkpoint, "--json", check=0).stdout)
    assert report["class_names"] == ["setosa", "versicolor", "virginica"]  # sorted
    assert report["accuracy"] > 0.9
    text = normkit("eval", checkpoint, check=0).stdout
    assert "0 setosa" in text and "2 virginica" in text and "precision" in text
    # A new table with the names in another order is mapped with the checkpoint's classes.
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("petal;width;species\n5.0;2.5;virginica\n1.0;0.5;setosa\n3.1;1.6;versicolor\n")
    report = json.loads(normkit("eval", checkpoint, "--data", fresh, "--json", check=0).stdout)
    assert report["samples"] == 3 and report["support"] == [1, 1, 1]
    fresh.write_text("petal;width;species\n5.0;2.5;rose\n")
    result = normkit("eval", checkpoint, "--data", fresh, check=1)
    assert "fresh.csv:2: class 'rose' is not one of the classes" in result.stderr
    # The first column is the label column "1", counted as in the messages.
    numbered = train(tmp_path, data, spec, "--csv-delimiter", ";", "--csv-label-column", "3", out="by-number")
    assert numbered.returncode == 0
    assert metrics(tmp_path / "by-number" / "metrics.jsonl")[-1]["test_acc"] == \
        metrics(tmp_path / "run" / "metrics.jsonl")[-1]["test_acc"]


@pytest.mark.parametrize("column, words", [
    ("0", "label column '0': columns are counted from 1"),
    ("-2", "label column '-2': columns are counted from 1"),
    ("4", "label column 4 does not exist (the rows have 3 columns, counted from 1)"),
    ("colour", "no column named 'colour' in the header (a, b, label)"),
])
def test_bad_label_columns_are_named(column, words, tmp_path):
    data = tmp_path / "t.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i % 4},{i % 2}\n" for i in range(40)))
    result = train(tmp_path, data, mlp_spec(tmp_path, 2, 2), "--csv-label-column", column, check=None)
    assert result.returncode in (1, 2) and words in result.stderr, result.stderr


def test_errors_name_line_column_and_text(tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i % 4},{i % 2}\n" for i in range(20)) + "3,x7,1\n")
    result = train(tmp_path, data, mlp_spec(tmp_path, 2, 2), check=1)
    assert "bad.csv:22: column 2 (b): 'x7' is not a number" in result.stderr
    result = train(tmp_path, data, mlp_spec(tmp_path, 2, 2), "--csv-delimiter", "::", check=2)
    assert "--csv-delimiter '::': expected one character" in result.stderr
    tabs = tmp_path / "tabs.tsv"
    tabs.write_text("".join(f"{i}\t{i % 4}\t{i % 2}\n" for i in range(40)))
    train(tmp_path, tabs, mlp_spec(tmp_path, 2, 2), "--csv-delimiter", "tab", out="tabs")
