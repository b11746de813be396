"""Which meta-architecture a recipe trains, built and initialised before the DeepSpeed engine exists.

:func:`build_meta_arch` is what :class:`dvtrain.train.trainer.Trainer` calls: self-supervised
pretraining (:class:`dvtrain.train.meta_arch.SSLMetaArch`) or distillation from a frozen teacher
(:mod:`dvtrain.train.distill`, when ``distill.teacher`` is set), then ``model.init_from`` weights
(:mod:`dvtrain.models.init_from`) unless the run resumes its own checkpoint.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["build_meta_arch"]


def build_meta_arch(recipe: Any, apply_init: bool) -> nn.Module:
    """Build the run's meta-architecture (same weights on every rank when the RNG is seeded alike).

    Args:
        recipe: validated :class:`dvtrain.recipe.Recipe`.
        apply_init: load ``model.init_from`` into student and teacher. False when resuming: the
            checkpoint provides every weight and the init path may be gone.

    Returns:
        ``SSLMetaArch``, ``DistillMetaArch`` or ``FeatureDistillMetaArch``.

    Raises:
        ValueError: unreadable ``model.init_from`` / ``distill.teacher``, architecture mismatches.
    """
    from dvtrain.train.meta_arch import meta_arch_config_from_recipe  # noqa: PLC0415

    if recipe.distill.teacher:
        from dvtrain.train.distill import build_distill_meta_arch  # noqa: PLC0415

        model = build_distill_meta_arch(recipe)
    else:
        from dvtrain.train.meta_arch import SSLMetaArch  # noqa: PLC0415

        model = SSLMetaArch(meta_arch_config_from_recipe(recipe))
    if apply_init and recipe.model.init_from:
        from dvtrain.models.init_from import apply_init_from  # noqa: PLC0415

        apply_init_from(model, recipe)
    return model
