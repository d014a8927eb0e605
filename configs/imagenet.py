r"""MAE pre-training on ImageNet-1k with the paper recipe (ViT-B/16, decoder 8x512,
batch 4096, 800 epochs, 40 warm-up, base lr 1.5e-4, AdamW (0.9, 0.95), wd 0.05).

  python -m colormae_jax.main --config configs/imagenet.py:mask=random --workdir gs://BUCKET/mae_b16
"""
from colormae_jax import defaults
from colormae_jax.config_lib import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, mask='random', variant='B/16', smoke=False, data_dir='')
    c = defaults.base_config()
    c.data.source = 'tfds'
    c.data.name = 'imagenet2012'
    c.data.data_dir = a.data_dir
    c.data.image_size = 224
    c.data.num_workers = 16
    c.model.variant = a.variant
    c.data.eval_split = 'validation'
    c.model.compute_dtype = 'bfloat16'
    c.ckpt.every_steps = 2000
    if a.smoke:
        c.data.image_size = 64
        c.data.num_workers = 0
        c.model.variant = 'mu/16'
        c.model.decoder.update(width=32, depth=1, heads=2)
        c.batch_size = 8
        c.total_steps = 4
        c.warmup_steps = 1
        c.log_every_steps = 1
        c.ckpt.every_steps = 2
        c.mask.famt.update(warmup_steps=2, update_every_steps=2)
        c.knn.update(max_train=2000, max_test=500)  # if the monitor is turned on (knn.every_epochs)
    defaults.set_mask(c, a.mask)  # last: mask=famt starts FAMT at the first weight update
    return c
