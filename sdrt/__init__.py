"""sdrt: a Stable Diffusion inference runtime and compiler. Importing it has no side effects."""

__version__ = "0.1.0"
