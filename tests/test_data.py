"""The datasets (prepared once per run) and the grain pipeline over a tiny image folder that the tests make."""
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from colormae_jax import defaults, errors
from colormae_jax.data import pipeline as data, sources as datasets

from helpers import make_folder


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp('d')
    root = make_folder(base / 'imgs', per_class=10, size=None, splits=('train', 'test'), fmt='jpg')
    c = defaults.data_config()
    c.root, c.data_dir, c.image_size = root, str(base / 'tfds'), 32
    datasets.prepare(c)
    return c


def test_prepare_and_read_back(prepared):
    b = datasets.prepare(prepared)
    assert b.info.splits['train'].num_examples == 20 and b.info.splits['test'].num_examples == 20
    assert b.info.features['label'].names == ['cat', 'dog']
    src = b.as_data_source('train')
    ex = src[0]
    assert ex['image'].dtype == np.uint8 and ex['image'].ndim == 3 and ex['image'].shape[2] == 3
    assert data.steps_per_epoch(prepared, 8) == 2


def test_batches_keys_dtypes(prepared):
    it = data.make_train_iterator(prepared, global_batch_size=4, seed=0)
    b = next(it)
    assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32 and b['index'].dtype == np.int32
    assert b['crop'].shape == (4, 4) and b['flip'].dtype == np.bool_
    assert np.all((b['crop'] >= 0) & (b['crop'] <= 1))
    assert np.all(b['crop'][:, 0] + b['crop'][:, 2] <= 1 + 1e-6)
    c = prepared.copy_and_resolve_references()
    c.normalize_on = 'host'
    h = next(data.make_train_iterator(c, global_batch_size=4, seed=0))
    np.testing.assert_allclose(h['image'], data.normalize(b['image'], c.mean, c.std), rtol=1e-6)
    it.close()


def test_epochs_and_process_shards_cover_every_index(prepared):
    seen = []
    for p in range(2):
        it = data.make_train_iterator(prepared, global_batch_size=4, seed=1, process_index=p, process_count=2)
        epoch1 = np.concatenate([next(it)['index'] for _ in range(5)])  # 10 examples per process
        epoch2 = np.concatenate([next(it)['index'] for _ in range(5)])
        assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 10
        assert not np.array_equal(epoch1, epoch2)  # reshuffled every epoch
        seen.append(set(epoch1.tolist()))
        it.close()
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(20))
    # The index is the example's position in the full split.
    src = datasets.prepare(prepared).as_data_source('train')
    it = data.make_train_iterator(prepared, global_batch_size=4, seed=1)
    b = next(it)
    assert [src[int(i)]['label'] for i in b['index']] == b['label'].tolist()
    it.close()


def test_determinism_and_checkpoint_state(prepared):
    a = data.make_train_iterator(prepared, global_batch_size=4, seed=3)
    b = data.make_train_iterator(prepared, global_batch_size=4, seed=3)
    c = data.make_train_iterator(prepared, global_batch_size=4, seed=4)
    xa, xb, xc = next(a), next(b), next(c)
    np.testing.assert_array_equal(xa['image'], xb['image'])
    assert not np.array_equal(xa['index'], xc['index'])
    next(a)
    state = a.get_state()
    want = [next(a) for _ in range(3)]
    d = data.make_train_iterator(prepared, global_batch_size=4, seed=3)
    d.set_state(state)
    for w in want:
        got = next(d)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    for x in (a, b, c, d):
        x.close()


