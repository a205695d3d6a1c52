"""What the `normkit` command's tests share: running it, reading its metrics, the
options of a small training run. The data fixtures are in conftest.py."""
import json
import os
import subprocess
from pathlib import Path

CLI = str(Path(os.environ["NORMKIT_CLI"]).resolve()) if os.environ.get("NORMKIT_CLI") else ""
FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULT_KEYS = ["run", "epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
SPEC = "input 6\nlinear 16 bias=0\nbatchnorm\nrelu\nlinear 3\n"


def normkit(*args, env=None, check=None, cwd=None):
    """Runs normkit; check=0/1/2 asserts the exit code."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=full_env,
                            timeout=120, cwd=cwd)
    assert result.returncode >= 0, f"normkit crashed (signal {-result.returncode}): {result.stderr}"
    if check is not None:
        assert result.returncode == check, (
            f"normkit {' '.join(map(str, args))}: exit {result.returncode}, expected {check}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}")
    if result.returncode != 0:
        # Every failure is one clear line, never a stack trace or a CLI11 banner.
        assert result.stderr.startswith("normkit: error: "), result.stderr
    return result


def metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def results(path):
    """The metrics that must be reproducible (not the timings)."""
    return [{k: m[k] for k in RESULT_KEYS if k != "run"} for m in metrics(path)]


def train_args(table, out, *extra, epochs=2):
    return ["train", "--model", table["spec"], "--data", table["csv"], "--epochs", epochs,
            "--batch-size", 32, "--lr", 0.05, "--threads", 2, "--seed", 11, "--out", out, *extra]
