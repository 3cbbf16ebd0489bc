"""jaxrl_geom: geometry-aware GRPO for language models (SALT and LongAct as optax transforms)."""

__version__ = "0.1.0"
