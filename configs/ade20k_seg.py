r"""Semantic segmentation transfer: ColorMAE's ADE20K UperNet recipe (docs/segmentation.md).

  python -m colormae_jax.main --config configs/ade20k_seg.py --config.init_from=/tmp/mae \
      --config.data.root=/data/ADEChallengeData2016 --workdir /tmp/seg
  python -m colormae_jax.main --config configs/ade20k_seg.py:smoke --config.init_from=/tmp/mae \
      --config.data.root=/tmp/seg_folder --workdir /tmp/seg_smoke

Any folder laid out as ``images/<split>/*.jpg`` + ``annotations/<split>/*.png`` works: set
``data.split``, ``data.eval_split``, ``data.num_classes`` and ``data.reduce_zero_label``.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from colormae_jax import defaults
from colormae_jax.config_lib import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, root='', init_from='')
    c = ml_collections.ConfigDict()
    c.task = 'segment'
    c.init_from = a.init_from
    c.seed = 0
    d = defaults.data_config()
    c.data = ml_collections.ConfigDict(dict(
        source='seg_folder', root=a.root, data_dir=d.data_dir, split='training', eval_split='validation',
        num_classes=150,
        reduce_zero_label=True,     # ADE20K: 0 = other -> ignore (255), 1..150 -> 0..149
        hflip=True, mean=d.mean, std=d.std, normalize_on='device', num_workers=0, prefetch_buffer=2))
    c.model = ml_collections.ConfigDict(dict(compute_dtype='float32', attn_impl='auto', remat=False))
    c.seg = ml_collections.ConfigDict(dict(
        crop_size=512,
        scale=(2048, 512),          # RandomResize / Resize bound (long, short), keep ratio
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        photometric=True,
        stride=341,                 # slide inference, window crop_size
        out_indices=(3, 5, 7, 11),
        rescales=(4.0, 2.0, 1.0, 0.5),
        channels=768, pool_scales=(1, 2, 3, 6), aux_channels=256, aux_in_index=2, aux_weight=0.4,
        dropout=0.1, drop_path=0.1,
        layer_scale=1.0,            # mmseg MAE backbone: BEiT layer scale, init_values=1.0 (0: none)
        rel_pos_bias=True,          # mmseg MAE backbone: zero-init relative position bias per block
        avg_non_ignore=False,       # mmseg CrossEntropyLoss default: mean over all pixels
        pos_embed='interpolate',    # MAE/mmseg bicubic resize of the pre-trained table; 'recompute': sin-cos anew
        layer_decay=0.65,
        decay_tokens=True,          # mmseg's constructor decays pos_embed and cls_token (docs/segmentation.md)
        warmup_start_factor=1e-6,   # LinearLR start_factor: lr starts at base_lr * 1e-6
        poly_power=1.0,
        eval_windows=4,             # windows per forward at evaluation
        eval_max=0,                 # evaluate on the first N eval images (0: all)
        pictures=4,                 # label-map pictures per evaluation
    ))
    c.batch_size = 16
    c.total_steps, c.total_epochs = 160000, placeholder(float)
    c.warmup_steps, c.warmup_epochs = 1500, placeholder(float)
    c.base_lr, c.min_lr, c.wd = 1e-4, 0.0, 0.05
    c.b1, c.b2 = 0.9, 0.999
    c.grad_clip_norm = 0.0
    c.eval_every_steps = 16000
    c.mesh = (('data', -1), ('fsdp', 1))
    c.log_every_steps = 50
    c.ckpt = ml_collections.ConfigDict(dict(every_steps=16000, keep=3, async_save=True))
    c.nan_check = True
    if a.smoke:  # a tiny folder of small images, seconds on a CPU
        c.data.split, c.data.eval_split = 'train', 'val'
        c.data.num_classes, c.data.reduce_zero_label = 4, False
        c.seg.update(crop_size=32, scale=(64, 32), stride=21, channels=32, aux_channels=16, eval_windows=4,
                     pictures=2, eval_max=50,  # evaluate on the first 50 images at most
                     out_indices=(0, 0, 0, 0))  # configs/cifar10.py:smoke pre-trains a one-block mu/4 encoder
        c.batch_size = 8
        c.total_steps, c.warmup_steps = 20, 2
        c.base_lr = 1e-3
        c.eval_every_steps = 10
        c.log_every_steps = 5
        c.ckpt.every_steps = 10
    return c
