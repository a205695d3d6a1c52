"""normkit.torch.SyncBatchNorm across processes (torch.distributed, gloo, CPU).

Parity: 2 and 3 processes spawned by the test, each with its shard (uneven, one empty) of a
global batch, against torch.nn.BatchNorm on the whole batch in one process: y and dx of
every shard, dweight and dbias summed over the processes, running statistics and the batch
count on every process. Tolerance, declared: max |normkit - torch| <= rtol * max |torch| per
tensor, rtol 1e-5 for float32 and 1e-10 for float64. Every process computes the reference
itself and reports its errors; the test asserts on all of them.

Without a process group (and in eval mode) SyncBatchNorm is normkit's BatchNorm; the
constructor, state_dict and convert_sync_batchnorm are torch.nn.SyncBatchNorm's.
"""
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkit.torch as nkt

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# (name, dtype, global shape, shard sizes per world size, channels_last, momentum)
CASES = [
    ("float32_nchw", torch.float32, (7, 5, 4, 3), False, 0.1),
    ("float64_nchw", torch.float64, (7, 5, 4, 3), False, 0.1),
    ("float32_channels_last", torch.float32, (7, 6, 5, 4), True, 0.1),
    ("float64_channels_last", torch.float64, (7, 6, 5, 4), True, 0.1),
    ("float32_nc_cumulative", torch.float32, (9, 12), False, None),
    ("float64_ncl", torch.float64, (8, 3, 10), False, 0.3),
    ("float32_one_sample_shards", torch.float32, (2, 4, 3, 3), False, 0.1),
]


def _shards(n, world_size):
    """Contiguous shards in rank order, the first ones larger: uneven, and with n < world
    size the last are empty."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def _relative_error(got, want):
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def _bn_class(ndim):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[ndim]


def _check_case(rank, world_size, name, dtype, shape, channels_last, momentum):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2
         + torch.linspace(-20, 20, channels, dtype=torch.float64).view(view)).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    state = {"weight": torch.rand(channels, generator=g, dtype=dtype) + 0.5,
             "bias": torch.randn(channels, generator=g, dtype=dtype),
             "running_mean": torch.randn(channels, generator=g, dtype=dtype),
             "running_var": torch.rand(channels, generator=g, dtype=dtype) + 0.5,
             "num_batches_tracked": torch.tensor(3)}
    layout = torch.channels_last if channels_last else torch.contiguous_format

    reference = _bn_class(len(shape))(channels, momentum=momentum).to(dtype)
    reference.load_state_dict(state)
    x_ref = x.clone().contiguous(memory_format=layout).requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(dy)

    sizes = _shards(shape[0], world_size)
    first = sum(sizes[:rank])
    mine = nkt.SyncBatchNorm(channels, momentum=momentum).to(dtype)
    mine.load_state_dict(state)
    x_mine = x[first:first + sizes[rank]].clone().contiguous(memory_format=layout)
    x_mine.requires_grad_()
    y_mine = mine(x_mine)
    y_mine.backward(dy[first:first + sizes[rank]])

    dweight, dbias = mine.weight.grad.clone(), mine.bias.grad.clone()
    dist.all_reduce(dweight)
    dist.all_reduce(dbias)
    errors = {
        "y": _relative_error(y_mine, y_ref[first:first + sizes[rank]]) if sizes[rank] else 0.0,
        "dx": (_relative_error(x_mine.grad, x_ref.grad[first:first + sizes[rank]])
               if sizes[rank] else 0.0),
        "dweight": _relative_error(dweight, reference.weight.grad),
        "dbias": _relative_error(dbias, reference.bias.grad),
        "running_mean": _relative_error(mine.running_mean, reference.running_mean),
        "running_var": _relative_error(mine.running_var, reference.running_var),
    }
    facts = {
        "num_batches_tracked": int(mine.num_batches_tracked),
        "want_num_batches_tracked": int(reference.num_batches_tracked),
        "keeps_channels_last": (not channels_last or sizes[rank] == 0
                                or y_mine.is_contiguous(memory_format=torch.channels_last)),
    }
    # Eval mode: the running statistics, no synchronization.
    mine.eval()
    reference.eval()
    with torch.no_grad():
        errors["eval_y"] = _relative_error(mine(x), reference(x))
    return {"errors": errors, "facts": facts, "sizes": sizes}


def _worker(rank, world_size, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    results = {case[0]: _check_case(rank, world_size, *case) for case in CASES}
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _spawn(world_size, tmp_path, timeout=120):
    """Runs _worker on world_size processes; fails (never hangs) on an error or timeout."""
    context = mp.start_processes(_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} processes did not finish within {timeout} s")
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_parity_with_batch_norm_on_the_global_batch(world_size, tmp_path):
    results = _spawn(world_size, tmp_path)
    worst = {}
    for rank, result in enumerate(results):
        for name, dtype, shape, _, _ in CASES:
            r = result[name]
            assert r["sizes"] == _shards(shape[0], world_size)
            assert r["facts"]["num_batches_tracked"] == r["facts"]["want_num_batches_tracked"]
            assert r["facts"]["keeps_channels_last"], (name, rank)
            for quantity, error in r["errors"].items():
                assert error <= RTOL[dtype], (
                    f"{name}, rank {rank} of {world_size}: {quantity} relative error {error:.3g} "
                    f"> {RTOL[dtype]:g}")
                key = (str(dtype), quantity)
                worst[key] = max(worst.get(key, 0.0), error)
    print(f"\n[ measured ] {world_size} processes, worst relative error per quantity:")
    for (dtype, quantity), error in sorted(worst.items()):
        print(f"  {dtype:14s} {quantity:13s} {error:.2e}")


def _lost_peer_worker(rank, world_size, store, out_dir):
    """Rank 0 shares a group with rank 1, which dies (exits without leaving it), and one
    with rank 2, which hangs; in each it trains a step of a SyncBatchNorm and reports what
    was raised, how long it took, and whether the layer's state changed."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=3)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=timeout)
    groups = {"dies": dist.new_group([0, 1], timeout=timeout),
              "hangs": dist.new_group([0, 2], timeout=timeout)}
    if rank == 1:
        os._exit(0)
    if rank == 2:
        time.sleep(120)  # the test kills it
    outcomes = {}
    for how, group in groups.items():
        layer = nkt.SyncBatchNorm(4, process_group=group)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        started = time.monotonic()
        outcome = {"error": None}
        try:
            layer(torch.randn(3, 4, 2, 2))
        except RuntimeError as error:
            outcome["error"] = str(error)
        outcome["seconds"] = time.monotonic() - started
        outcome["unchanged"] = all(torch.equal(before[k], v)
                                   for k, v in layer.state_dict().items())
        outcomes[how] = outcome
    with open(os.path.join(out_dir, "partial.json"), "w") as f:
        json.dump(outcomes, f)
    os.rename(os.path.join(out_dir, "partial.json"), os.path.join(out_dir, "rank0.json"))
    os._exit(0)  # not destroy_process_group, which would wait for the lost processes


