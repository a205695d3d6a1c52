"""Precise BN and test-time adaptation for any PyTorch model with batch norm.

``recalibrate_batch_norm(model, loader, samples=N)`` replaces the running mean and variance of
every batch-norm module (``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and every subclass:
normkit's drop-ins, Batch Renorm, Ghost BN, frozen BN) that tracks running statistics with
exact population statistics over the first N samples the loader yields (merged moments in
float64: count, mean and M2 per channel, combined with Chan et al.'s update; no EMA).
``adapt_batch_norm(model, loader, samples=N)`` is the same on unlabeled samples of new data
(test-time adaptation: Schneider et al. 2020, "32 samples are sufficient"; AdaBN).

Two passes, as in normkit's engine (``normkit recalibrate``, ``normkit/engine/bn_stats.hpp``):

- ``mode="eval"`` (default): layer by layer in the order the forward calls them. Layer k's
  statistics are those of its inputs with the whole model in eval mode and the batch-norm
  layers before it already recalibrated: exactly what it sees at inference. The loader is read
  once per batch-norm layer (each pass stops at that layer) and must yield the same samples
  every time (``shuffle=False``, or a seeded sampler); a loader that does not is an error.
- ``mode="train"``: one pass; the batch-norm modules run in training mode (they normalize with
  each batch's statistics, as in training; every other module stays in eval mode: no dropout)
  and the statistics of their inputs are pooled over all batches: fvcore's ``update_bn_stats``
  and Wu & Johnson 2021's PreciseBN (their average of per-batch means and variances weighted by
  batch size is the same merge). Depends on the loader's batch size, like training.

The variance written is the population's (M2 / count), not PyTorch's unbiased batch estimate:
here the population is the N samples. Everything else of the model is left as it was:
parameters, ``num_batches_tracked``, momentum, each module's train/eval flag; an error (too few
samples, a loader that changes, NaN) leaves the running statistics as they were too.

Only public torch APIs are used (forward pre-hooks, ``torch.no_grad``), so this works on any
``nn.Module``. The loader yields input tensors or ``(inputs, targets, ...)`` tuples (targets
are ignored) on the device of the running statistics or movable to it.
"""
import torch

__all__ = ["recalibrate_batch_norm", "adapt_batch_norm"]

_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has its input."""


class _Moments:
    """Per-channel count, mean and M2 in float64, merged with Chan et al.'s update."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None

    def add(self, x):
        # channels on dim 1 (N, C, ...): every other dim is a sample of the channel
        v = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
        n = v.shape[1]
        mean = v.mean(dim=1)
        m2 = ((v - mean[:, None]) ** 2).sum(dim=1)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def write(self, module):
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all()):
            raise RuntimeError(f"{module}: its inputs hold NaN or infinity; the running statistics "
                               "are left as they were")
        if self.count < 2:
            raise ValueError(f"{module}: a single value per channel; use more samples")
        module.running_mean.copy_(self.mean.to(module.running_mean.dtype))
        module.running_var.copy_((self.m2 / self.count).to(module.running_var.dtype))


def _inputs(batch):
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"the loader should yield tensors or (inputs, targets) tuples, got {type(batch).__name__}")
    return batch


def _batches(loader, samples, device):
    """The loader's inputs up to exactly `samples` samples (the last batch cut)."""
    seen = 0
    for batch in loader:
        x = _inputs(batch)[: samples - seen].to(device)
        seen += x.shape[0]
        yield x
        if seen >= samples:
            return
    raise ValueError(f"the loader gave {seen} samples, fewer than samples={samples}")


def recalibrate_batch_norm(model, loader, samples=10000, mode="eval"):
    """Sets every batch-norm module's running statistics to the exact population statistics
    of the first `samples` inputs of `loader` (see the module's documentation); returns
    `model`."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a whole number >= 1, got {samples!r}")
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats
             and m.running_mean is not None]
    if not norms:
        raise ValueError("the model has no batch-norm modules with running statistics")
    device = norms[0].running_mean.device
    flags = [(m, m.training) for m in model.modules()]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(),
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    try:
        with torch.no_grad():
            model.eval()
            if mode == "train":
                _train_pass(model, loader, samples, device, norms)
            else:
                _eval_pass(model, loader, samples, device, norms)
    except BaseException:
        for m, mean, var, _ in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        for m, tracked in ((m, t) for m, _, _, t in saved):
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        for m, training in flags:
            m.training = training
    return model


def adapt_batch_norm(model, loader, samples=1000, mode="eval"):
    """Test-time adaptation: `recalibrate_batch_norm` on unlabeled samples of the new data
    (targets in the loader's batches are ignored); returns `model`."""
    return recalibrate_batch_norm(model, loader, samples=samples, mode=mode)


def _eval_pass(model, loader, samples, device, norms):
    # The order the forward calls the batch-norm modules in (not their registration order).
    order = []

    def record(module, args):
        if module in order:
            raise ValueError(f"{module} is called more than once in a forward pass: its statistics "
                             "would mix different inputs")
        order.append(module)

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    try:
        model(next(_batches(loader, samples, device)))
    finally:
        for h in hooks:
            h.remove()
    fingerprint = None
    for target in order:
        moments = _Moments()

        def capture(module, args, moments=moments):
            moments.add(args[0])
            raise _Stop()

        hook = target.register_forward_pre_hook(capture)
        total = torch.zeros(2, dtype=torch.float64)
        try:
            for x in _batches(loader, samples, device):
                total += torch.stack([x.to(torch.float64).sum(), (x.to(torch.float64) ** 2).sum()])
                try:
                    model(x)
                except _Stop:
                    pass
        finally:
            hook.remove()
        # Every pass must see the same samples, or the layers' statistics would not
        # describe one population.
        if fingerprint is not None and not torch.equal(total, fingerprint):
            raise ValueError("the loader gave other samples on another pass (shuffle=True?); the "
                             "eval pass reads it once per batch-norm layer: use shuffle=False or "
                             "a seeded sampler, or mode='train'")
        fingerprint = total
        moments.write(target)


def _train_pass(model, loader, samples, device, norms):
    moments = {m: _Moments() for m in norms}

    def capture(module, args):
        moments[module].add(args[0])

    hooks = [m.register_forward_pre_hook(capture) for m in norms]
    try:
        for m in norms:
            m.train()  # batch statistics, as in training (the running ones are put back below)
        for x in _batches(loader, samples, device):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for m in norms:
        if moments[m].count:
            moments[m].write(m)
