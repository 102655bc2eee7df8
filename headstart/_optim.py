"""``torch.optim`` for small problems without the 2-3 s import of ``torch._dynamo`` (see the function)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def optim_without_dynamo() -> Iterator[None]:
    """``torch.optim`` without importing ``torch._dynamo`` (2-3 s, most of a warm ``headstart train``).

    ``torch._disable_dynamo`` wraps ``Optimizer.add_param_group``, ``zero_grad`` and ``state_dict`` and imports
    ``torch._dynamo`` on their first call only to keep them out of compiled graphs; while it is not imported
    nothing is compiled, so the wrapper may call the plain method, found in its ``__dynamo_disable`` cache."""
    names = () if "torch._dynamo" in sys.modules else ("add_param_group", "zero_grad", "state_dict")
    plain = [getattr(getattr(torch.optim.Optimizer, n, None), "__wrapped__", None) for n in names]
    plain = [fn for fn in plain if fn is not None and getattr(fn, "__dynamo_disable", None) is None]
    for fn in plain:
        setattr(fn, "__dynamo_disable", fn)
    try:
        yield
    finally:
        for fn in (fn for fn in plain if getattr(fn, "__dynamo_disable", None) is fn):
            delattr(fn, "__dynamo_disable")
