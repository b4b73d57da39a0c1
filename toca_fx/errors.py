"""What toca_fx warns about and raises."""


class ToCaWarning(UserWarning):
    """A graph, a branch or a call is computed without caching, or not as configured; the message says why."""

