"""The defaults every config starts from: configs/*.py import this module and change what differs."""
import ml_collections
from ml_collections.config_dict import placeholder


def data_config() -> ml_collections.ConfigDict:
    """``config.data``: the dataset and the input pipeline."""
    return ml_collections.ConfigDict(dict(
        source='folder',            # 'folder': <root>/<split>/<class>/*.jpg; 'tfds': a prepared array_record dataset
        root='',                    # for 'folder'
        name='',                    # for 'tfds', e.g. 'imagenet2012'
        data_dir='',                # where array_record files live ('' -> ~/tensorflow_datasets)
        skip_bad_images=False,      # 'folder': leave out images that cannot be decoded (listed in
                                    # skipped_images.txt next to the prepared data) instead of refusing the folder
        reprepare=False,            # 'folder': prepare again when the prepared data are damaged or the folder
                                    # changed since (else the run is refused, naming the files)
        split='train',
        eval_split='test',          # kNN monitor and evaluations ('validation' for imagenet2012)
        image_size=224,
        crop_scale=(0.2, 1.0),      # RandomResizedCrop scale, as in MAE
        hflip=True,
        mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
        std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
        normalize_on='device',      # 'device': uint8 crosses to the accelerator, 4x fewer bytes
        num_workers=0,              # grain worker processes (0: in the main process)
        prefetch_buffer=2,          # batches prepared ahead (in as many threads)
        pipeline='grain',           # 'grain': decode + augment on the host; 'device': each split decoded once
                                    # (cached), resident on the accelerator, cropped there (colormae_jax.data.device)
        device_max_gb=0.0,          # 'device': a split's cap per device (0: half the free device memory; 4 GB on CPU)
    ))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = 'pretrain'
    c.seed = 0
    c.init_from = ''                # start from these params (a workdir, WORKDIR/checkpoints/STEP, a tools.convert
                                    # import folder) instead of a random init; a resumed run ignores it

    c.data = data_config()

    c.model = ml_collections.ConfigDict(dict(
        variant='B/16',
        decoder=ml_collections.ConfigDict(dict(width=512, depth=8, heads=16)),
        norm_pix_loss=True,
        compute_dtype='float32',    # 'bfloat16' computes in bf16; params stay float32
        # 'auto' | 'xla' | 'cudnn' (jax.nn.dot_product_attention) | 'einsum' | 'cpu' (the XLA:CPU forms)
        attn_impl='auto',
        remat=False,                # recompute each block in the backward pass (less memory, more FLOPs)
    ))

    c.mask = ml_collections.ConfigDict(dict(
        strategy='random',          # 'random' | 'red' | 'blue' | 'green' | 'purple' | 'famt'
        ratio=0.75,
        throw_ratio=0.0,
        schedule='',                # phases NAME[:MASK[/THROW]][@START] (overrides strategy): 'green,blue@200',
                                    # 'random:0.75,famt:0.45/0.40@41' (START in epochs, or e.g. '10steps')
        # ColorMAE noise banks (colour strategies); sigmas in patch-grid cells, see docs/design.md
        noise=ml_collections.ConfigDict(dict(
            bank_size=1024,         # patterns L in the bank (the official banks hold 3072)
            side=0,                 # pattern side S (>= the patch grid); 0: max(64, 2 * grid)
            sigma=1.5,              # red (low-pass) and blue (high-pass)
            sigma1=0.8,             # green = G_sigma1 * W - G_sigma2 * W; purple = W - green
            sigma2=2.0,
            path='',                # an .npz bank [L, H, W] instead of generating; '{colour}' is substituted
            per_image=True,         # a pattern, crop and flips per image (our reading of the paper); False: the
                                    # official code's: patterns in bank order, one crop and flips per batch
        )),
        # FAMT (mask.strategy='famt'); its configs set ratio 0.45 and throw_ratio 0.40 (AMT's setting)
        famt=ml_collections.ConfigDict(dict(
            warmup_epochs=41.0,     # the first weight update, before 0-based epoch 41: AMT updates after epoch 40
                                    # and masks with the weights from epoch 41 (`epoch > 40`); uniform before
            update_every_epochs=40.0,  # recompute the per-example weights this often after that
            freq_weight=0.5,        # 0: attention only, 1: frequency only (docs/design.md)
            freq_sigma=0.5,         # Gaussian low-pass std, in patches
            min_weight=1e-3,        # weights are floored here (relative to the image's max) before sampling
            update_batch_size=0,    # the update pass's global batch (0: batch_size)
            warmup_steps=placeholder(int),        # in steps, overriding the epoch values when set
            update_every_steps=placeholder(int),
        )),
    ))

    # Durations: *_steps, when set, overrides *_epochs.
    c.batch_size = 4096
    c.total_epochs = 800.0
    c.total_steps = placeholder(int)
    c.warmup_epochs = 40.0
    c.warmup_steps = placeholder(int)
    c.base_lr = 1.5e-4              # lr = base_lr * batch_size / 256
    c.min_lr = 0.0
    c.wd = 0.05
    c.decay_tokens = True           # weight decay on cls_token / mask_token: MAE's and AMT's code (timm's
                                    # add_weight_decay, no skip list); False: mmpretrain's (ColorMAE's) paramwise_cfg
    c.b1, c.b2 = 0.9, 0.95
    c.grad_clip_norm = 0.0          # 0: off (MAE does not clip)
    c.grad_accum_steps = 1          # k: each optimizer step of batch_size runs k micro-batches of batch_size / k
                                    # (MAE's --accum_iter; batch_size stays the effective batch, lr scales with it)

    c.mesh = (('data', -1), ('fsdp', 1))  # (axis, size) pairs; -1: the remaining devices

    c.num_classes = 1000            # for the kNN monitor
    # kNN monitor during pre-training (weighted kNN on frozen features of data.split vs data.eval_split)
    c.knn = ml_collections.ConfigDict(dict(every_epochs=0.0, k=20, temperature=0.07, max_train=0, max_test=0,
                                           batch_size=0))
    c.log_every_steps = 50
    c.image_summary_every_epochs = 10.0
    c.image_summary_count = 8
    c.ckpt = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    c.nan_check = True
    return c


