"""A ``task=segment`` run in Python, for notebooks: its predictions and the picture that
``python -m colormae_jax.tools.visualize`` draws of it (docs/api.md).

    from colormae_jax.api import segmentation
    seg = segmentation.load('/tmp/seg')                     # a run's workdir or WORKDIR/checkpoints/STEP
    examples = segmentation.examples(seg, split='val', num=4)  # or images=['photos/']
    segmentation.save_png('seg.png', segmentation.grid(seg, examples))
    classes = seg.predict(image)                           # uint8 [h, w], as the run's evaluation
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from colormae_jax import viz
from colormae_jax.api import mae
from colormae_jax.checkpoints.checkpointer import CheckpointError
from colormae_jax.checkpoints.checksums import CHECKSUMS, compare, fingerprints
from colormae_jax.data import pipeline as data, segmentation as seg_data
from colormae_jax.errors import DataError
from colormae_jax.interop import weights
from colormae_jax.models import mae as model_lib, upernet
from colormae_jax.tasks import segment

save_png = viz.save_png

TITLES = ('image', 'true labels', 'predicted labels')
_FORWARD: dict = {}


@dataclasses.dataclass(eq=False)
class Segmenter:
    """A ``task=segment`` run's model at one step: ``params``, batch ``stats``, the run's saved
    ``config`` (ConfigDict: ``data`` for the normalisation, ``seg`` for the evaluation's resize
    and sliding windows) and where it came from."""
    graphdef: Any
    params: dict
    stats: dict
    config: ml_collections.ConfigDict
    description: str
    model_key: str = ''  # the model's static shape: segmenters with the same key share one compiled forward

    @property
    def num_classes(self) -> int:
        return int(self.config.data.num_classes)

    @property
    def _fwd(self):
        key = (self.model_key, self.config.data.to_json())
        if not self.model_key or key not in _FORWARD:
            _FORWARD.clear()  # one model at a time
            _FORWARD[key] = jax.jit(segment.eval_forward(self.graphdef, self.config.data))
        return _FORWARD[key]

    def predict(self, image: np.ndarray, label_hw: Sequence[int] | None = None) -> np.ndarray:
        """uint8 [h, w] classes of ``image`` (uint8 [H, W, 3], resized as the evaluation's:
        :func:`view`), as the run's evaluation computes them: sliding windows, logits resized
        to ``label_hw`` (the original size; default the image's), argmax."""
        windows = max(1, int(self.config.seg.eval_windows))
        return segment.predict(lambda x: self._fwd(self.params, self.stats, x), np.asarray(image, np.uint8),
                               tuple(label_hw or image.shape[:2]), self.config.seg, self.num_classes, windows)


def _backbone_config(config: ml_collections.ConfigDict, shapes: dict) -> tuple[model_lib.MAEConfig, str]:
    """The pre-trained encoder's MAEConfig: from ``config.init_from`` while it exists, else from the
    checkpoint's parameter shapes (heads from the relative position tables, else width / 64)."""
    src = config.get('init_from') or ''
    if src and os.path.exists(src):
        try:
            return weights.load_any_params(src)[1], ''
        except (CheckpointError, OSError, ValueError):
            pass
    enc = shapes['encoder']
    blocks = enc['blocks']
    first = blocks[min(blocks, key=int)]
    width = int(enc['patch_embed']['kernel'][1])
    heads = int(first['rel_pos_bias'][1]) if 'rel_pos_bias' in first else max(1, width // 64)
    patch = int(round((int(enc['patch_embed']['kernel'][0]) // 3) ** 0.5))
    c = model_lib.MAEConfig(patch=patch, width=width, depth=len(blocks), mlp_dim=int(first['mlp']['fc1']['kernel'][1]),
                            heads=heads)
    return c, f' (backbone from the checkpoint\'s shapes: init_from {src!r} is gone)'


def load(source: str, step: int | None = None) -> Segmenter:
    """The model of a ``task=segment`` run (``--workdir``, newest step or ``step``; or
    ``WORKDIR/checkpoints/STEP``), built from the run's saved config, its params and batch
    statistics verified against the step's checksums. Raises :class:`errors.DataError` (one
    line) for anything else."""
    if not os.path.exists(str(source)):
        raise DataError(f'{source}: no such file or directory; give a task=segment run\'s --workdir or its '
                        f'checkpoints/STEP')
    found = weights.run_config(source, step)
    if found is None or found[2].get('task') != 'segment':
        what = 'holds no training checkpoint' if found is None else f'is a task={found[2].get("task")} run'
        raise DataError(f'{source}: {what}, not a task=segment run; give a segmentation run\'s --workdir or its '
                        f'checkpoints/STEP')
    directory, step, cfg = found
    config = ml_collections.ConfigDict(cfg)
    where = os.path.join(directory, str(step))
    mgr = weights.read_only_manager(directory, {'state': ocp.StandardCheckpointHandler(),
                                                CHECKSUMS: ocp.JsonCheckpointHandler()})
    try:
        meta = mgr.item_metadata(step)['state']
        shapes = jax.tree.map(lambda m: tuple(m.shape), dict(meta['params']))
        record = None
        if os.path.isdir(os.path.join(where, CHECKSUMS)):
            record = mgr.restore(step, args=ocp.args.Composite(**{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{where}: cannot read the checkpoint ({type(e).__name__}); name another step') from None
    finally:
        mgr.close()
    c, note = _backbone_config(config, shapes)
    cs = dataclasses.replace(c, image_size=int(config.seg.crop_size), dtype=jnp.dtype(config.model.compute_dtype),
                             attn_impl=config.model.attn_impl, remat=False)
    s = segment._seg_config(config, int(config.data.num_classes))
    graphdef, params, stats = upernet.split_model(nnx.eval_shape(lambda: upernet.SegModel(cs, s, rngs=nnx.Rngs(0))))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            {'params': params, 'stats': stats})
    try:
        state = ocp.PyTreeCheckpointer().restore(
            os.path.join(where, 'state'), args=ocp.args.PyTreeRestore(
                item=abstract, partial_restore=True,
                restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype),
                                          abstract)))
        bad = [] if record is None else compare(record['state'], fingerprints(state), 'state')
    except Exception as e:  # noqa: BLE001
        bad = [' '.join(str(e).split())[:200]]
    if bad:
        raise DataError(f'{where}: the segmentation checkpoint does not restore ({bad[0]}); name another step '
                        f'(WORKDIR/checkpoints/STEP) or check that the run\'s init_from is the encoder it was built on')
    return Segmenter(graphdef, state['params'], state['stats'], config,
                     f'segmentation run {os.path.dirname(directory)} step {step}{note}', model_key=repr((cs, s)))


def view(image: Any, seg_cfg: ml_collections.ConfigDict) -> np.ndarray:
    """An image (uint8 [H, W, 3] or encoded bytes) resized as the evaluation's: the bound
    ``seg.scale`` (long, short), keeping the aspect, OpenCV's bilinear."""
    img = np.asarray(data.decode_image(image), np.uint8)
    w, h = seg_data.rescale_size(img.shape[1], img.shape[0], tuple(seg_cfg.scale))
    return seg_data.resize_bilinear_u8(img, w, h)


def examples(segmenter: Segmenter, *, images: Sequence[str] = (), data_cfg: ml_collections.ConfigDict | None = None,
                 split: str | None = None, num: int = 0) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, image resized as the evaluation's, true label map at the original size or None):
    the first ``num`` images of a configured split (``data_cfg``, default the run's own data;
    ``split`` default its ``eval_split``), the ones the TensorBoard pictures show, with their
    labels (``reduce_zero_label`` applied); or image files and folders (no labels)."""
    if images:
        out = []
        for f in mae.list_image_files(images)[:num or None]:
            try:
                with open(f, 'rb') as fh:
                    out.append((os.path.basename(f), view(fh.read(), segmenter.config.seg), None))
            except (OSError, ValueError, SyntaxError) as e:
                why = re.sub(r'\s*<[^>]*>', '', str(e)).strip()
                raise DataError(f'{f}: not an image PIL can read ({type(e).__name__}: {why}); give JPEG or PNG '
                                f'files') from None
        return out
    data_cfg = data_cfg or segmenter.config.data
    split = split or data_cfg.eval_split
    splits = list(dict.fromkeys([data_cfg.split, data_cfg.eval_split]))  # what prepare() reads
    if split not in splits:
        raise DataError(f'--split {split}: not a split of {data_cfg.root} (the data.split and data.eval_split of '
                        f'the run\'s config, or of --config); its splits are {", ".join(splits)}; give one of them, '
                        f'e.g. --split {data_cfg.eval_split}')
    return list(seg_data.eval_examples(data_cfg, segmenter.config.seg, split=split, limit=num or 8))


def panels(segmenter: Segmenter, examples: Sequence[tuple[str, np.ndarray, np.ndarray | None]], *,
               max_side: int = 256) -> tuple[list[list[np.ndarray]], list[str], list[dict]]:
    """(rows of uint8 panels, column titles, per image {'name', 'pred', 'label'}): the image,
    the true label map over it (when the example has labels) and the predicted one, drawn by the
    evaluation's TensorBoard picture (``tasks.segment.picture``: :func:`segmentation.palette`,
    half over the image). Predictions are the evaluation's (at the label's size); an image longer
    than ``max_side`` is drawn downscaled (maps nearest); panels are padded to the largest."""
    k = segmenter.num_classes
    labelled = all(lab is not None for _, _, lab in examples)
    cols = [0, 1, 2] if labelled else [0, 2]
    rows, maps = [], []
    for name, img, lab in examples:
        pred = segmenter.predict(img, img.shape[:2] if lab is None else lab.shape)
        h, w = img.shape[:2]
        f = min(1.0, max_side / max(h, w))
        shown = img if f == 1.0 else seg_data.resize_bilinear_u8(img, max(1, round(w * f)), max(1, round(h * f)))
        pic = segment.picture(shown, pred if lab is None else lab, pred, k)
        sw = shown.shape[1]
        rows.append([pic[:, i * sw:(i + 1) * sw] for i in cols])
        maps.append({'name': name, 'pred': pred, 'label': lab})
    th, tw = max(r[0].shape[0] for r in rows), max(r[0].shape[1] for r in rows)
    rows = [[viz.pad(p, th, tw) for p in r] for r in rows]
    return rows, [TITLES[i] for i in cols], maps


def grid(segmenter: Segmenter, examples: Sequence[tuple[str, np.ndarray, np.ndarray | None]], *,
             scale: int | None = None, max_side: int = 256) -> np.ndarray:
    """The picture of a segmentation run, uint8 [H, W, 3]: one row per example (:func:`panels`),
    panels upscaled ``scale`` times (nearest; default to about 128 pixels, never down)."""
    rows, titles, _ = panels(segmenter, examples, max_side=max_side)
    scale = scale or viz.auto_scale(max(rows[0][0].shape[:2]))
    return viz.grid(rows, titles, scale=scale, footer=viz.label_legend(segmenter.num_classes))
