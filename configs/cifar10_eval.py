r"""Evaluations on CIFAR-10 of a pre-trained encoder: kNN, linear probe, fine-tuning.

  python -m colormae_jax.main --config configs/cifar10_eval.py:task=knn --config.init_from=/tmp/mae --workdir /tmp/knn
  python -m colormae_jax.main --config configs/cifar10_eval.py:task=linear_probe --config.init_from=/tmp/mae \
      --workdir /tmp/linear
  python -m colormae_jax.main --config configs/cifar10_eval.py:task=finetune --config.init_from=/tmp/mae \
      --workdir /tmp/finetune
"""
from colormae_jax import defaults
from colormae_jax.config_lib import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, task='linear_probe', smoke=False, root='../shared/data/cifar10', init_from='')
    c = defaults.eval_config(a.task)
    c.init_from = a.init_from
    c.data.root = a.root
    c.data.image_size = 32
    c.data.eval_split = 'test'
    c.num_classes = 10
    c.batch_size = 256 if a.task == 'finetune' else 1024
    c.total_epochs = 100.0 if a.task == 'linear_probe' else 50.0
    c.warmup_epochs = 10.0 if a.task == 'linear_probe' else 5.0
    c.base_lr = 0.1 if a.task == 'linear_probe' else 1e-3
    c.finetune.layer_decay = 0.75  # Ti/S depth 12; MAE uses 0.65 for B, 0.75 for L
    c.eval_every_epochs = 10.0
    c.ckpt.every_steps = 500
    if a.smoke:  # seconds on a CPU: tests and the study's smoke preset
        c.batch_size = 64
        c.total_steps, c.warmup_steps = 20, 2
        c.eval_every_epochs = 0.5
        c.log_every_steps = 10
        c.ckpt.every_steps = 10
        c.knn.update(max_train=2000, max_test=500)  # evaluation sizes: each evaluation takes seconds
        c.probe.update(max_train=2000, max_test=500)
        c.finetune.max_test = 500
    return c
