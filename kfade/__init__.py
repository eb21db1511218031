"""K-FADE: Gauss-Newton unlearning for LLMs (K-FAC for Distribution Erasure)."""

__version__ = "0.1.0"
