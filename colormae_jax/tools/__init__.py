"""Command-line tools: ``python -m colormae_jax.tools.<name>``."""
