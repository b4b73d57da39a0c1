"""toca_fx: token-wise feature caching for any diffusion transformer, as a torch.compile backend.

    fast = torch.compile(model, backend=toca_fx.toca_backend)
"""
from .backend import ToCaBackend
from .errors import ToCaWarning
from .config import ToCaConfig
from .explain import Report, explain
from .pipeline import disable, enable
from .policies.fora import FORAPolicy
from .policies.learned import Router
from .policies.taylorseer import TaylorSeerPolicy

toca_backend = ToCaBackend()

__all__ = [
    "FORAPolicy", "Report", "Router", "TaylorSeerPolicy", "ToCaBackend", "ToCaConfig", "ToCaWarning", "disable",
    "enable", "explain", "toca_backend",
]
