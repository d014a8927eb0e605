"""colormae_jax: Masked Autoencoder pre-training with better masks, in JAX/Flax."""
__version__ = '0.1.0'
