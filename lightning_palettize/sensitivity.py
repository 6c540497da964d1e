"""Fisher sensitivity: the calibration pass of SKM (sensitivity-weighted k-means, SqueezeLLM).

SKM weights each element of a weight tensor in its k-means by how much the loss cares about
it, estimated by the diagonal of the empirical Fisher information: the sum over calibration
samples of the squared gradient of that sample's loss. This module accumulates it, and leaves
the model exactly as it found it.

Two ways to count a "sample" (the ``per_sample`` switch of :func:`compute_sensitivity`):

* ``per_sample=False`` (coremltools' ``SKMPalettizer``): one dataloader item is one sample,
  whatever its batch size, so the Fisher is built from batch gradients:
  ``F = sum over items of (d loss(item) / d w) ** 2``.
* ``per_sample=True`` (SqueezeLLM): every item is cut into its individual samples along dim 0,
  so ``F = sum over samples of (d loss(sample) / d w) ** 2``. This is the Fisher the method
  assumes; batch gradients average away sample-to-sample disagreement and underestimate it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = [(torch.randn(2, 4), torch.randint(0, 3, (2,))) for _ in range(4)]
    >>> loss_fn = lambda m, item: nn.functional.cross_entropy(m(item[0]), item[1])
    >>> sens = compute_sensitivity(model, data, loss_fn, nsamples=8, per_sample=True,
    ...                            progress=False)
    >>> sens.nsamples, sorted(sens.fisher)[0], sens["0.weight"].shape
    (8, '0.bias', torch.Size([8, 4]))
    >>> weights = normalize_sensitivity(sens["0.weight"])  # k-means weights in (0, 1]
"""

from __future__ import annotations

import json
import logging
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_palettize._progress import Progress

__all__ = ["Sensitivity", "compute_sensitivity", "normalize_sensitivity"]

_log = logging.getLogger(__name__)

# The safetensors header carries one metadata key whose value is a JSON object.
_HEADER_KEY = "lightning_palettize.sensitivity"
_FORMAT_VERSION = 1

# Tests switch the torch.func path off to compare it with the per-sample loop.
_TRY_VMAP = True
# Upper bound on per-sample gradient elements held at once by the torch.func path (fp32: 256 MiB).
_VMAP_GRAD_ELEMENTS = 1 << 26
_END = object()


