"""The optional dependencies: the kernels need torch and numpy only; images, progress bars and plots
(the demos, `cocos_kernels.visualize`, CoCosNet's data and training, benchmark reports) come with
the `demo` extra."""
from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'cocos-kernels[demo]'"


def require(purpose: str, *modules: str) -> None:
    """Raise ModuleNotFoundError naming `purpose`, the missing modules and the extra that brings them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(f"{purpose} needs {', '.join(missing)}, which the core install does not "
                                  f"include: {INSTALL_HINT}")
