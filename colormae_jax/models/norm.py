"""BatchNorm with torch's running statistics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class TorchBatchNorm(nnx.BatchNorm):
    """flax's BatchNorm (SyncBN under a sharded jit: statistics of the global batch) whose running
    variance takes the unbiased batch variance (x n/(n-1), n = elements per channel), as torch's
    BatchNorm / SyncBN; flax 0.12 moves the biased one and has no option for it. The normalisation
    and the running mean are flax's."""

    def __call__(self, x, use_running_average: bool | None = None):
        if use_running_average if use_running_average is not None else self.use_running_average:
            return super().__call__(x, use_running_average=True)
        old = self.var[...]
        y = super().__call__(x, use_running_average=False)  # normalises, moves the mean (and the biased variance)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        biased = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes) - jnp.square(jnp.mean(xf, axes)))  # flax's formula
        n = int(np.prod(x.shape[:-1]))
        m = self.momentum
        self.var[...] = jax.lax.stop_gradient(m * old + (1 - m) * biased * (n / max(n - 1, 1)))
        return y
