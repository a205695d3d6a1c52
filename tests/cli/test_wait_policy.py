"""The command's OpenMP wait policy (tools/normkit.cpp): `normkit` runs itself again with
GOMP_SPINCOUNT=3000 (a short spin, then sleep), in the same process, unless the user chose a policy
(OMP_WAIT_POLICY or libgomp's GOMP_SPINCOUNT), which it then leaves alone.

What the running process has is read from /proc/PID/environ (the environment its current
program started with) while it trains: after steps.jsonl shows a step, so after the exec."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli_support import CLI, train_args  # the table fixture: conftest.py


def environment_while_training(table, tmp_path, env):
    """The environment of a `normkit train` that runs until it is stopped here."""
    out = tmp_path / "run"
    args = [CLI, *train_args(table, out, "--log-every", 1, epochs=100000)]
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=full_env)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "steps.jsonl").exists() and (out / "steps.jsonl").read_text().strip():
                environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
                return dict(item.split("=", 1) for item in environ.decode().split("\0") if "=" in item)
            time.sleep(0.01)
        pytest.fail(f"normkit ended or took too long before its first step: {proc.stderr.read()}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)


def test_a_short_spin_unless_the_user_chose_a_policy(table, tmp_path):
    default = environment_while_training(table, tmp_path / "default", {})
    assert default.get("GOMP_SPINCOUNT") == "3000" and "OMP_WAIT_POLICY" not in default
    active = environment_while_training(table, tmp_path / "active", {"OMP_WAIT_POLICY": "active"})
    assert active["OMP_WAIT_POLICY"] == "active"
    spin = environment_while_training(table, tmp_path / "spin", {"GOMP_SPINCOUNT": "5000"})
    assert "OMP_WAIT_POLICY" not in spin and spin["GOMP_SPINCOUNT"] == "5000"
