"""The paper's configurations (SPEC section 7): final dimension D -> (d, k) and the 4224-D comparison.

Each preset is a dict of ``EncoderConfig`` fields; ``selret.encoding.encoder.EncoderConfig.from_preset(name)``
turns it into a config, and any field can be overridden.
"""

from __future__ import annotations

# T-emb + democratic aggregation, D = d * k - 128 (paper Table 4).
TEMB_DEMOCRATIC: dict[int, tuple[int, int]] = {
    512: (32, 20),
    1024: (64, 18),
    2048: (64, 34),
    4096: (64, 66),
    8064: (128, 64),
}

# Framework comparison at 4224-D (paper Table 2 / Table 3): embedding -> (d, k, aggregation).
COMPARISON_4224: dict[str, tuple[int, int]] = {
    "fv": (48, 44),
    "vlad": (64, 66),
    "temb": (64, 68),
    "faemb": (32, 10),
}


def _presets() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for dim, (d, k) in TEMB_DEMOCRATIC.items():
        out[f"temb-demo-{dim}"] = {"embedding": "temb", "aggregation": "democratic", "d": d, "k": k}
    for emb, (d, k) in COMPARISON_4224.items():
        out[f"{emb}-4224"] = {"embedding": emb, "aggregation": "democratic", "d": d, "k": k}
    return out


PRESETS: dict[str, dict] = _presets()
DEFAULT_PRESET = "temb-demo-512"


def preset(name: str) -> dict:
    """The config fields of preset ``name`` (e.g. 'temb-demo-4096', 'fv-4224'); a copy."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
