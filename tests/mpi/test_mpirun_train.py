"""`mpirun -np N normkit train`: data-parallel training end to end.

Run by ctest (tests/CMakeLists.txt, mpirun_cli_tests) as
    NORMKIT_CLI=<build>/normkit /usr/bin/python3 -m pytest tests/mpi
Every job is started here with `mpirun --oversubscribe` on a small synthetic CSV table
(fractions of a second of training), as root too (the two OMPI_ALLOW_RUN_AS_ROOT variables).

Claims: N ranks with synchronized batch norm give one process's metrics to float rounding
(N = 2, 3) and bit for bit (N = 1); --resume works with a different number of ranks; only
rank 0 writes; a rank that dies or hangs ends the job with an error within the timeout,
and the checkpoint stays loadable; a mismatched world size or mismatched ranks are errors.
"""
import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

CLI = os.environ.get("NORMKIT_CLI", "")
if not CLI or not Path(CLI).is_file():
    pytest.exit("set NORMKIT_CLI to the normkit executable (ctest does)", returncode=2)

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")
# Two batchnorm layers, dropout (its masks follow the global batch), a bias-free linear.
SPEC = "input 6\nlinear 16 bias=0\nbatchnorm\nrelu\ndropout 0.1\nlinear 12 bias=0\nbatchnorm\nrelu\nlinear 3\n"
# Float rounding only (measured: around 1e-8 relative after 3 epochs); a wrong statistic
# or gradient moves the losses by 1e-3 and more.
RTOL = 1e-5


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Three Gaussian blobs in 6 dimensions, 620 rows (the last batch of 32 is uneven)."""
    directory = tmp_path_factory.mktemp("data")
    rng = random.Random(5)
    rows = ["a,b,c,d,e,f,label"]
    for i in range(620):
        label = i % 3
        values = [rng.gauss(10.0 + 2.0 * label * (j % 2), 3.0) for j in range(6)]
        rows.append(",".join(f"{v:.5f}" for v in values) + f",{label}")
    (directory / "blobs.csv").write_text("\n".join(rows) + "\n")
    (directory / "mlp.spec").write_text(SPEC)
    return directory


def train_args(table, out, *extra, epochs=3):
    return ["train", "--model", table / "mlp.spec", "--data", table / "blobs.csv",
            "--epochs", epochs, "--batch-size", 32, "--lr", 0.1, "--threads", 1, "--seed", 3,
            "--out", out, *extra]


def run(command, timeout=120):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=ENV,
                            timeout=timeout)
    assert result.returncode >= 0, f"crashed (signal {-result.returncode}): {result.stderr}"
    return result


def normkit(*args, ranks=None, check=0, timeout=120):
    """normkit alone (ranks None) or under mpirun -np ranks; check asserts the exit code."""
    command = [CLI, *args] if ranks is None else ["mpirun", "-np", ranks, CLI, *args]
    result = run(command, timeout)
    if check is not None:
        assert result.returncode == check, (
            f"{' '.join(map(str, command))}: exit {result.returncode}, expected {check}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def evaluation(out):
    return json.loads(normkit("eval", Path(out) / "checkpoint.nkc", "--json").stdout)


def assert_close_runs(got, want, rtol):
    """Per-epoch losses within rtol (0: equal), accuracies equal; the checkpoints' test
    loss within rtol and confusion matrices equal."""
    a, b = metrics(got), metrics(want)
    assert len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b):
        for key in ("train_loss", "test_loss"):
            error = abs(x[key] - y[key]) / abs(y[key])
            worst = max(worst, error)
            assert error <= rtol, f"epoch {x['epoch']} {key}: {x[key]!r} vs {y[key]!r}"
        for key in ("train_acc", "test_acc", "train_samples"):
            assert x[key] == y[key], f"epoch {x['epoch']} {key}: {x[key]} vs {y[key]}"
    e, f = evaluation(got), evaluation(want)
    assert abs(e["loss"] - f["loss"]) <= rtol * abs(f["loss"])
    assert e["confusion"] == f["confusion"]
    return worst


@pytest.fixture(scope="module")
def one_process(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "one"
    normkit(*train_args(table, out))
    return out


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_with_synchronized_batch_norm_equal_one_process(table, one_process, tmp_path, ranks):
    out = tmp_path / f"ranks{ranks}"
    result = normkit(*train_args(table, out), ranks=ranks)
    # Rank 0 alone reports: one header, one line per epoch.
    assert result.stdout.count("normkit train:") == 1
    assert f"{ranks} ranks, synchronized batch norm" in result.stdout
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == 3
    worst = assert_close_runs(out, one_process, RTOL)
    assert [m["ranks"] for m in metrics(out)] == [ranks] * 3
    print(f"\n[ measured ] {ranks} ranks vs 1 process: worst relative loss difference {worst:.2e}")


def test_batch_norm_inside_residual_blocks_is_synchronized(table, tmp_path):
    """A residual block's batchnorm layers (the body's fused BN+Add+ReLU tail included)
    see the global batch too: 2 ranks give one process's run."""
    spec = table / "residual.spec"
    spec.write_text("input 6\nlinear 16 bias=0\nbatchnorm\nrelu\n"
                    "residual\nlinear 16 bias=0\nbatchnorm\nrelu\ndropout 0.1\nlinear 16 bias=0\nbatchnorm\nend\n"
                    "linear 3\n")
    args = [train_args(table, tmp_path / name, epochs=2) for name in ("one", "two")]
    for a in args:
        a[a.index("--model") + 1] = spec
    normkit(*args[0])
    result = normkit(*args[1], ranks=2)
    assert "2 ranks, synchronized batch norm" in result.stdout
    assert_close_runs(tmp_path / "two", tmp_path / "one", RTOL)


