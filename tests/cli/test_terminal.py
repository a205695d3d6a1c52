"""The progress display on a terminal: `normkit train` and `compare` run on a pseudo-terminal
of 80 and 120 columns, and what they write is replayed on a small terminal model (carriage
return, newline, erase to the end of the line, automatic wrap at the last column). The
progress must be one line redrawn in place, never wider than the terminal (no wrapped
lines, so the screen never scrolls for it), and gone when the epoch's line is printed; the
comparison table must fit too. Off a terminal there is no progress line at all."""
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios

import pytest

from cli_support import CLI, FASHION, normkit, train_args


def run_on_terminal(args, columns, rows=40):
    """Runs normkit with stderr (where the progress line goes) on a pseudo-terminal `columns`
    wide and stdout on a pipe; returns its exit code, what reached the terminal (bytes) and
    stdout (text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = dict(os.environ, COLUMNS="", TERM="xterm")
    process = subprocess.Popen([CLI, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        assert ready, "normkit wrote nothing for 120 s"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    stdout = process.stdout.read().decode()
    return process.wait(timeout=60), output, stdout


class Terminal:
    """Enough of a VT100 for these programs: printable characters, \\r, \\n (the pty turns
    \\n into \\r\\n), ESC[K and automatic wrap when a character is written past the last
    column. Counts the lines the screen scrolled by and the redraws of a line."""

    def __init__(self, columns):
        self.columns = columns
        self.lines = [""]
        self.column = 0
        self.wrapped = 0
        self.redraws = 0

    def feed(self, text):
        for token in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|.", text, re.S):
            if token == "\r":
                if self.lines[-1]:
                    self.redraws += 1
                self.column = 0
            elif token == "\n":
                self.lines.append("")
                self.column = 0
            elif token == "\x1b[K":
                self.lines[-1] = self.lines[-1][:self.column]
            elif token.startswith("\x1b"):
                raise AssertionError(f"unexpected escape sequence {token!r}")
            else:
                if self.column == self.columns:  # the character goes to the next line
                    self.lines.append("")
                    self.column = 0
                    self.wrapped += 1
                line = self.lines[-1].ljust(self.column)
                self.lines[-1] = line[:self.column] + token + line[self.column + 1:]
                self.column += 1
        return self


def progress_frames(text):
    """The states of the progress line: what was drawn before each carriage return."""
    frames = [frame for frame in re.findall(r"\r([^\r\n]*?)\x1b\[K", text)]
    return [frame for frame in frames if frame]  # an empty one is the line's erasure


@pytest.mark.parametrize("columns", [80, 120])
def test_train_progress_is_one_line_that_fits(columns, tmp_path):
    assert FASHION.is_dir(), f"{FASHION} is missing; run scripts/install-deps.sh"
    # mlp-paper on 3000 images, batch 16: 188 steps per epoch, drawn every 0.1 s and at the end.
    code, raw, stdout = run_on_terminal(["train", "--model", "mlp-paper", "--epochs", 2, "--batch-size", 16,
                                         "--limit-train", 3000, "--limit-test", 500, "--threads", 1,
                                         "--out", tmp_path / "run"], columns)
    text = raw.decode()
    assert code == 0, text + stdout
    frames = progress_frames(text)
    assert frames, f"no progress line on a terminal: {text!r}"
    assert any(f.startswith("epoch 1/2") for f in frames) and any(f.startswith("epoch 2/2") for f in frames)
    assert any("188/188" in f for f in frames), frames
    for frame in frames:
        assert len(frame) <= columns - 1, (len(frame), frame)
        assert re.match(r"epoch [12]/2 \[[#.]+\] \d+/188  loss \d\.\d{4}", frame), frame
    if columns == 120:  # room for everything: a long bar, the accuracy and the throughput
        assert all("acc " in f and "/s" in f and "#" * 10 in f.replace(".", "#") for f in frames), frames
    screen = Terminal(columns).feed(text)
    # Redrawn in place: the progress never wrapped onto a second line, nothing scrolled, and
    # it is erased when an epoch's line is printed (stdout): the terminal is blank again.
    assert screen.wrapped == 0 and len(screen.lines) == 1 and screen.lines[0].strip() == ""
    assert screen.redraws >= 2
    assert [line.split("  ")[0] for line in stdout.splitlines() if line.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]


def test_compare_progress_and_table_fit_80_columns(table, tmp_path):
    code, raw, stdout = run_on_terminal(["compare", "--model", table["spec"], "--data", table["csv"],
                                         "--epochs", 2, "--batch-size", 8, "--threads", 1,
                                         "--out", tmp_path / "cmp"], 80)
    text = raw.decode()
    assert code == 0, text + stdout
    frames = progress_frames(text)
    assert any(f.startswith("with BN") for f in frames) and any(f.startswith("without BN") for f in frames)
    assert all(len(f) <= 79 for f in frames), frames
    screen = Terminal(80).feed(text)
    assert screen.wrapped == 0 and len(screen.lines) == 1
    table_lines = [line for line in stdout.splitlines() if " | " in line]
    assert len(table_lines) == 4, stdout  # two header lines, two epochs
    assert all(len(line) <= 79 for line in table_lines), table_lines


def test_progress_line_is_cut_to_narrow_terminals(table, tmp_path):
    """At 30 columns the line keeps what matters (epoch, step, loss), cut to 29 characters."""
    code, raw, stdout = run_on_terminal(train_args(table, tmp_path / "run", epochs=1), 30)
    text = raw.decode()
    assert code == 0, text + stdout
    frames = progress_frames(text)
    assert frames and all(len(f) <= 29 for f in frames), frames
    assert frames[-1].startswith("epoch 1/1 15/15  loss"), frames
    assert Terminal(30).feed(text).wrapped == 0


def test_no_progress_line_off_a_terminal(table, tmp_path):
    result = normkit(*train_args(table, tmp_path / "run"), check=0)
    for stream in (result.stdout, result.stderr):
        assert "\r" not in stream and "\x1b" not in stream
    assert [line.split("  ")[0] for line in result.stdout.splitlines() if line.startswith("epoch")] == [
        "epoch 1/2", "epoch 2/2"]
