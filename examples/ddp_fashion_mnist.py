"""Data-parallel training of a small CNN on Fashion-MNIST with PyTorch's
DistributedDataParallel over gloo (CPU), its batch norm synchronized by normkit.

    PYTHONPATH=build/python /usr/bin/python3 examples/ddp_fashion_mnist.py \\
        --processes 2 --epochs 1 --limit-train 6000 --limit-test 2000

Each process takes its shard of every global batch (--batch-size is the global batch),
DistributedDataParallel averages the gradients, and normkit.torch.SyncBatchNorm (from
convert_sync_batchnorm) normalizes every shard with the statistics of the global batch.
Rank 0 prints the global batch's mean loss per epoch and the test accuracy, and checks
that every process holds the same parameters.
"""
import argparse
import datetime
import gzip
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkit.torch as nkt

DATA = "/usr/share/datasets/fashion-mnist"


def load_idx(split, limit):
    """(images float32 [N, 1, 28, 28] standardized with the training set's statistics,
    labels int64 [N]): the first `limit` samples of Fashion-MNIST's 'train' or 't10k'."""
    def read(name, offset):
        path = os.path.join(DATA, name)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    def find(stem):
        for name in (stem + ".gz", stem):
            if os.path.exists(os.path.join(DATA, name)):
                return name
        raise FileNotFoundError(f"{stem}(.gz) not in {DATA} (Debian: dataset-fashion-mnist)")

    images = read(find(f"{split}-images-idx3-ubyte"), 16).reshape(-1, 1, 28, 28)[:limit]
    labels = read(find(f"{split}-labels-idx1-ubyte"), 8)[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64))


def small_cnn():
    """conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, fc128-BN-ReLU, fc10 (normkit's cnn-small),
    written with torch.nn's BatchNorm: convert_sync_batchnorm replaces them."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(64 * 7 * 7, 128, bias=False), torch.nn.BatchNorm1d(128),
        torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(rank, args, store):
    torch.set_num_threads(max(1, args.threads // args.processes))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=args.processes, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(args.seed)  # the same initial model on every process
    model = nkt.SyncBatchNorm.convert_sync_batchnorm(small_cnn())
    model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    x, y = load_idx("train", args.limit_train)
    test_x, test_y = load_idx("t10k", args.limit_test)
    for epoch in range(args.epochs):
        ddp.train()
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        loss_sum = torch.zeros(2, dtype=torch.float64)  # summed loss, samples
        for first in range(0, len(x) - args.batch_size + 1, args.batch_size):
            batch = order[first:first + args.batch_size]
            shard = batch[rank::args.processes]  # this process's part of the global batch
            inputs = x[shard].contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(ddp(inputs), y[shard])
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients over the processes
            optimizer.step()
            loss_sum += torch.tensor([loss.item() * len(shard), len(shard)], dtype=torch.float64)
        dist.all_reduce(loss_sum)
        ddp.eval()
        mine = slice(rank * len(test_x) // args.processes,
                     (rank + 1) * len(test_x) // args.processes)
        with torch.no_grad():
            correct = (ddp(test_x[mine].contiguous(memory_format=torch.channels_last))
                       .argmax(1) == test_y[mine]).sum()
        dist.all_reduce(correct)
        # Every process must hold the same parameters and buffers: compare with rank 0's.
        state = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
        reference = state.clone()
        dist.broadcast(reference, 0)
        same = torch.tensor([int(torch.equal(state, reference))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {loss_sum[0] / loss_sum[1]:.4f}, "
                  f"test accuracy {correct.item() / len(test_x):.4f}, "
                  f"{time.perf_counter() - start:.1f} s, {args.processes} processes, "
                  f"parameters identical on every process: {bool(same.item())}", flush=True)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--limit-train", type=int, default=60000)
    parser.add_argument("--limit-test", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(train, args=(args, os.path.join(scratch, "store")), nprocs=args.processes)


if __name__ == "__main__":
    main()
