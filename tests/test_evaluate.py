"""Evaluations: kNN maths, linear probe on the shared loop (resume included), bad input,
and the study script end to end on a tiny folder."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from colormae_jax import config_lib, knn, main
from colormae_jax.interop import weights
from colormae_jax.tasks import linear_probe

from helpers import make_folder, override, smoke_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import cifar10_eval  # noqa: E402

DEV = jax.devices()[:1]


def test_knn_weighted_vote():
    # two tight clusters on the unit circle; a query near cluster 1 with 3 neighbours from each
    train_f = np.asarray([[1, 0.01], [1, -0.01], [1, 0.02], [0, 1], [0.01, 1], [-0.01, 1]], np.float32)
    train_y = np.asarray([0, 0, 0, 1, 1, 1])
    test_f = np.asarray([[0.1, 1.0], [1.0, 0.1]], np.float32)
    acc = knn.knn_accuracy(train_f, train_y, test_f, np.asarray([1, 0]), num_classes=2, k=6, temperature=0.07)
    assert acc == 100.0
    # with k = all and a huge temperature, votes are uniform: a 4-vs-2 majority wins whatever the distance
    train_y2 = np.asarray([0, 0, 0, 0, 1, 1])
    acc = knn.knn_accuracy(train_f, train_y2, test_f[:1], np.asarray([0]), num_classes=2, k=6, temperature=1e6)
    assert acc == 100.0
    acc = knn.knn_accuracy(train_f, train_y2, test_f[:1], np.asarray([1]), num_classes=2, k=2, temperature=0.07)
    assert acc == 100.0  # the two nearest are class 1


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    base = tmp_path_factory.mktemp('ev')
    root = make_folder(base / 'imgs', per_class=16, splits=('train', 'test'))
    c = smoke_config(root, str(base / 'tfds'), **{'image_summary_every_epochs': 0.0})
    main.run(c, str(base / 'mae'), devices=DEV)
    return root, str(base / 'tfds'), str(base / 'mae')


def _eval_config(task, root, data_dir, init_from, **over):
    c = cifar10_eval.get_config(f'task={task},smoke')
    c.data.root, c.data.data_dir, c.init_from = root, data_dir, init_from
    c.batch_size = 8
    c.total_steps, c.warmup_steps = 12, 2
    c.eval_every_epochs = 1.0
    c.ckpt.every_steps = 4
    return override(c, **over)


def test_feature_iterator_epochs_are_permutations_and_resume_exactly():
    feats = np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    it = linear_probe.feature_iterator(feats, np.arange(100), batch_size=32, seed=0)
    epochs = [np.concatenate([next(it)['label'] for _ in range(3)]) for _ in range(2)]  # 3 batches of 32 per epoch
    for e in epochs:
        assert len(set(e.tolist())) == 96  # no row twice within an epoch
    assert (epochs[0] != epochs[1]).any()  # a new order every epoch
    b = next(it)
    np.testing.assert_array_equal(b['feat'][:, 0], b['label'])  # features and labels stay paired
    state = it.get_state()
    after = [next(it)['label'] for _ in range(4)]
    it.set_state(state)
    for want in after:
        np.testing.assert_array_equal(next(it)['label'], want)


def test_knn_task(pretrained, tmp_path):
    root, dd, mae = pretrained
    out = main.run(_eval_config('knn', root, dd, mae), str(tmp_path / 'k'), devices=DEV)
    r = out['results']
    assert set(r) == {'knn/cls_top1', 'knn/mean_top1'} and all(0 <= v <= 100 for v in r.values())
    saved = json.load(open(tmp_path / 'k' / 'results.json'))
    assert saved['knn/cls_top1'] == r['knn/cls_top1'] and 'step 12' in saved['source']


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['fast', 'faithful'])
def test_linear_probe_resumes_bitwise(pretrained, tmp_path, mode):
    root, dd, mae = pretrained
    c = _eval_config('linear_probe', root, dd, mae + '/checkpoints/8', **{'probe.mode': mode})
    full = main.run(c, str(tmp_path / 'a'), devices=DEV)
    assert full['step'] == 12 and np.isfinite(full['losses']).all()
    assert 0 <= full['results']['linear/top1'] <= 100
    first = main.run(c, str(tmp_path / 'b'), devices=DEV, stop_after=6)
    assert first['losses'] == full['losses'][:6]
    second = main.run(c, str(tmp_path / 'b'), devices=DEV)
    assert second['losses'] == full['losses'][4:]
    assert second['results']['linear/top1'] == full['results']['linear/top1']
    # the encoder is frozen: only the head was trained (BatchNorm has no affine parameters)
    assert set(full['state']['params']) == {'head'} and set(full['state']['stats']['bn']) == {'mean', 'var'}
    if mode == 'faithful':  # images normalised by the pipeline are not normalised again on the device
        host = main.run(override(c, **{'data.normalize_on': 'host'}), str(tmp_path / 'h'),
                                        devices=DEV, stop_after=3)
        np.testing.assert_allclose(host['losses'], full['losses'][:3], rtol=1e-4)


def test_eval_bad_input(pretrained, tmp_path):
    root, dd, mae = pretrained
    with pytest.raises(config_lib.ConfigError, match='config.init_from: set the pre-training run'):
        main.run(_eval_config('knn', root, dd, ''), str(tmp_path / 'x'), devices=DEV)
    with pytest.raises(config_lib.ConfigError, match='config.init_from: .* is not a directory'):
        main.run(_eval_config('knn', root, dd, str(tmp_path / 'nope')), str(tmp_path / 'x'),
                                 devices=DEV)
    with pytest.raises(config_lib.ConfigError,
                       match="config.model.pos_embed_resize: 'interpolate' at another image size"):
        main.run(_eval_config('knn', root, dd, mae, **{'data.image_size': 64}), str(tmp_path / 'x'),
                                 devices=DEV)
    with pytest.raises(config_lib.ConfigError, match="config.probe.mode: 'slow'"):
        main.run(_eval_config('linear_probe', root, dd, mae, **{'probe.mode': 'slow'}),
                                 str(tmp_path / 'x'), devices=DEV)


@pytest.mark.slow
def test_study_smoke_end_to_end(pretrained, tmp_path):
    root, dd, _ = pretrained
    out = tmp_path / 'study'
    cmd = [sys.executable, 'benchmarks/cifar10_study.py', '--preset=smoke', '--strategies=random,green,famt',
           f'--root={root}', f'--data_dir={dd}', f'--out={out}', '--set=batch_size=8', '--set=total_steps=8',
           '--set=mask.famt.warmup_steps=4', '--set=mask.famt.update_every_steps=4', '--set=knn.every_epochs=1.0',
           '--set=mask.famt.update_batch_size=8', '--eval_set=batch_size=8', '--eval_set=total_steps=6']
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), '..'),
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / 'results.json'))
    assert set(res['summary']) == {'random', 'green', 'famt'}
    for s in ('random', 'green', 'famt'):
        run = res['runs'][f'{s}/seed0']
        assert run['linear_probe_done'] and run['knn_curve'] and 0 <= run['linear/top1'] <= 100
    assert '| green |' in (out / 'results.md').read_text()
    assert (out / 'study.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_finetune_trains_end_to_end_and_resumes(pretrained, tmp_path):
    root, dd, mae = pretrained
    c = _eval_config('finetune', root, dd, mae, **{'total_steps': 8, 'ckpt.every_steps': 4})
    full = main.run(c, str(tmp_path / 'a'), devices=DEV)
    assert full['step'] == 8 and np.isfinite(full['losses']).all()
    assert 0 <= full['results']['finetune/top1'] <= 100
    pre, _, _ = weights.load_any_params(mae)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         full['state']['params']['encoder']['blocks'][0], pre['encoder']['blocks'][0])
    assert max(jax.tree.leaves(moved)) > 0  # the encoder is fine-tuned, not frozen
    first = main.run(c, str(tmp_path / 'b'), devices=DEV, stop_after=5)
    second = main.run(c, str(tmp_path / 'b'), devices=DEV)
    assert first['losses'] + second['losses'][1:] == full['losses']  # resumed from step 4
    # the step-4 checkpoint holds the evaluation at step 4, so the best value survives the resume
    assert second['results'] == full['results']
    again = main.run(c, str(tmp_path / 'a'), devices=DEV)  # already complete: reports, trains nothing
    assert again['losses'] == [] and again['results'] == full['results']