def test_a_lost_process_is_a_clear_error_not_a_hang(tmp_path):
    context = mp.start_processes(_lost_peer_worker,
                                 args=(3, str(tmp_path / "store"), str(tmp_path)),
                                 nprocs=3, join=False, start_method="spawn")
    report = tmp_path / "rank0.json"
    deadline = time.monotonic() + 90
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in context.processes:
        process.kill()
    assert report.exists(), "rank 0 neither finished nor failed within 90 s (a hang)"
    for how, outcome in json.loads(report.read_text()).items():
        print(f"\n[ measured ] a process that {how}: {outcome['seconds']:.2f} s to the error: "
              f"{outcome['error']}")
        assert outcome["error"] is not None, f"the forward succeeded though its peer {how}"
        assert "SyncBatchNorm: exchanging the batch statistics" in outcome["error"], outcome
        assert "running statistics left unchanged" in outcome["error"]
        assert outcome["unchanged"], "the failed forward changed the layer's state"
        # The groups' timeout is 3 s; a dead peer is noticed at once.
        assert outcome["seconds"] < 20, outcome


# ---------------------------------------------------------------- one process


def test_without_a_process_group_it_is_batch_norm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5).to(memory_format=torch.channels_last)
    sync, plain = nkt.SyncBatchNorm(4, momentum=0.2), nkt.BatchNorm2d(4, momentum=0.2)
    plain.load_state_dict(sync.state_dict())
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yp = sync(xs), plain(xp)
    ys.sum().backward()
    yp.sum().backward()
    assert torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad)
    assert ys.is_contiguous(memory_format=torch.channels_last)
    for name, value in plain.state_dict().items():
        assert torch.equal(sync.state_dict()[name], value), name
    sync.eval()
    plain.eval()
    assert torch.equal(sync(x), plain(x))


def test_constructor_state_dict_and_errors_are_torchs():
    ours = nkt.SyncBatchNorm(8, eps=1e-3, momentum=None, affine=True, track_running_stats=True)
    theirs = torch.nn.SyncBatchNorm(8, eps=1e-3, momentum=None)
    # torch's base class, not torch.nn.SyncBatchNorm (which DDP refuses on CPU).
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert ours.process_group is None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    ours.load_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(8))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(torch.randn(1, 8))


def test_convert_sync_batchnorm_replaces_plain_batch_norm_and_shares_state():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(nkt.BatchNorm2d(4), nkt.FrozenBatchNorm2d(4),
                            nkt.GhostBatchNorm2d(4, virtual_batch_size=2)),
        torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 8), torch.nn.BatchNorm1d(8))
    model[1].running_mean.fill_(0.5)
    weight = model[1].weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = nkt.SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(nkt.SyncBatchNorm) == 3
    assert nkt.FrozenBatchNorm2d in kinds and nkt.GhostBatchNorm2d in kinds
    assert converted[1].weight is weight  # the parameters themselves, as torch's conversion
    after = converted.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_ddp_example_trains_and_keeps_the_processes_identical():
    """examples/ddp_fashion_mnist.py, shortened: 2 processes, 1 epoch on 1024 images."""
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "ddp_fashion_mnist.py")
    out = subprocess.run(
        [sys.executable, example, "--processes", "2", "--epochs", "1", "--limit-train", "1024",
         "--limit-test", "1000", "--batch-size", "64", "--threads", "2"],
        capture_output=True, text=True, timeout=300, env=os.environ)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert "parameters identical on every process: True" in line, out.stdout
    accuracy = float(line.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.4, line  # ten classes: chance is 0.1
