"""The Python API, for notebooks: :mod:`colormae_jax.api.mae` (load a pre-trained MAE, encode,
reconstruct, draw masks) and :mod:`colormae_jax.api.segmentation` (a segmentation run's predictions
and pictures). docs/api.md."""