def test_crop_and_flip_metadata_match_the_pixels(tmp_path):
    root = tmp_path / 'half' / 'train' / 'x'
    os.makedirs(root)
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 32:] = 255  # left black, right white
    Image.fromarray(img).save(root / 'a.png')
    c = defaults.data_config()
    c.root, c.data_dir, c.image_size = str(tmp_path / 'half'), str(tmp_path / 'tfds'), 16
    c.crop_scale = (1.0, 1.0)  # the whole image (after the aspect fallback) ...
    it = data.make_train_iterator(c, global_batch_size=1, seed=0)
    flips = set()
    for _ in range(12):
        b = next(it)
        top, left, h, w = b['crop'][0]
        left_px = left * 64
        mid = 64 * (left + w / 2)  # source column that lands in the output's centre
        out = b['image'][0].astype(float)
        left_mean, right_mean = out[:, :4].mean(), out[:, -4:].mean()
        if left_px < 30 and left_px + w * 64 > 34 and abs(mid - 32) < 8:
            if b['flip'][0]:
                assert left_mean > 200 and right_mean < 55
            else:
                assert left_mean < 55 and right_mean > 200
            flips.add(bool(b['flip'][0]))
    assert flips == {True, False}
    it.close()


def test_eval_iterator_pads_to_equal_batches(prepared):
    counts = []
    for p in range(2):
        batches = list(data.make_eval_iterator(prepared, split='test', global_batch_size=6, process_index=p,
                                               process_count=2))
        assert all(b['image'].shape == (3, 32, 32, 3) for b in batches)
        counts.append((len(batches), int(sum(b['valid'].sum() for b in batches))))
    assert counts == [(4, 10), (4, 10)]


