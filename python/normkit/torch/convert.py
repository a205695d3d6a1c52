"""convert(): adopt normkit in an existing model, as torch.nn.SyncBatchNorm.
convert_sync_batchnorm does for its module."""
import operator

import torch

from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batch_norm_fused import BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormReLU1d
from .batch_norm_fused import BatchNormReLU2d
from .group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm

__all__ = ["convert"]

# torch.nn's classes (exactly these: a subclass may change what forward does) and
# normkit's replacements, which subclass them.
_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}
_FUSED = {BatchNorm1d: (BatchNormReLU1d, BatchNormAddReLU1d),
          BatchNorm2d: (BatchNormReLU2d, BatchNormAddReLU2d)}


def convert(model, fuse_relu=False):
    """Replaces every torch.nn.BatchNorm1d/2d/3d, LayerNorm, GroupNorm and
    InstanceNorm1d/2d/3d in `model` by normkit's, in place, and returns the model (the
    replacement when `model` itself is one of them).

    The state is kept: the replacements hold the same Parameter objects (an optimizer built
    before keeps training them), the same buffers, hooks and training mode, so the
    state_dict has the same keys and loads into the unconverted model and back. Subclasses
    of these classes (normkit's own, torchvision's, a user's) are left as they are.

    fuse_relu=True then traces the model with torch.fx and replaces each BatchNorm1d/2d
    whose output goes only to a ReLU by BatchNormReLU1d/2d, and each one whose output goes
    only to an addition that goes only to a ReLU (a ResNet block's tail, relu(bn(x) + z)) by
    BatchNormAddReLU1d/2d, whose residual z must have the output's shape (no broadcasting).
    It returns a torch.fx.GraphModule with the same state_dict keys; a model torch.fx cannot
    trace raises torch.fx's error (use fuse_relu=False for it).
    """
    model = _replaced(model)
    if not fuse_relu:
        return model
    return _fuse_relu(model)


def _moved(module, cls):
    """A `cls` with `module`'s state: its attributes, Parameters, buffers and hooks."""
    replacement = cls.__new__(cls)
    replacement.__dict__ = dict(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        replacement.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
    return replacement


def _replaced(module):
    cls = _REPLACEMENTS.get(type(module))
    if cls is not None:
        return _moved(module, cls)
    for name, child in module.named_children():
        replacement = _replaced(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


class _Tracer(torch.fx.Tracer):
    # normkit's modules as leaves, like torch.nn's, so that the graph shows them.
    def is_leaf_module(self, m, qualified_name):
        return m.__module__.startswith("normkit.torch") or super().is_leaf_module(m, qualified_name)


_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _is_relu(node, modules):
    if node.op == "call_module":
        return type(modules[node.target]) is torch.nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _added_to(node, other):
    """The operand other than `other` when `node` adds two tensors (no alpha), else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in _ADD_FUNCTIONS) or
            (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    a, b = node.args
    operand = b if a is other else a if b is other else None
    return operand if isinstance(operand, torch.fx.Node) and operand is not other else None


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse_relu(model):
    graph = _Tracer().trace(model)
    traced = torch.fx.GraphModule(model, graph)
    modules = dict(traced.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        # A module called more than once serves other places, which may not fuse.
        if (node.op != "call_module" or type(modules[node.target]) not in _FUSED or
                calls[node.target] != 1):
            continue
        plain, with_residual = _FUSED[type(modules[node.target])]
        user = _only_user(node)
        if user is None:
            continue
        if _is_relu(user, modules):
            relu, fused, args, dead = user, plain, node.args, [user, node]
        else:
            residual = _added_to(user, node)
            relu = _only_user(user) if residual is not None else None
            if relu is None or not _is_relu(relu, modules):
                continue
            fused, args, dead = with_residual, (node.args[0], residual), [relu, user, node]
        # The fused call goes where the ReLU was: every operand is computed by then.
        with graph.inserting_before(relu):
            call = graph.call_module(node.target, args)
        relu.replace_all_uses_with(call)
        for gone in dead:
            graph.erase_node(gone)
        _set_submodule(traced, node.target, _moved(modules[node.target], fused))
    graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()
    return traced


def _set_submodule(root, target, module):
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
