r"""Pre-train an MAE from a config file.

  python -m colormae_jax.main --config configs/cifar10.py:smoke --workdir /tmp/mae_smoke
  python -m colormae_jax.main --config configs/cifar10.py:mask=random --config.batch_size=512 --workdir /tmp/mae
"""
from absl import app, flags, logging
from ml_collections import config_flags

from colormae_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/cifar10.py:smoke',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs; an existing one is resumed.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.INFO)
    # orbax and grain report every file at INFO; keep their warnings (level >= 30), drop the chatter.
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= 30 or ('/orbax/' not in r.pathname and '/grain/' not in r.pathname))
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
