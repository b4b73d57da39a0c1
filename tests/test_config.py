import pytest

from toca_fx import ToCaConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("ratio", 0.0),
        ("ratio", 1.5),
        ("ratio", -0.1),
        ("ratio", "half"),
        ("interval", 0),
        ("interval", 2.5),
        ("interval", True),
        ("num_steps", 0),
        ("self_attn", "skip"),
        ("inner", "aot_eager"),
        ("parallel_compile", "auto"),
        ("parallel_compile", 1),
    ],
)
def test_bad_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ToCaConfig\.{field} must be"):
        ToCaConfig(**{field: value})


def test_config_is_frozen_and_accepts_edges():
    config = ToCaConfig(ratio=1.0, interval=1, num_steps=1)
    with pytest.raises(AttributeError):
        config.ratio = 0.5  # type: ignore[misc]
