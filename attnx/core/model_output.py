"""Where the logits are in a model's output: a tensor, a ``.logits`` attribute (transformers), a
``"logits"`` entry, the first element of a tuple. Adapters and metrics read outputs with this."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import AttnxTypeError

__all__ = ["logits_of"]


def logits_of(output: Any, embeddings: bool = True) -> torch.Tensor:
    """The logits tensor of a model output: the tensor itself, ``.logits`` or a ``"logits"`` entry,
    the first element of a tuple; with ``embeddings``, for a backbone without logits its
    ``pooler_output`` (an embedding).

    Raises
    ------
    AttnxTypeError
        When the output holds none of them.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    for name in ("logits", "pooler_output") if embeddings else ("logits",):
        if isinstance(getattr(output, name, None), torch.Tensor):
            return getattr(output, name)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    keys = f" with keys {sorted(map(str, output))}" if isinstance(output, Mapping) else ""
    raise AttnxTypeError(
        f"cannot find the logits in a model output of type {type(output).__name__}{keys}; expected a tensor, "
        "a .logits attribute, a 'logits' entry or a tuple whose first element is the logits"
    )
