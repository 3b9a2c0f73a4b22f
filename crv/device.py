"""Which torch device a run uses, and how much of it one vocabulary-wide tensor may take:
one rule for the pipeline and crv-verify."""

from __future__ import annotations

LOGITS_BUDGET_BYTES = 256 * 2**20
"""Most fp32 vocabulary-wide values (rows x vocabulary x 4 bytes) one forward or projection
may hold at once. With Qwen's 152k-token vocabulary a few rows fill it, so work over logits
goes in chunks sized by it, and memory does not grow with the batch or the model's width."""


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when CUDA is available, else "cpu"; anything else is kept."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE_NAMES = ("auto", "cpu", "cuda")
"""The device strings crv accepts, besides `cuda:N`."""


def check_device_name(device: str, where: str) -> None:
    """ValueError naming `where` when `device` is no device string crv knows (`gpu`); the
    machine is not asked (`require_device` does that, once a run is about to start)."""
    from crv.options import did_you_mean

    head, colon, index = device.partition(":")
    if device in DEVICE_NAMES or (head == "cuda" and colon and index.isdigit()):
        return
    raise ValueError(
        f"{where}={device!r} is not a device{did_you_mean(device, DEVICE_NAMES)}; "
        "use auto, cpu, cuda or cuda:N"
    )


def require_device(device: str, where: str = "device") -> str:
    """`device` resolved ("auto" -> cuda or cpu), after checking that CUDA exists when it
    names CUDA; ConfigError naming `where` otherwise."""
    from crv.errors import ConfigError

    try:
        check_device_name(device, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{where}={device}: CUDA is not available on this machine")
        index = int(resolved.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{where}={device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return resolved
