"""Learning-rate schedules of `normkit train`: --lr-schedule step (--lr-step, --lr-gamma) and
--warmup-steps, as rates (metrics.jsonl per epoch, steps.jsonl per step), as training (a
schedule changes the run) and across --resume (the checkpoint keeps the schedule, so a resumed
run trains what an uninterrupted one does)."""
import pytest

from cli_support import metrics, normkit, results, train_args

LR = 0.05  # train_args' rate


def rates(out, name="metrics.jsonl"):
    return [m["lr"] for m in metrics(out / name)]


def test_step_schedule_decays_every_n_epochs_and_resumes(table, tmp_path):
    step = ["--lr-schedule", "step", "--lr-step", 2, "--lr-gamma", 0.5]
    normkit(*train_args(table, tmp_path / "full", *step, epochs=5), check=0)
    assert rates(tmp_path / "full") == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 4], rel=1e-12)
    normkit(*train_args(table, tmp_path / "parts", *step, epochs=3), check=0)
    normkit("train", "--resume", "--epochs", 5, "--out", tmp_path / "parts", check=0)
    assert results(tmp_path / "parts" / "metrics.jsonl") == results(tmp_path / "full" / "metrics.jsonl")
    normkit(*train_args(table, tmp_path / "constant", epochs=5), check=0)
    assert results(tmp_path / "constant" / "metrics.jsonl")[2:] != results(tmp_path / "full" / "metrics.jsonl")[2:]


def test_warmup_ramps_the_rate_per_step_and_resumes_within_it(table, tmp_path):
    normkit(*train_args(table, tmp_path / "full", "--warmup-steps", 30, "--log-every", 1, epochs=3), check=0)
    steps = metrics(tmp_path / "full" / "steps.jsonl")
    per_epoch = metrics(tmp_path / "full" / "metrics.jsonl")[0]["steps"]
    assert per_epoch < 30 < 3 * per_epoch, "the warm-up should outlast the first epoch"
    # The line at step s follows steps 0..s-1; its rate is step s-1's: s/30 of lr.
    for line in steps:
        s = line["step"]
        assert line["lr"] == pytest.approx(LR * min(max(s, 1), 30) / 30, rel=1e-12), line
    assert [line["step"] for line in steps] == list(range(1, 3 * per_epoch + 1))
    # The warm-up is in the checkpoint: resumed after epoch 1 (mid warm-up), the run
    # trains what the uninterrupted one did.
    normkit(*train_args(table, tmp_path / "parts", "--warmup-steps", 30, epochs=1), check=0)
    normkit("train", "--resume", "--epochs", 3, "--out", tmp_path / "parts", check=0)
    assert results(tmp_path / "parts" / "metrics.jsonl") == results(tmp_path / "full" / "metrics.jsonl")
    normkit(*train_args(table, tmp_path / "plain", epochs=3), check=0)
    assert results(tmp_path / "plain" / "metrics.jsonl") != results(tmp_path / "full" / "metrics.jsonl")
    result = normkit("train", "--resume", "--epochs", 4, "--warmup-steps", 5, "--out", tmp_path / "parts", check=2)
    assert "--warmup-steps 5 differs from the checkpoint's 30" in result.stderr


@pytest.mark.parametrize("options, message", [
    (["--lr-schedule", "step"], "--lr-schedule step needs --lr-step N"),
    (["--lr-step", 2], "--lr-step and --lr-gamma apply to --lr-schedule step only"),
    (["--lr-schedule", "cosine", "--lr-gamma", 0.5], "--lr-step and --lr-gamma apply to --lr-schedule step only"),
    (["--lr-schedule", "step", "--lr-step", 2, "--lr-gamma", 1.5], "--lr-gamma must be in (0, 1]"),
    (["--warmup-steps", -1], "--warmup-steps"),
])
def test_schedule_options_are_checked(table, tmp_path, options, message):
    result = normkit(*train_args(table, tmp_path / "x", *options), check=2)
    assert message in result.stderr
    assert not (tmp_path / "x").exists()
