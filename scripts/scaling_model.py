"""A model of a data-parallel training step against the number of ranks, from the
figures `make bench-distributed` measured on this machine (its JSON) and the published
latency and bandwidth of a cluster interconnect. Prints the tables of docs/scaling.md.

    /usr/bin/python3 scripts/scaling_model.py build/bench/distributed.json

Per step, with N ranks, b samples per rank and P parameters (all on the critical path:
normkit neither overlaps communication with compute nor buckets gradients):

  compute(b)     one-thread time per step at per-rank batch b (measured; the bench's
                 "compute_one_thread", log-log interpolated between measured batches)
  gradients(N)   the gradient sum: normkit all-gathers every rank's float gradients and
                 adds them in rank order, (N - 1)(alpha + 4P/beta) (ring all-gather), where a
                 ring all-reduce would cost 2(N - 1)alpha + 2(N - 1)/N 4P/beta
  sync BN(N)     k all-gathers per step of m bytes per rank each (k and m measured: 2 per
                 batch-norm layer, 3 doubles per channel forward and 2 backward), each
                 ceil(log2 N)alpha + (N - 1)m/beta (recursive doubling)
"""
import json
import math
import sys

# Published figures of a current cluster interconnect (assumptions, not measured here):
# InfiniBand HDR, 200 Gb/s per port = 25 GB/s, MPI point-to-point latency about 1 us; we
# take 1.5 us per message and 20 GB/s achieved.
ALPHA = 1.5e-6  # seconds per message
BETA = 20e9     # bytes per second
RANKS = [2, 8, 32, 128, 512, 1024]


def compute_seconds(table, b):
    """One-thread compute per step at per-rank batch b: measured points, log-log interpolation
    between them, linear extrapolation in b below the smallest (b = 1)."""
    points = sorted((row["batch"], row["seconds"]) for row in table)
    if b <= points[0][0]:
        return points[0][1] * b / points[0][0]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if b0 <= b <= b1:
            w = math.log(b / b0) / math.log(b1 / b0)
            return math.exp((1 - w) * math.log(t0) + w * math.log(t1))
    b_last, t_last = points[-1]
    return t_last * b / b_last


def model(bench, ranks, per_rank_batch):
    parameters = bench["parameters"]
    sync = next(arm for arm in bench["arms"] if arm["arm"] == "sync BN")
    local = next(arm for arm in bench["arms"] if arm["arm"] == "local BN")
    # BN collectives per step: sync BN's double gathers less local BN's (the per-epoch
    # replica check, amortized over the steps, is in both).
    k = sync["bn_collectives_per_step"] - local["bn_collectives_per_step"]
    bn_bytes = sync["bn_bytes_sent_per_step"] - local["bn_bytes_sent_per_step"]
    m = bn_bytes / k if k else 0.0
    compute = compute_seconds(bench["compute_one_thread"], per_rank_batch)
    grad_gather = (ranks - 1) * (ALPHA + 4 * parameters / BETA)
    grad_ring = 2 * (ranks - 1) * ALPHA + 2 * (ranks - 1) / ranks * 4 * parameters / BETA
    sync_bn = k * (math.ceil(math.log2(ranks)) * ALPHA + (ranks - 1) * m / BETA)
    return {"compute": compute, "gradients": grad_gather, "ring": grad_ring, "sync_bn": sync_bn,
            "k": k, "m": m}


def main(path):
    bench = json.load(open(path))
    print(f"Inputs: {bench['model']}, {bench['parameters']} parameters; interconnect "
          f"alpha = {ALPHA * 1e6:.1f} us, beta = {BETA / 1e9:.0f} GB/s (assumed, published HDR "
          f"InfiniBand class).\n")
    first = model(bench, 2, 2)
    print(f"Measured here: {first['k']:.0f} batch-norm all-gathers per step of "
          f"{first['m']:.0f} bytes per rank; one-thread compute per step: "
          + ", ".join(f"b={row['batch']} {row['seconds'] * 1e3:.2f} ms"
                      for row in bench["compute_one_thread"]) + ".\n")
    for b in (1, 4, 32):
        print(f"Per-rank batch {b} (weak scaling: the global batch is {b} x N):\n")
        print("| ranks | compute ms | sync BN ms | gradient sum ms: normkit's all-gather "
              "| step ms | sync BN share | gradient sum ms: ring all-reduce | step ms "
              "| sync BN share |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in RANKS:
            r = model(bench, n, b)
            step = r["compute"] + r["gradients"] + r["sync_bn"]
            ring_step = r["compute"] + r["ring"] + r["sync_bn"]
            print(f"| {n} | {r['compute'] * 1e3:.2f} | {r['sync_bn'] * 1e3:.3f} "
                  f"| {r['gradients'] * 1e3:.2f} | {step * 1e3:.2f} "
                  f"| {100 * r['sync_bn'] / step:.1f}% | {r['ring'] * 1e3:.2f} "
                  f"| {ring_step * 1e3:.2f} | {100 * r['sync_bn'] / ring_step:.1f}% |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/bench/distributed.json")