@dataclass
class Sensitivity:
    """Accumulated Fisher diagonal of a model's parameters, as computed by
    :func:`compute_sensitivity`.

    Attributes:
        fisher: qualified parameter name -> raw Fisher diagonal (float32, parameter's shape).
            Parameters that got no gradient are absent (see ``missing``).
        nsamples: how many samples were actually used (items if ``per_sample`` is False).
        missing: requested parameter names that received no gradient from the loss.
        per_sample: whether gradients were per individual sample (True) or per item (False).
    """

    fisher: dict[str, Tensor]
    nsamples: int
    missing: list[str] = field(default_factory=list)
    per_sample: bool = False

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.fisher[name]
        except KeyError:
            why = "it received no gradient" if name in self.missing else "it was not computed"
            raise KeyError(f"Sensitivity: no Fisher for parameter {name!r} ({why})") from None

    def get(self, name: str, default: Tensor | None = None) -> Tensor | None:
        return self.fisher.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self.fisher

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to a safetensors file; ``nsamples``, ``per_sample``, ``missing`` and the format
        version go into the header metadata as one JSON object."""
        from safetensors.torch import save_file

        header = {
            "format_version": _FORMAT_VERSION,
            "nsamples": int(self.nsamples),
            "per_sample": bool(self.per_sample),
            "missing": list(self.missing),
        }
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.fisher.items()
        }
        save_file(tensors, os.fspath(path), metadata={_HEADER_KEY: json.dumps(header)})

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> Sensitivity:
        """Read a file written by :meth:`save`, tensors placed on ``map_location``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a valid sensitivity file (corrupt, foreign, or a newer
                format version); the message names the path.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Sensitivity.load: no such file: {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except Exception as e:
            raise ValueError(
                f"Sensitivity.load: {path!r} is not a readable safetensors file ({e})"
            ) from e

        def bad(why: str) -> ValueError:
            return ValueError(f"Sensitivity.load: {path!r} is not a sensitivity file: {why}")

        if _HEADER_KEY not in metadata:
            raise bad(f"header metadata lacks the {_HEADER_KEY!r} key")
        try:
            header = json.loads(metadata[_HEADER_KEY])
        except json.JSONDecodeError as e:
            raise bad(f"header {_HEADER_KEY!r} is not JSON ({e})") from e
        if not isinstance(header, dict):
            raise bad(f"header {_HEADER_KEY!r} is not a JSON object")
        version = header.get("format_version")
        if version != _FORMAT_VERSION:
            raise bad(f"format_version {version!r}, this version reads {_FORMAT_VERSION}")
        nsamples, per_sample, missing = (
            header.get(k) for k in ("nsamples", "per_sample", "missing")
        )
        if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 0:
            raise bad(f"nsamples must be a non-negative int, got {nsamples!r}")
        if not isinstance(per_sample, bool):
            raise bad(f"per_sample must be a bool, got {per_sample!r}")
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise bad(f"missing must be a list of names, got {missing!r}")
        if overlap := sorted(set(missing) & set(tensors)):
            raise bad(f"names both missing and present: {overlap}")
        if wrong := sorted(k for k, v in tensors.items() if v.dtype != torch.float32):
            raise bad(f"tensors must be float32, these are not: {wrong}")
        fisher = {k: v.to(map_location) for k, v in tensors.items()}
        return cls(fisher=fisher, nsamples=nsamples, missing=missing, per_sample=per_sample)


def compute_sensitivity(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    param_names: Sequence[str] | None = None,
    nsamples: int = 128,
    per_sample: bool = False,
    progress: bool = True,
) -> Sensitivity:
    """Accumulate the diagonal Fisher information of ``model``'s parameters over calibration data.

    For each sample, ``loss_fn(model, sample)`` is called and its gradient is squared and added,
    in float32, to a per-parameter accumulator (by a post-accumulate-grad hook, so at most one
    parameter's gradient is alive at a time beyond what backward itself holds).

    Counting (see the module docstring for why both exist):

    * ``per_sample=False`` (coremltools): the first ``nsamples`` dataloader items, each one
      sample; ``F = sum over items of grad(loss(item)) ** 2``.
    * ``per_sample=True`` (SqueezeLLM): every tensor of an item (a tensor, or tuples / lists /
      dicts of them; non-tensor leaves are passed through unchanged) is cut along dim 0 into
      samples of batch size 1 (the dim is kept), ``nsamples`` counts those samples (the last
      item is cut short if needed), and ``F = sum over samples of grad(loss(sample)) ** 2``.
      Each item is first tried with ``torch.func`` (``vmap(grad(...))`` over its samples); if
      that raises on the first item (data-dependent control flow, in-place buffer updates such
      as train-mode BatchNorm, ...) a plain loop over batch-1 micro-batches is used for the whole
      run. Both give the same result. BatchNorm in train mode cannot see batches of one: put it
      in eval mode for per-sample calibration.

    Model contract: parameter values, buffers (BatchNorm running stats included), the
    train/eval mode of every submodule, ``requires_grad`` flags and existing ``.grad`` tensors
    (same objects, same values; None stays None) are as before the call, also when
    ``loss_fn`` raises (the exception propagates). The mode is not changed for calibration:
    dropout stays active in train mode, as in coremltools. Only buffers are copied; ``.grad``
    tensors are set aside, not copied. Moving data to the model's device is ``loss_fn``'s job.

    Args:
        model: the model; its parameters are read, never written.
        dataloader: any iterable of items (a ``DataLoader``, a list of batches, ...).
        loss_fn: ``loss_fn(model, item) -> Tensor`` with one element, as in coremltools.
        param_names: qualified names as in ``model.named_parameters()`` (tied aliases accepted).
            Default: every floating-point parameter, frozen ones included. Frozen requested
            parameters get ``requires_grad`` temporarily.
        nsamples: how many samples to use (items if ``per_sample`` is False); at least 1.
        per_sample: count and differentiate individual samples instead of items.
        progress: show a progress bar over samples (tqdm if installed, else a line on stderr
            every ~10%); False prints nothing.

    Returns:
        A :class:`Sensitivity` with the raw Fisher (float32, on each parameter's device) for
        every requested parameter that received a gradient, the names that did not in
        ``missing``, and the number of samples actually used.

    Raises:
        ValueError: ``nsamples`` < 1, unknown or non-floating ``param_names``, an empty
            dataloader, a loss with more than one element, or (per_sample) an item whose
            tensors disagree on their dim 0 size.
        TypeError: ``param_names`` is a bare string, or ``loss_fn`` returned a non-tensor.
        RuntimeError: called under ``torch.inference_mode()``, where no gradient can exist.

    A dataloader with fewer samples than ``nsamples`` is used whole, with a warning.
    """
    nsamples = _check_nsamples(nsamples)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "compute_sensitivity: called inside torch.inference_mode(), where gradients cannot "
            "be computed; call it outside inference_mode (torch.no_grad() is fine)"
        )
    requested = _resolve_param_names(model, param_names)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    # One accumulator per parameter object: tied aliases share it.
    targets = {id(by_name[n]): by_name[n] for n in requested}
    acc = {pid: torch.zeros_like(p, dtype=torch.float32) for pid, p in targets.items()}
    used: set[int] = set()

    def accumulate(p: Tensor) -> None:
        g = p.grad
        if g is not None:
            g = (g.to_dense() if g.is_sparse else g).float()
            acc[id(p)].addcmul_(g, g)
            used.add(id(p))
        p.grad = None

    state = _ModelState(model)
    hooks = []
    seen = 0
    bar = Progress(nsamples, "Fisher sensitivity", "sample", enabled=progress)
    try:
        state.prepare(targets)
        hooks = [p.register_post_accumulate_grad_hook(accumulate) for p in targets.values()]
        vectorized = None if _TRY_VMAP else False  # None: not probed yet
        items = iter(dataloader)
        with torch.enable_grad():
            while seen < nsamples:
                item = next(items, _END)
                if item is _END:
                    break
                if not per_sample:
                    _backward(loss_fn(model, item))
                    taken = 1
                else:
                    batch = _batch_size(item)
                    taken = min(batch, nsamples - seen)
                    if taken < batch:
                        item = _slice(item, 0, taken)
                    args = (model, loss_fn, item, taken)
                    if taken == 0:
                        pass
                    elif vectorized is None:
                        vectorized = _try_vectorized(*args, targets, acc, used)
                        if not vectorized:
                            _loop_samples(*args)
                    elif vectorized:
                        _accumulate_vectorized(*args, targets, acc, used)
                    else:
                        _loop_samples(*args)
                seen += taken
                bar.update(taken)
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        state.restore()

    if seen == 0:
        raise ValueError("compute_sensitivity: the dataloader yielded no samples")
    if seen < nsamples:
        unit = "samples" if per_sample else "items"
        warnings.warn(
            f"compute_sensitivity: the dataloader yielded only {seen} {unit}, fewer than "
            f"nsamples={nsamples}; using {seen}",
            stacklevel=2,
        )
    fisher: dict[str, Tensor] = {}
    missing: list[str] = []
    emitted: set[int] = set()
    for name in requested:
        pid = id(by_name[name])
        if pid not in used:
            missing.append(name)
            continue
        fisher[name] = acc[pid].clone() if pid in emitted else acc[pid]
        emitted.add(pid)
    return Sensitivity(fisher=fisher, nsamples=seen, missing=missing, per_sample=per_sample)


