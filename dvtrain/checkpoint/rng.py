"""RNG state of one process as a stateful checkpoint part (python, numpy, torch CPU and CUDA).

Stored with plain types and tensors only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState"]


class RNGState:
    """``state_dict()`` captures this process's RNG states; ``load_state_dict()`` restores them.

    Keys: ``python`` (``random.getstate()``), ``numpy`` (MT19937 key as an int64 tensor plus position
    and gauss cache), ``torch`` (uint8 tensor), ``cuda`` (list of uint8 tensors, one per visible
    device, or None). CUDA states are restored only where CUDA is present.
    """

    def state_dict(self) -> dict[str, Any]:
        """The current states (see the class docstring)."""
        name, key, pos, has_gauss, gauss = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: ``state`` lacks one of the keys python, numpy, torch.
        """
        missing = [k for k in ("python", "numpy", "torch") if k not in state]
        if missing:
            raise ValueError(f"RNG state lacks {missing}; it was not written by RNGState.state_dict()")
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
