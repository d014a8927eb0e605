"""Peak working memory of the pre-training step with gradient accumulation.

XLA's ``compile().memory_analysis()`` of ``pretrain.compile_step`` for ViT-Ti/4 on 32x32, decoder
4x128, batch 256 (the optimizer batch), random masking, one device, for each ``grad_accum_steps`` k:

  python benchmarks/accum_memory.py 1 2 4 8     # from the repository root
"""
import sys

import jax

from colormae_jax import config_lib, masking, parallel
from colormae_jax.tasks import pretrain


def main(ks):
    for k in ks:
        c = config_lib.load_config_file('configs/cifar10.py:variant=Ti/4')
        c.batch_size, c.grad_accum_steps = 256, k
        mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
        t = pretrain.make_trainer(c, mesh, steps_per_epoch=100)
        strategy = masking.create(c.mask, t.mae.grid)
        bs = parallel.batch_sharding(mesh)
        batch = {'image': jax.ShapeDtypeStruct((256, 32, 32, 3), 'uint8', sharding=bs),
                 'index': jax.ShapeDtypeStruct((256,), 'int32', sharding=bs),
                 'label': jax.ShapeDtypeStruct((256,), 'int32', sharding=bs)}
        m = pretrain.compile_step(t, strategy, ()).lower(t.abstract_state, batch, ()).compile().memory_analysis()
        print(f'k={k} micro-batch {256 // k}: temp {m.temp_size_in_bytes / 2**20:.1f} MiB, arguments '
              f'{m.argument_size_in_bytes / 2**20:.1f} MiB, outputs {m.output_size_in_bytes / 2**20:.1f} MiB, '
              f'aliased {m.alias_size_in_bytes / 2**20:.1f} MiB', flush=True)


if __name__ == '__main__':
    main([int(a) for a in sys.argv[1:]] or [1, 2, 4, 8])
