r"""MAE pre-training on CIFAR-10 (a JPEG folder or the TFDS dataset).

  python -m colormae_jax.main --config configs/cifar10.py:mask=random,variant=Ti/4 --workdir /tmp/mae
  python -m colormae_jax.main --config configs/cifar10.py:smoke --workdir /tmp/mae_smoke
"""
from colormae_jax import defaults
from colormae_jax.config_lib import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, mask='random', variant='Ti/4', smoke=False, root='../shared/data/cifar10')
    c = defaults.base_config()
    c.data.root = a.root
    c.data.image_size = 32
    c.model.variant = a.variant
    c.model.decoder.update(width=128, depth=4, heads=4)
    c.batch_size = 256
    c.total_epochs = 200.0
    c.warmup_epochs = 10.0
    c.image_summary_every_epochs = 10.0
    c.num_classes = 10
    c.data.eval_split = 'test'
    c.knn.every_epochs = 10.0
    c.ckpt.every_steps = 1000
    if a.smoke:  # a few steps of a tiny model: tests and the quick start
        c.model.variant = 'mu/4' if a.variant == 'Ti/4' else a.variant
        c.model.decoder.update(width=32, depth=1, heads=2)
        c.batch_size = 32
        c.base_lr = 1e-2  # lr 1.25e-3: the loss visibly falls within 20 steps
        c.total_steps = 20
        c.warmup_steps = 2
        c.log_every_steps = 5
        c.image_summary_every_epochs = 0.01
        c.image_summary_count = 4
        c.ckpt.every_steps = 10
        c.mask.famt.update(warmup_steps=10, update_every_steps=10)  # FAMT: one weight update, before step 11
        c.mask.famt.update_batch_size = 256
        c.knn.update(max_train=2000, max_test=500)  # the monitor runs once, at the end
    defaults.set_mask(c, a.mask)  # last: mask=famt starts FAMT at the first weight update
    return c
