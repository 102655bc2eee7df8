"""Scale-out on PyTorch's own distributed engine, launched with ``torchrun``: who am I, the work I own.

``torchrun --nproc-per-node N -m headstart features|train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`session` joins them
into one process group (NCCL on CUDA, gloo on CPU) and leaves it at the end. Without those variables
(or with ``WORLD_SIZE=1``) nothing is started and every helper answers as a single process would.

The work is shared by *content*: :func:`my_share` hashes the files (each rank a part), gathers the
hashes and gives each rank the images whose content falls to it (distinct contents sorted by hash,
dealt round-robin), so the split is balanced to one image, does not depend on the order of the files,
and every copy of one content goes to the same rank. Ranks write into one shared feature cache, whose
claims and atomic shards already make several writers safe; a restarted rank finds its rows cached.

Objects are exchanged as JSON in byte tensors (no pickle). Only rank 0 prints (:func:`is_main`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import UsageError

_BN_GROUP: Any = None  # the batch-norm statistics' own process group (apart from DDP's gradient reduction)
_SESSIONS = 0  # process groups this process has joined (every rank joins the same sequence of them)
TIMEOUT_ENV = "HEADSTART_DIST_TIMEOUT_MINUTES"  # how long a rank waits for the others at a collective
DEFAULT_TIMEOUT_MINUTES = 60.0


def requested() -> bool:
    """Whether this process was launched as one of several (``$WORLD_SIZE`` > 1, e.g. by ``torchrun``)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes share the work (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that prints, writes checkpoints and runs."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (``$LOCAL_RANK``; 0 without one): its GPU."""
    return _env_int("LOCAL_RANK", 0)


def backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """Join the ``torchrun`` process group for the ``with`` block (yields whether one was joined).

    Nothing happens without ``torchrun``'s variables; a group already running is left as it is.
    """
    if not requested() or active():
        yield active()
        return
    _check_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    timeout = timedelta(minutes=_timeout_minutes())
    store, me, n = next(dist.rendezvous("env://", timeout=timeout))
    # an elastic restart reuses the agent's store, and so does a second session in one process (a script
    # calling extract, then train): the attempt and the session number keep earlier groups' addresses out
    global _SESSIONS
    _SESSIONS += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"headstart/attempt{attempt}/session{_SESSIONS}", store)
    dist.init_process_group(backend(), store=store, rank=me, world_size=n, timeout=timeout)
    global _BN_GROUP
    _BN_GROUP = dist.new_group()
    try:
        yield True
    finally:
        _BN_GROUP = None
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if active():
        dist.barrier()


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's ``value`` (anything JSON can hold), in rank order; ``[value]`` without a process group."""
    if not active():
        return [value]
    on = device() if backend() == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8).to(on)
    sizes = [torch.zeros(1, dtype=torch.int64, device=on) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=on))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=on)
    padded[:data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8, device=on) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[:int(s.item())].cpu().numpy()).decode("utf-8")) for p, s in zip(parts, sizes)]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sum over ranks of each of ``values`` (float64); the values themselves without a process group."""
    if not active():
        return [float(v) for v in values]
    on = device() if backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def deal_by_hash(keys: Sequence[str | None], n_ranks: int) -> list[int]:
    """The rank of each item: distinct keys sorted and dealt round-robin (balanced to one key, whatever the
    order of ``keys``); items with equal keys share a rank; an item without a key (unreadable) goes to 0."""
    order = {key: i for i, key in enumerate(sorted({k for k in keys if k is not None}))}
    return [0 if k is None else order[k] % n_ranks for k in keys]


def my_share(cache: Any, paths: Sequence[Any]) -> list[int]:
    """The indices of ``paths`` this rank computes: by content hash (:func:`deal_by_hash`); all without a group.

    Each rank hashes every ``world_size``-th file (remembered in the shared cache's hash memo), then
    the hashes are gathered, so no file is hashed twice.
    """
    if not active():
        return list(range(len(paths)))
    n, me = world_size(), rank()
    mine = list(range(me, len(paths), n))
    keys, _ = cache.image_keys([paths[i] for i in mine])
    gathered = all_gather_json(keys)
    every: list[str | None] = [None] * len(paths)
    for r, part in enumerate(gathered):
        for i, key in zip(range(r, len(paths), n), part):
            every[i] = key
    return [i for i, r in enumerate(deal_by_hash(every, n)) if r == me]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"${name} is {value!r}; expected a whole number (torchrun sets it), or unset it") from None


def _check_env() -> None:
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(f"$WORLD_SIZE is {os.environ['WORLD_SIZE']} but ${', $'.join(missing)} not set; launch "
                         "with torchrun (e.g. 'torchrun --nproc-per-node 2 -m headstart ...'), or unset WORLD_SIZE")


def _timeout_minutes() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise UsageError(f"${TIMEOUT_ENV} is {value!r}; expected minutes > 0 (default {DEFAULT_TIMEOUT_MINUTES:g})")
    return minutes


@contextlib.contextmanager
def global_batch_norm() -> Iterator[None]:
    """Batch norm in training mode normalises by the statistics of the *global* batch (every rank's part)
    inside the block, so a step equals one process's on the whole batch; running statistics too.

    ``torch.nn.SyncBatchNorm`` does this on GPUs only; this works on any device by standing in for
    ``torch.nn.functional.batch_norm``, which ``nn.BatchNorm2d`` and timm's ``BatchNormAct2d`` call.
    Without a process group nothing changes.
    """
    import torch.nn.functional as F

    if not active():
        yield
        return
    original = F.batch_norm

    def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
        if not training:
            return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return _global_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps)

    F.batch_norm = batch_norm
    try:
        yield
    finally:
        F.batch_norm = original


def _global_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float,
                       eps: float) -> torch.Tensor:
    """Two passes over the global batch (mean, then the centred squares), each one differentiable all-reduce."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    count = torch.tensor([x.numel() // max(1, x.shape[1])], dtype=torch.float64, device=x.device)
    sums = _all_reduce(torch.cat([xf.sum(dims, dtype=torch.float64), count]))  # float64 sums: no rounding drift
    total = sums[-1]
    mean = (sums[:-1] / total).float()
    centred = xf - mean.view(shape)
    var = (_all_reduce((centred * centred).sum(dims, dtype=torch.float64)) / total).float()
    out = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            unbiased = var.detach() * float(total / torch.clamp(total - 1, min=1))
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    return out.to(x.dtype)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, differentiable (its gradient is the sum of the ranks' gradients)."""
    return _SumOverRanks.apply(tensor)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with a backward: each rank's loss depends on the sum, so the gradient of every
    rank's input is the sum of the ranks' output gradients. Written here because
    ``torch.distributed.nn.functional.all_reduce`` is deprecated and the functional collectives that
    replace it have no autograd on gloo. Runs on the batch-norm group, apart from DDP's reductions."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=_BN_GROUP)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=_BN_GROUP)
        return grad
