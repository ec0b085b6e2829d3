"""Whether the current call is being recorded as a graph rather than run eagerly."""
import torch

__all__ = ["tracing_or_compiling", "shape_ints"]


def tracing_or_compiling() -> bool:
    """True under ``torch.jit.trace`` / ``torch.jit.script`` (e.g. fvcore FLOP counting, export) and
    ``torch.compile``: the fast paths that leave PyTorch (numpy RNG, oneDNN ops chosen by host-side
    checks, host syncs) must then step aside for the plain ops."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def shape_ints(shape) -> tuple:
    """``tuple(int(v) for v in shape)``, except under ``torch.jit.trace`` (ONNX export), where the
    sizes stay graph values so that a traced model keeps dynamic input sizes."""
    if torch.jit.is_tracing():
        return tuple(shape)
    return tuple(int(v) for v in shape)