def normalize_sensitivity(f: Tensor) -> Tensor:
    """Turn a raw Fisher diagonal into k-means weights: float32, finite, in (0, 1].

    Rules: divide by the maximum (k-means is scale invariant, and raw Fisher values can be
    tiny enough for weighted sums of squares to underflow); zeros become the smallest positive
    value present (coremltools' rule: a weight the loss ignores still counts, a little); an
    all-zero (or empty) input becomes all ones (plain k-means). The input is not modified.

    Args:
        f: raw Fisher diagonal, any shape, any real dtype.

    Returns:
        A new float32 tensor of the same shape and device.

    Raises:
        ValueError: ``f`` has NaN/Inf values (the message gives how many) or negative values
            (a sum of squares cannot be negative).
    """
    x = f.detach()
    x = x.double() if x.dtype == torch.float64 else x.float()
    if x.numel() == 0:
        return torch.ones_like(x, dtype=torch.float32)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"normalize_sensitivity: {bad} of {x.numel()} Fisher values are NaN or Inf; "
            "recompute the sensitivity (a loss that overflows, or a corrupt file?)"
        )
    negative = int((x < 0).sum())
    if negative:
        raise ValueError(
            f"normalize_sensitivity: {negative} of {x.numel()} Fisher values are negative; "
            "expected a sum of squared gradients (>= 0)"
        )
    top = x.max()
    if top == 0:
        return torch.ones_like(x, dtype=torch.float32)
    y = (x / top).float()  # underflow to 0 in the cast is fixed just below
    positive = y > 0
    return torch.where(positive, y, y[positive].min())


