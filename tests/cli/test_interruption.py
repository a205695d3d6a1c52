"""Interrupted runs, crashed saves, full disks and absurd models, end to end.

- SIGINT or SIGTERM in the middle of an epoch of `normkit train` or `normkit compare`: the
  step in progress finishes, the run is saved where it stopped (the checkpoint holds the
  position in the epoch), the exit status is 130 or 143, and `--resume` gives the metrics
  (and steps.jsonl) an uninterrupted run gives.
- A temporary file left by a save that a crash cut short is removed by the next resume.
- A disk that fills up during a save (a real tmpfs of a few hundred KB, mounted in a user
  namespace) gives a clear error and leaves the previous checkpoint as it was.
- A model that cannot fit in memory is refused before anything is allocated.

The signals are sent when steps.jsonl (--log-every 1) shows the run in the middle of an
epoch of cnn-small on Fashion-MNIST: each step takes milliseconds, an epoch a second or more.
"""
import json
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli_support import CLI, FASHION, normkit, results, train_args  # the table fixture: conftest.py

STEPS = 32  # per epoch: 512 samples in batches of 16


def image_args(out, *extra):
    return ["--model", "cnn-small", "--epochs", 2, "--limit-train", 512, "--limit-test", 128,
            "--batch-size", 16, "--threads", 2, "--seed", 3, "--log-every", 1, "--out", out, *extra]


