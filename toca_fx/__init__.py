"""toca_fx: token-wise feature caching for any diffusion transformer, as a torch.compile backend.

    fast = torch.compile(model, backend=toca_fx.toca_backend)
"""
from .backend import ToCaBackend, ToCaWarning
from .config import ToCaConfig
from .explain import Report, explain
from .pipeline import enable

toca_backend = ToCaBackend()

__all__ = ["Report", "ToCaBackend", "ToCaConfig", "ToCaWarning", "enable", "explain", "toca_backend"]