# --------------------------------------------------------------------------------------------
# helpers


def _check_nsamples(nsamples: int) -> int:
    if isinstance(nsamples, bool):
        raise TypeError(f"compute_sensitivity: nsamples must be an int >= 1, got {nsamples!r}")
    try:
        n = operator.index(nsamples)
    except TypeError:
        raise TypeError(
            f"compute_sensitivity: nsamples must be an int >= 1, got {nsamples!r}"
        ) from None
    if n < 1:
        raise ValueError(f"compute_sensitivity: nsamples must be >= 1, got {n}")
    return n


def _resolve_param_names(model: nn.Module, param_names: Sequence[str] | None) -> list[str]:
    """Validated, de-duplicated requested names, in the caller's order."""
    if param_names is None:
        names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        if not names:
            raise ValueError("compute_sensitivity: the model has no floating-point parameters")
        return names
    if isinstance(param_names, str):
        raise TypeError(
            f"compute_sensitivity: param_names must be a sequence of names, got the string "
            f"{param_names!r}; write [{param_names!r}]"
        )
    names = list(dict.fromkeys(param_names))
    if not names:
        raise ValueError("compute_sensitivity: param_names is empty; pass None for all")
    known = dict(model.named_parameters(remove_duplicate=False))
    if unknown := [n for n in names if n not in known]:
        raise ValueError(
            f"compute_sensitivity: param_names has names that are not parameters of the "
            f"model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; expected names from "
            f"model.named_parameters(), e.g. {list(known)[:3]}"
        )
    if integral := [n for n in names if not known[n].is_floating_point()]:
        raise ValueError(
            f"compute_sensitivity: param_names has non-floating-point parameters {integral}; "
            "only floating-point parameters have gradients"
        )
    return names


class _ModelState:
    """What calibration may disturb, set aside before it and put back after it."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        copies: dict[int, Tensor] = {}
        self.buffers = []
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if id(buf) not in copies:
                    copies[id(buf)] = buf.detach().clone()
                self.buffers.append((module, name, buf, copies[id(buf)]))

    def prepare(self, targets: Mapping[int, Tensor]) -> None:
        # Only requested parameters need gradients: the others cost backward time and memory.
        for p, _, _ in self.params:
            p.grad = None
            p.requires_grad_(id(p) in targets)

    def restore(self) -> None:
        for p, requires_grad, grad in self.params:
            p.grad = None
            p.requires_grad_(requires_grad)
            p.grad = grad
        with torch.no_grad():
            for module, name, buf, copy in self.buffers:
                if getattr(module, name, None) is not buf:
                    setattr(module, name, buf)
                buf.copy_(copy)
        for module, training in self.modes:
            module.training = training


def _scalar_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"compute_sensitivity: loss_fn must return a Tensor, got {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"compute_sensitivity: loss_fn must return a single-element loss, got shape "
            f"{tuple(loss.shape)}; reduce it (e.g. .mean() or .sum())"
        )
    return loss.reshape(())


def _backward(loss: Any) -> None:
    loss = _scalar_loss(loss)
    # No requested parameter in the graph: every one of them is missing for this sample.
    if loss.requires_grad:
        loss.backward()


def _loop_samples(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], item: Any, batch: int
) -> None:
    """The always-correct per-sample path: one backward per micro-batch of one sample."""
    for i in range(batch):
        _backward(loss_fn(model, _slice(item, i, i + 1)))


def _tensor_leaves(item: Any) -> list[Tensor]:
    if isinstance(item, Tensor):
        return [item]
    if isinstance(item, Mapping):
        return [t for v in item.values() for t in _tensor_leaves(v)]
    if isinstance(item, (tuple, list)):
        return [t for v in item for t in _tensor_leaves(v)]
    return []


def _batch_size(item: Any) -> int:
    leaves = _tensor_leaves(item)
    if not leaves:
        raise ValueError(
            f"compute_sensitivity(per_sample=True): the item ({type(item).__name__}) holds no "
            "tensor to split into samples"
        )
    sizes = [tuple(t.shape[:1]) for t in leaves]
    if () in sizes or len(set(sizes)) != 1:
        raise ValueError(
            f"compute_sensitivity(per_sample=True): every tensor in an item must have the "
            f"same size along dim 0 (the sample dim), got shapes "
            f"{[tuple(t.shape) for t in leaves]}"
        )
    return sizes[0][0]


def _map(item: Any, fn: Callable[[Tensor], Any], other: Callable[[Any], Any]) -> Any:
    """Rebuild ``item`` with ``fn`` applied to tensor leaves and ``other`` to the rest."""
    if isinstance(item, Tensor):
        return fn(item)
    if isinstance(item, Mapping):
        mapped = {k: _map(v, fn, other) for k, v in item.items()}
        try:
            return type(item)(mapped)
        except Exception:
            return mapped
    if isinstance(item, tuple) and hasattr(item, "_fields"):  # namedtuple
        return type(item)(*(_map(v, fn, other) for v in item))
    if isinstance(item, (tuple, list)):
        return type(item)(_map(v, fn, other) for v in item)
    return other(item)


def _slice(item: Any, start: int, stop: int) -> Any:
    return _map(item, lambda t: t[start:stop], lambda x: x)


class _LossModule(nn.Module):
    """``loss_fn(model, item)`` as a module, so torch.func.functional_call can swap the
    model's parameters whatever ``loss_fn`` does with the model."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, item: Any) -> Tensor:
        return self.loss_fn(self.model, item)