def eval_config(task: str) -> ml_collections.ConfigDict:
    """Defaults shared by the evaluation configs (kNN, linear probe, fine-tuning)."""
    c = ml_collections.ConfigDict()
    c.task = task                   # 'knn' | 'linear_probe' | 'finetune'
    c.init_from = ''                # a pre-training workdir, its checkpoints/STEP, or a tools.convert import
    c.seed = 0
    c.data = base_config().data
    # At an image size other than the pre-trained encoder's: 'interpolate' its position table bicubically
    # (MAE's interpolate_pos_embed, the official fine-tuning and linear probe), or 'recompute' the sin-cos table
    c.model = ml_collections.ConfigDict(dict(pos_embed_resize='interpolate'))
    # MAE's probe and fine-tuning crop with torchvision's default scale (0.08, 1), not pre-training's (0.2, 1)
    c.data.crop_scale = (0.08, 1.0)
    c.num_classes = 1000
    c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07, max_train=0, max_test=0, batch_size=0))
    # MAE linear probe: BN (no affine) + linear, LARS, base lr 0.1, no wd, 90 epochs, 10 warm-up
    c.probe = ml_collections.ConfigDict(dict(mode='fast', pool='cls', also_knn=True, max_train=0, max_test=0))
    c.batch_size = 16384 if task == 'linear_probe' else 1024
    c.total_epochs = 90.0 if task == 'linear_probe' else 100.0
    c.total_steps = placeholder(int)
    c.warmup_epochs = 10.0 if task == 'linear_probe' else 5.0
    c.warmup_steps = placeholder(int)
    c.base_lr = 0.1 if task == 'linear_probe' else 5e-4
    c.min_lr = 0.0 if task == 'linear_probe' else 1e-6
    c.wd = 0.0 if task == 'linear_probe' else 0.05
    c.b1, c.b2 = 0.9, 0.999
    c.grad_clip_norm = 0.0
    c.grad_accum_steps = 1          # micro-batches per optimizer step (as pre-training's)
    # MAE fine-tuning recipe (ViT-B): layer decay 0.65, drop path 0.1, mixup 0.8, cutmix 1.0,
    # label smoothing 0.1, RandAugment m9-mstd0.5, random erasing 0.25
    c.finetune = ml_collections.ConfigDict(dict(layer_decay=0.65, drop_path=0.1, mixup=0.8, cutmix=1.0,
                                                label_smoothing=0.1, randaug_ops=2, randaug_magnitude=9,
                                                reprob=0.25, pool='mean',
                                                # MAE's fine-tuning ViT learns pos_embed (from the sin-cos table)
                                                learn_pos_embed=True,
                                                max_test=0))     # evaluate on the first N eval images (0: all)
    c.eval_every_epochs = 10.0
    c.mesh = (('data', -1), ('fsdp', 1))
    c.log_every_steps = 50
    c.ckpt = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))
    c.nan_check = True
    return c


def set_mask(c: ml_collections.ConfigDict, mask: str) -> None:
    """``get_config('mask=...')``: the strategy. ``famt`` is AMT's schedule: random masking at
    0.75 (nothing thrown) until the first weight update, then FAMT masking 0.45 / throwing 0.40."""
    c.mask.strategy = mask
    if mask == 'famt':
        c.mask.ratio, c.mask.throw_ratio = 0.45, 0.40
        c.mask.schedule = famt_schedule(c.mask.famt)


def famt_schedule(famt) -> str:
    """AMT's phases, FAMT from its first weight update (``famt``: ``config.mask.famt``)."""
    start = f'{famt.warmup_steps}steps' if famt.warmup_steps is not None else f'{famt.warmup_epochs:g}'
    return f'random:0.75,famt:0.45/0.40@{start}'