def steps_logged(path):
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return 0
    done = 0
    for line in lines:
        try:
            done = max(done, json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return done


def allow_core_dump():
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def crash_backtrace(directory):
    """gdb's backtraces of a core the process left in `directory` (its working directory),
    for the failure message. Such a core named the cause of the interrupted runs that glibc
    aborted ("corrupted size vs. prev_size"): the signal handled on a thread inside oneDNN's
    sgemm (see src/engine/nn/stop_signals.cpp)."""
    cores = sorted(Path(directory).glob("core*"))
    if not cores or not shutil.which("gdb"):
        return "(no core dump or no gdb: /proc/sys/kernel/core_pattern decides where cores go)"
    trace = subprocess.run(["gdb", "-batch", "-ex", "thread apply all bt 30", CLI, str(cores[0])],
                           capture_output=True, text=True, timeout=300)
    return trace.stdout[-12000:]


def interrupted(args, steps_file, at_step, sig, workdir):
    """Runs normkit in `workdir`; sends `sig` once steps_file shows step `at_step`. Returns the
    result; a crash's backtrace is appended to its stderr."""
    proc = subprocess.Popen([CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=workdir, preexec_fn=allow_core_dump)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if steps_logged(steps_file) >= at_step:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode < 0:
        stderr += f"\n--- killed by signal {-proc.returncode}; backtraces:\n" + crash_backtrace(workdir)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def step_losses(path):
    """Per-step training metrics of steps.jsonl (not the timings)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    assert FASHION.is_dir(), f"{FASHION} is missing; run scripts/install-deps.sh"
    out = tmp_path_factory.mktemp("uninterrupted")
    normkit("train", *image_args(out / "train"), check=0)
    normkit("compare", *image_args(out / "compare"), check=0)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_saves_the_run_and_resume_matches(uninterrupted, tmp_path, sig):
    out = tmp_path / "run"
    result = interrupted(["train", *image_args(out)], out / "steps.jsonl", STEPS + 8, sig, tmp_path)
    assert result.returncode == 128 + sig, result.stderr
    assert f"interrupted by {sig.name}" in result.stderr and "--resume" in result.stderr
    info = json.loads(normkit("info", out / "checkpoint.nkc", "--json", check=0).stdout)
    assert info["epochs_done"] == 1 and 8 <= info["epoch_step"] < STEPS, info  # in epoch 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.nkc", "metrics.jsonl", "steps.jsonl"]
    resumed = normkit("train", "--resume", "--out", out, check=0)
    assert f"resuming epoch 2 after step {info['epoch_step']}" in resumed.stdout
    reference = uninterrupted / "train"
    assert results(out / "metrics.jsonl") == results(reference / "metrics.jsonl")
    assert step_losses(out / "steps.jsonl") == step_losses(reference / "steps.jsonl")


def test_compare_interrupted_in_its_second_run_resumes_both(uninterrupted, tmp_path):
    out = tmp_path / "compare"
    # Epochs interleave: batch/ epoch 1, none/ epoch 1, batch/ epoch 2, ...: stop none/ in epoch 1.
    result = interrupted(["compare", *image_args(out)], out / "none" / "steps.jsonl", 8, signal.SIGINT,
                         tmp_path)
    assert result.returncode == 130, result.stderr
    assert "the run without batch norm stopped in epoch 1" in result.stderr
    normkit("compare", "--resume", "--out", out, check=0)
    for run in ("batch", "none"):
        assert results(out / run / "metrics.jsonl") == results(uninterrupted / "compare" / run / "metrics.jsonl")


def test_a_temporary_file_left_by_a_crashed_save_is_removed_on_resume(table, tmp_path):
    out = tmp_path / "run"
    normkit(*train_args(table, out, epochs=1), check=0)
    # What a kill between writing and renaming leaves: the new checkpoint under a hidden name.
    stale = out / ".checkpoint.nkc.tmp-Xy12Ab"
    stale.write_bytes((out / "checkpoint.nkc").read_bytes())
    normkit(*train_args(table, out, "--resume", epochs=2), check=0)
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.nkc", "metrics.jsonl", "run.json"]


FULL_DISK = r"""
set -eu
mount -t tmpfs -o size=512k tmpfs "$MNT"
"$CLI" train {args} --out "$MNT/run" --epochs 1 > "$OUTSIDE/first.log" 2>&1
cp "$MNT/run/checkpoint.nkc" "$OUTSIDE/before.nkc"
# Fill the disk (dd stops at "No space left on device"), then free two pages: room
# for metrics.jsonl and run.json, not for the next checkpoint (about 60 KB).
dd if=/dev/zero of="$MNT/fill" bs=4k 2> /dev/null || true
truncate -s -8K "$MNT/fill"
set +e
"$CLI" train {args} --out "$MNT/run" --epochs 2 --resume > "$OUTSIDE/full.log" 2>&1
echo $? > "$OUTSIDE/full.status"
set -e
cp "$MNT/run/checkpoint.nkc" "$OUTSIDE/after.nkc"
ls -A "$MNT/run" > "$OUTSIDE/files"
rm "$MNT/fill"
"$CLI" train {args} --out "$MNT/run" --epochs 2 --resume > "$OUTSIDE/freed.log" 2>&1
cp "$MNT/run/metrics.jsonl" "$OUTSIDE/metrics.jsonl"
"""


def test_a_full_disk_leaves_the_previous_checkpoint(table, tmp_path):
    """A real full disk: a 512 KB tmpfs in a private mount namespace (unshare, as root or not)."""
    spec = tmp_path / "wide.spec"  # a checkpoint of about 60 KB: more than the room left
    spec.write_text("input 6; linear 512 bias=0; batchnorm; relu; linear 3")
    args = ["--model", spec, "--data", table["csv"], "--batch-size", 32, "--threads", 2, "--seed", 11]
    (tmp_path / "mnt").mkdir()
    script = tmp_path / "full_disk"  # a bash script
    script.write_text(FULL_DISK.replace("{args}", " ".join(map(str, args))))
    env = {"CLI": CLI, "MNT": str(tmp_path / "mnt"), "OUTSIDE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert done.returncode == 0, done.stderr + logs
    full = (tmp_path / "full.log").read_text()
    assert (tmp_path / "full.status").read_text().strip() == "1", full
    assert "No space left on device" in full and "previous checkpoint is unchanged" in full, full
    assert (tmp_path / "after.nkc").read_bytes() == (tmp_path / "before.nkc").read_bytes()
    assert ".tmp" not in (tmp_path / "files").read_text()
    # With room again, the resumed run is the uninterrupted one.
    normkit("train", *args, "--epochs", 2, "--out", tmp_path / "reference", check=0)
    assert results(tmp_path / "metrics.jsonl") == results(tmp_path / "reference" / "metrics.jsonl")


def test_a_model_that_cannot_fit_is_refused_with_the_figure(table, tmp_path):
    huge = tmp_path / "huge.spec"
    huge.write_text("input 6; linear 1000000000; relu; linear 1000000000; linear 3")  # 1e18 weights
    result = normkit(*train_args(table, tmp_path / "huge"), "--model", huge, check=1)
    assert "the model needs about" in result.stderr and "EB" in result.stderr
    assert "more than this machine's" in result.stderr
    assert not (tmp_path / "huge").exists()
    result = normkit(*train_args(table, tmp_path / "limited"), "--max-memory", "10K", check=1)
    assert "more than --max-memory 10 KB" in result.stderr and "raise --max-memory" in result.stderr
    normkit(*train_args(table, tmp_path / "fits", epochs=1), "--max-memory", "1G", check=0)
    result = normkit(*train_args(table, tmp_path / "bad"), "--max-memory", "lots", check=2)
    assert "--max-memory 'lots'" in result.stderr


def test_children_start_with_no_signal_blocked(table, tmp_path):
    """The command blocks SIGINT and SIGTERM in its own threads (a thread of its own takes
    them); what it starts, here the plotting script, gets them unblocked."""
    script, mask = tmp_path / "plot", tmp_path / "mask"
    script.write_text("import pathlib, sys\n"
                      "status = pathlib.Path('/proc/self/status').read_text().splitlines()\n"
                      f"pathlib.Path({str(mask)!r}).write_text(next(l for l in status if l.startswith('SigBlk')))\n")
    normkit("compare", "--model", table["spec"], "--data", table["csv"], "--epochs", 1, "--batch-size", 32,
            "--out", tmp_path / "cmp", env={"NORMKIT_PLOT_SCRIPT": script}, check=0)
    assert int(mask.read_text().split()[1], 16) == 0, mask.read_text()
