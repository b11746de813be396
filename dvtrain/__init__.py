"""dvtrain: DINOv2 self-supervised pretraining with DeepSpeed ZeRO-3 (see README.md)."""


def installed_version() -> str:
    """The installed ``dvtrain`` distribution's version, or ``"unknown"`` outside an install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dvtrain")
    except PackageNotFoundError:
        return "unknown"