def test_padded_pass_gives_every_process_the_same_batches_and_every_example_once():
    import grain
    rows = [{'x': np.float32(i), 'valid': np.True_} for i in range(10)]
    ds = grain.MapDataset.source(rows)
    template = {'x': ((), np.float32), 'valid': ((), np.bool_)}
    # 3 processes, 2 rows each per batch: process 0 reads 0, 3, 6, 9; process 2 reads 2, 5, 8
    passes = [list(data.padded_pass(ds, global_batch_size=6, process_index=p, process_count=3, template=template))
              for p in range(3)]
    assert [len(b) for b in passes] == [2, 2, 2]
    assert all(len(b['x']) == 2 for batches in passes for b in batches)
    seen = np.concatenate([b['x'][b['valid']] for batches in passes for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    np.testing.assert_array_equal(passes[2][1]['valid'], [True, False])
    doubled = list(data.padded_pass(ds, lambda r: dict(r, x=2 * r['x']), global_batch_size=4, process_index=0,
                                    process_count=1, template=template))
    assert len(doubled) == 3 and doubled[-1]['x'].tolist() == [16, 18, 0, 0]


def test_worker_processes_are_deterministic(prepared):
    c = prepared.copy_and_resolve_references()
    c.num_workers = 1
    it = data.make_train_iterator(c, global_batch_size=4, seed=5)
    ref = data.make_train_iterator(prepared, global_batch_size=4, seed=5)
    for _ in range(2):
        np.testing.assert_array_equal(next(it)['image'], next(ref)['image'])
    it.close()
    ref.close()


def test_bad_input_errors(tmp_path, prepared, monkeypatch):
    c = defaults.data_config()
    c.root, c.data_dir = str(tmp_path / 'missing'), str(tmp_path / 'tfds')
    with pytest.raises(errors.DataError, match='is not a directory'):
        datasets.prepare(c)
    monkeypatch.chdir(tmp_path)
    c.root = '../missing'  # a relative root is shown resolved too
    with pytest.raises(errors.DataError, match=r"data.root='../missing' \(resolved: " +
                       re.escape(os.path.join(os.path.dirname(str(tmp_path)), 'missing')) + r'\) is not a directory'):
        datasets.prepare(c)
    t = defaults.data_config()
    t.source, t.name, t.data_dir = 'tfds', 'cifar10', str(tmp_path / 'empty')
    with pytest.raises(errors.DataError, match="'cifar10' is not prepared under .*tfds build cifar10"):
        datasets.prepare(t)
    with pytest.raises(errors.DataError, match='batch_size=5 is not divisible by the 2 processes'):
        data.make_train_iterator(prepared, global_batch_size=5, seed=0, process_count=2)


def test_prepare_scans_a_folder_once_per_run(tmp_path, monkeypatch):
    """Every num_examples / iterator call prepares the data; only the first scans the folder."""
    scans = []
    scan = datasets._scan
    monkeypatch.setattr(datasets, '_scan', lambda root: scans.append(root) or scan(root))
    root = make_folder(tmp_path / 'imgs', per_class=4, splits=('train', 'test'))
    c = defaults.data_config()
    c.root, c.data_dir, c.image_size = root, str(tmp_path / 'tfds'), 32
    b = datasets.prepare(c)
    assert datasets.num_examples(c) == 8 and datasets.num_examples(c, 'test') == 8
    assert data.steps_per_epoch(c, 4) == 2
    it = data.make_train_iterator(c, global_batch_size=4, seed=0)
    next(it)
    it.close()
    assert len(list(data.make_eval_iterator(c, split='test', global_batch_size=4))) == 2
    rel = c.copy_and_resolve_references()
    monkeypatch.chdir(tmp_path)
    rel.root = 'imgs'  # the same folder, named relative to the working directory
    assert datasets.prepare(rel) is b and datasets.prepare(c) is b
    assert scans == [os.path.abspath(root)]
    # A folder changed since it was prepared is refused when the next run (here: a cleared cache) prepares it.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(root, 'train', 'cat', 'new.png'))
    assert datasets.num_examples(c) == 8  # this run goes on with what it prepared
    datasets.prepare.cache_clear()
    with pytest.raises(errors.DataError, match=r"changed since it was prepared .*now \{'test': 8, 'train': 9}, "
                                               r"prepared \{'test': 8, 'train': 8}"):
        datasets.prepare(c)
    assert len(scans) == 2
    with pytest.raises(errors.DataError, match='changed since'):  # a failure is not remembered
        datasets.prepare(c)
    assert len(scans) == 3


def _bad_folder(base):
    """2 classes x 3 good images, plus a truncated JPEG, a 0-byte file and a text file named .jpg."""
    root = make_folder(base / 'imgs', per_class=3, fmt='jpg')
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, format='JPEG')
    cat, dog = os.path.join(root, 'train', 'cat'), os.path.join(root, 'train', 'dog')
    open(os.path.join(cat, 'cut.jpg'), 'wb').write(out.getvalue()[:len(out.getvalue()) // 2])
    open(os.path.join(dog, 'empty.jpg'), 'wb').close()
    open(os.path.join(dog, 'notes.jpg'), 'w').write('not an image, just text\n')
    return root


def test_bad_images_are_all_named_before_anything_is_written(tmp_path):
    root = _bad_folder(tmp_path)
    c = defaults.data_config()
    c.root, c.data_dir, c.image_size = root, str(tmp_path / 'tfds'), 32
    with pytest.raises(errors.DataError) as e:
        datasets.prepare(c)
    msg = str(e.value)  # one line: the count, each bad file with its reason, where all are listed
    assert '\n' not in msg and msg.startswith(f'data.root={root}: 3 of 9 images cannot be used')
    assert f'nothing was prepared ({root}/train/cat/cut.jpg: truncated or corrupt (OSError: ' in msg
    assert (f' | {root}/train/dog/empty.jpg: empty (0 bytes) | {root}/train/dog/notes.jpg: not an image (PIL '
            f'cannot identify it); all listed in ') in msg
    assert msg.endswith('); remove or replace them, or set --config.data.skip_bad_images=True to leave them out '
                        f'(then listed in {datasets.SKIPPED_FILE} next to the prepared data and in the workdir)')
    listed = msg.split('; all listed in ')[1].split(')')[0]
    assert os.path.dirname(listed) == str(tmp_path / 'tfds' / 'image_folder') and listed.endswith('.bad_images.txt')
    assert [x.split('\t')[0] for x in open(listed).read().splitlines()[1:]] == [
        f'{root}/train/cat/cut.jpg', f'{root}/train/dog/empty.jpg', f'{root}/train/dog/notes.jpg']
    assert os.listdir(tmp_path / 'tfds' / 'image_folder') == [os.path.basename(listed)]  # nothing else written


def test_more_than_twenty_bad_images_are_counted(tmp_path):
    root = make_folder(tmp_path / 'imgs', classes=('a',), per_class=1)
    for i in range(23):
        open(os.path.join(root, 'train', 'a', f'z{i:02d}.png'), 'wb').close()
    c = defaults.data_config()
    c.root, c.data_dir = root, str(tmp_path / 'tfds')
    with pytest.raises(errors.DataError, match='23 of 24 images cannot be used') as e:
        datasets.prepare(c)
    msg = str(e.value)
    assert '\n' not in msg and msg.count('z1') == 10 and msg.count('z2') == 0  # 20 named: z00 .. z19
    assert ' | ... and 3 more; all listed in ' in msg
    listed = msg.split('; all listed in ')[1].split(')')[0]
    assert len(open(listed).read().splitlines()) == 1 + 23
    c.skip_bad_images = True  # a split with nothing left is refused, not prepared empty
    open(os.path.join(root, 'train', 'a', '0000.png'), 'wb').close()
    with pytest.raises(errors.DataError, match='split folder .*train: all its 24 images cannot be used'):
        datasets.prepare(c)


def test_skip_bad_images_prepares_the_good_ones(tmp_path):
    root = _bad_folder(tmp_path)
    c = defaults.data_config()
    c.root, c.data_dir, c.image_size, c.skip_bad_images = root, str(tmp_path / 'tfds'), 32, True
    b = datasets.prepare(c)
    assert b.info.splits['train'].num_examples == 6 and b.info.features['label'].names == ['cat', 'dog']
    src = b.as_data_source('train')
    names = b.info.features['label'].names
    got = sorted((names[src[i]['label']], src[i]['file_name'].decode()) for i in range(6))
    assert got == [(c_, f'{c_}/{i:04d}.jpg') for c_ in ('cat', 'dog') for i in range(3)]  # labels follow the files
    listed = open(os.path.join(b.data_dir, datasets.SKIPPED_FILE)).read().splitlines()
    assert listed[0].startswith('#') and [line.split('\t')[0] for line in listed[1:]] == [
        f'{root}/train/cat/cut.jpg', f'{root}/train/dog/empty.jpg', f'{root}/train/dog/notes.jpg']
    assert listed[2].split('\t')[1] == 'empty (0 bytes)'
    # The next run (a fresh process: the cache cleared, a new builder) is not refused: the skipped
    # files are stored with the prepared data and count as seen. Without the flag it is reused too.
    datasets.prepare.cache_clear()
    os.remove(os.path.join(b.data_dir, datasets.SKIPPED_FILE))
    c.skip_bad_images = False
    again = datasets.prepare(c)
    assert again is not b and again.info.splits['train'].num_examples == 6 and len(again.skipped()) == 3
    assert os.path.exists(os.path.join(b.data_dir, datasets.SKIPPED_FILE))  # written again from the metadata
    # A folder changed since it was prepared is still refused, the skipped files counted.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(root, 'train', 'cat', 'new.png'))
    datasets.prepare.cache_clear()
    with pytest.raises(errors.DataError, match=r"now \{'train': 10}, prepared \{'train': 6}, left out as bad "
                                               r"\{'train': 3}"):
        datasets.prepare(c)


def test_other_image_modes_are_stored_as_rgb(tmp_path):
    root = tmp_path / 'modes' / 'train' / 'x'
    os.makedirs(root)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(root / 'gray.png')
    Image.fromarray(np.full((8, 8, 4), 9, np.uint8)).save(root / 'rgba.png')
    Image.fromarray(np.full((8, 8, 3), 11, np.uint8)).save(root / 'rgb.jpg')
    c = defaults.data_config()
    c.root, c.data_dir = str(tmp_path / 'modes'), str(tmp_path / 'tfds')
    src = datasets.prepare(c).as_data_source('train')
    images = {src[i]['file_name'].decode(): src[i]['image'] for i in range(3)}
    assert all(v.shape == (8, 8, 3) for v in images.values())
    assert images['x/gray.png'].max() == 7 and images['x/rgba.png'].min() == 9
