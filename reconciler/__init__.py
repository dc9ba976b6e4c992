"""ukc: declarative Unikraft Cloud sandbox sessions (spec → observe → plan → act → status)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
