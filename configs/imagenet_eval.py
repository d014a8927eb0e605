r"""Evaluations on ImageNet-1k (TFDS imagenet2012 as array_record), the MAE recipes.

  # fine-tune (ViT-B: 100 epochs, batch 1024, blr 5e-4, layer decay 0.65, drop path 0.1):
  python -m colormae_jax.main --config configs/imagenet_eval.py:task=finetune \
      --config.init_from=/tmp/mae_b16_official --config.data.data_dir=/data/tfds --workdir /tmp/ft_b16
  # linear probe (90 epochs, batch 16384, blr 0.1, LARS):
  python -m colormae_jax.main --config configs/imagenet_eval.py:task=linear_probe --config.init_from=/tmp/mae_b16 \
      --config.probe.mode=faithful --workdir /tmp/lin_b16
"""
from colormae_jax import defaults
from colormae_jax.config_lib import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, task='finetune', data_dir='', init_from='')
    c = defaults.eval_config(a.task)  # the MAE recipe defaults
    c.init_from = a.init_from
    c.data.source, c.data.name, c.data.data_dir = 'tfds', 'imagenet2012', a.data_dir
    c.data.eval_split = 'validation'
    c.data.image_size = 224
    c.data.num_workers = 16
    c.num_classes = 1000
    c.finetune.layer_decay = 0.65
    c.eval_every_epochs = 5.0
    return c
