"""Reference DiTs written here: used by the tests, the examples and the benchmarks, at any size."""
from .dit import DiT
from .pixart import PixArt

__all__ = ["DiT", "PixArt"]
