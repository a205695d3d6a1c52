"""Fixtures of the `normkit` command's tests (helpers: cli_support.py)."""
import random
from pathlib import Path

import pytest

from cli_support import CLI, SPEC

if not CLI or not Path(CLI).is_file():
    pytest.exit("set NORMKIT_CLI to the normkit executable (ctest does)", returncode=2)


@pytest.fixture(scope="session")
def table(tmp_path_factory):
    """Three Gaussian blobs in 6 dimensions, 600 rows, with a header and far-off means."""
    directory = tmp_path_factory.mktemp("data")
    rng = random.Random(5)
    rows = ["a,b,c,d,e,f,label"]
    for i in range(600):
        label = i % 3
        values = [rng.gauss(100.0 + 4.0 * label * (j % 2), 3.0) for j in range(6)]
        rows.append(",".join(f"{v:.5f}" for v in values) + f",{label}")
    path = directory / "blobs.csv"
    path.write_text("\n".join(rows) + "\n")
    spec = directory / "mlp.spec"
    spec.write_text(SPEC)
    return {"csv": path, "spec": spec, "dir": directory}