def test_one_rank_under_mpirun_is_one_process_bit_for_bit(table, one_process, tmp_path):
    out = tmp_path / "ranks1"
    normkit(*train_args(table, out), ranks=1)
    assert_close_runs(out, one_process, 0.0)


def test_resume_with_a_different_number_of_ranks(table, one_process, tmp_path):
    out = tmp_path / "resumed"
    normkit(*train_args(table, out, epochs=1), ranks=2)
    normkit(*train_args(table, out, "--resume", epochs=2), ranks=3)
    normkit(*train_args(table, out, "--resume", epochs=3))
    assert [m["ranks"] for m in metrics(out)] == [2, 3, 1]
    assert_close_runs(out, one_process, RTOL)


def test_batch_norm_per_rank_differs_and_the_switch_is_kept_on_resume(table, one_process, tmp_path):
    out = tmp_path / "local"
    result = normkit(*train_args(table, out, "--no-sync-bn", epochs=1), ranks=2)
    assert "batch norm per rank" in result.stdout
    # Each rank normalizes 16 samples instead of 32: a different (ghost BN) training.
    assert metrics(out)[0]["train_loss"] != pytest.approx(metrics(one_process)[0]["train_loss"],
                                                          rel=1e-4)
    resumed = normkit(*train_args(table, out, "--resume", "--sync-bn", epochs=2), ranks=2,
                      check=2)
    assert "--sync-bn true differs from the checkpoint's false" in resumed.stderr


def test_world_size_mismatches_are_usage_errors(table, tmp_path):
    result = normkit(*train_args(table, tmp_path / "a", "--ranks", 3), ranks=2, check=2)
    assert "--ranks 3: the launcher started 2 ranks" in result.stderr
    result = normkit(*train_args(table, tmp_path / "b", "--ranks", 2), check=2)
    assert "not started by an MPI launcher" in result.stderr
    assert "mpirun -np 2" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ranks_started_differently_are_an_error(table, tmp_path):
    out = tmp_path / "mixed"
    result = run(["mpirun", "-np", 1, CLI, *train_args(table, out), ":",
                  "-np", 1, CLI, *train_args(table, out, "--lr", 0.2)])
    assert result.returncode == 1, result.stderr
    assert "rank 1 disagrees with rank 0 on the run's options" in result.stderr
    assert not (out / "checkpoint.nkc").exists()


def test_compare_refuses_to_run_under_mpirun(table, tmp_path):
    result = normkit("compare", "--model", table / "mlp.spec", "--data", table / "blobs.csv",
                     "--epochs", 1, "--out", tmp_path / "c", ranks=2, check=2)
    assert "compare runs in one process" in result.stderr


# ---------------------------------------------------------------- failures

def rank_process(launcher, rank, seconds=30):
    """The pid of `rank`'s normkit, a child of the mpirun process `launcher`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if parent == launcher.pid and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                return int(entry.name)
        if launcher.poll() is not None:
            pytest.fail(f"the job ended before rank {rank} was found")
        time.sleep(0.05)
    pytest.fail(f"rank {rank} of the job not found in {seconds} s")


def start_long_job(table, out, timeout_seconds):
    """A resumed 2-rank job of many epochs (it will not finish), after one good epoch."""
    normkit(*train_args(table, out, epochs=1), ranks=2)
    command = ["mpirun", "-np", "2", CLI, *map(str, train_args(
        table, out, "--resume", "--timeout", timeout_seconds, epochs=100000))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def wait_for_epochs(out, epochs, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len((Path(out) / "metrics.jsonl").read_text().splitlines()) >= epochs:
            return
        time.sleep(0.05)
    pytest.fail(f"fewer than {epochs} epochs in {seconds} s")


def assert_checkpoint_loads(out):
    info = json.loads(normkit("info", Path(out) / "checkpoint.nkc", "--json").stdout)
    assert info["epochs_done"] >= 1
    assert len(metrics(out)) >= 1
    return info


def test_a_rank_that_dies_ends_the_job_and_the_checkpoint_survives(table, tmp_path):
    out = tmp_path / "dies"
    job = start_long_job(table, out, 30)
    try:
        wait_for_epochs(out, 3)  # checkpoints are being written every few milliseconds
        started = time.monotonic()
        os.kill(rank_process(job, 1), signal.SIGKILL)
        _, stderr = job.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        job.kill()
    assert job.returncode != 0
    assert elapsed < 20, f"the job took {elapsed:.1f} s to end after rank 1 died"
    assert "rank 1" in stderr and "signal 9" in stderr, stderr
    assert_checkpoint_loads(out)


def test_a_rank_that_hangs_ends_the_job_after_the_timeout(table, tmp_path):
    out = tmp_path / "hangs"
    job = start_long_job(table, out, 3)
    stopped = None
    try:
        wait_for_epochs(out, 3)
        stopped = rank_process(job, 1)
        started = time.monotonic()
        os.kill(stopped, signal.SIGSTOP)
        _, stderr = job.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        job.kill()
        if stopped:
            try:
                os.kill(stopped, signal.SIGKILL)  # never leave a stopped process behind
            except ProcessLookupError:
                pass
    assert job.returncode == 1, stderr
    assert 3 <= elapsed < 30, f"{elapsed:.1f} s"
    assert "rank 0 of 2: " in stderr and "did not complete within 3 s" in stderr, stderr
    assert_checkpoint_loads(out)
