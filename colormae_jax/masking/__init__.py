"""Masking: one interface (:mod:`.core`) and the strategies that plug into it.

Importing this package registers every strategy: ``random`` (:mod:`.core`), the ColorMAE
colours ``red``, ``blue``, ``green``, ``purple`` (:mod:`.colour`) and ``famt`` (:mod:`.famt`).
"""
from colormae_jax.masking.core import (Counts, MaskConfigError, Partition, RandomMasking, Strategy, counts, create,
                                       masked_map, names, parse_schedule, partition, register)
from colormae_jax.masking import colour, famt  # noqa: F401  (registers the colours and famt)

__all__ = ['Counts', 'MaskConfigError', 'Partition', 'parse_schedule', 'RandomMasking', 'Strategy', 'counts', 'create', 'masked_map', 'names',
           'partition', 'register', 'colour', 'famt']