def _reached(loss: Tensor, tensors: Mapping[str, Tensor]) -> set[str]:
    """Names of ``tensors`` that are leaves of ``loss``'s autograd graph.

    torch.func.grad returns zeros for an input the loss does not depend on, so this is how the
    vectorised path tells "no gradient" (missing) from "zero gradient"."""
    by_id = {id(t): name for name, t in tensors.items()}
    found: set[str] = set()
    stack = [loss.grad_fn]
    visited: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in by_id:
            found.add(by_id[id(var)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _try_vectorized(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    item: Any,
    batch: int,
    targets: Mapping[int, Tensor],
    acc: Mapping[int, Tensor],
    used: set[int],
) -> bool:
    """Probe the torch.func path on the first item; True if it ran (and accumulated it).

    On failure nothing was accumulated yet (this is the first item), so zeroing undoes any
    partial chunk; if the failure is the user's own error, the loop path raises it again."""
    try:
        _accumulate_vectorized(model, loss_fn, item, batch, targets, acc, used)
        return True
    except Exception as e:
        _log.debug(
            "compute_sensitivity: torch.func per-sample gradients failed (%s: %s); "
            "using a per-sample loop",
            type(e).__name__,
            e,
        )
        for t in acc.values():
            t.zero_()
        used.clear()
        return False


def _accumulate_vectorized(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    item: Any,
    batch: int,
    targets: Mapping[int, Tensor],
    acc: Mapping[int, Tensor],
    used: set[int],
) -> None:
    """Per-sample squared gradients of one item with torch.func, in chunks of samples so that
    the per-sample gradients alive at once stay under ``_VMAP_GRAD_ELEMENTS``."""
    from torch.func import functional_call, grad, vmap

    wrapper = _LossModule(model, loss_fn)
    canonical = {id(p): n for n, p in model.named_parameters()}
    params = {canonical[pid]: p.detach() for pid, p in targets.items()}
    pid_of = {canonical[pid]: pid for pid in targets}
    reached: set[str] = set()

    def sample_loss(p: dict[str, Tensor], sample: Any) -> Tensor:
        # vmap strips the sample dim; put back a batch of one, as the loop path sees it.
        sample = _map(sample, lambda t: t.unsqueeze(0), lambda x: x)
        loss = _scalar_loss(
            functional_call(wrapper, {"model." + k: v for k, v in p.items()}, (sample,))
        )
        reached.update(_reached(loss, p))
        return loss

    in_dims = _map(item, lambda t: 0, lambda x: None)
    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, in_dims), randomness="different")
    numel = sum(p.numel() for p in targets.values())
    chunk = max(1, min(batch, _VMAP_GRAD_ELEMENTS // max(numel, 1)))
    for start in range(0, batch, chunk):
        grads = per_sample_grads(params, _slice(item, start, start + chunk))
        with torch.no_grad():
            for name, g in grads.items():
                acc[pid_of[name]].add_(g.float().square().sum(0))
    used.update(pid_of[name] for name in reached)
