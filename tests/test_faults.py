"""Fast versions of ``benchmarks/faults.py``, with its own functions.

Fast: every kind of damage the benchmark does, and a byte flipped at 10 random offsets, on a
small Checkpointer: the step is set aside unchanged as ``STEP.damaged`` and the step before
restored exactly (or, for a flip in bytes that are never read, the step restores exactly);
the NaN stop and the bad-data refusal as one ``error:`` line. Slow: real launches of
``python -m colormae_jax.main`` against an uninterrupted one: ``kill -9`` then a relaunch,
a second run on a held workdir, a NaN loss (exit code 3) on a folder with a skipped image.
"""
import os
import random
import shutil
import signal
import sys

import jax
import numpy as np
import pytest
from test_checkpoint_safety import CONFIG, _abstract, _iterator, _save_steps, _state

from colormae_jax import cli, defaults, errors, loop
from colormae_jax.checkpoints import checkpointer as checkpoint
from colormae_jax.data import sources as datasets

from helpers import make_folder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks'))
import faults  # noqa: E402


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """Steps 1 and 2 of a small Checkpointer, and their iterator states."""
    d = tmp_path_factory.mktemp('saved')
    return d, _save_steps(d)


def _restore(d):
    ckpt = checkpoint.Checkpointer(str(d))
    try:
        return ckpt.restore_newest(_abstract(), (it := _iterator()), CONFIG), it
    finally:
        ckpt.close()


@pytest.mark.parametrize('kind', faults.DAMAGE_KINDS)
def test_each_damage_of_the_benchmark_is_set_aside_unchanged(saved, tmp_path, kind):
    src, states = saved
    d = tmp_path / 'checkpoints'  # as in a workdir: faults.step_folders / lost_steps look there
    shutil.copytree(src, d)
    faults.damage(str(d / '2'), kind, random.Random(0))
    digest = faults.tree_digest(str(d / '2'))
    (step, state, _), it = _restore(d)
    assert step == 1 and it.get_state() == states[1]
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    after = faults.step_folders(str(tmp_path))
    assert after == ['1', '2.damaged'] and faults.tree_digest(str(d / '2.damaged')) == digest  # set aside as it was
    assert faults.lost_steps(['1', '2'], after, {'2': digest}, str(tmp_path)) == []


def test_a_byte_flipped_at_random_offsets_is_caught_or_harmless(saved, tmp_path):
    src, states = saved
    rng, outcomes = random.Random(0), []
    for i in range(10):
        d = tmp_path / f'c{i}'
        shutil.copytree(src, d)
        where = faults.flip_byte(str(d / '2'), rng)
        (step, state, _), it = _restore(d)
        jax.tree.map(np.testing.assert_array_equal, state, _state(step))  # never garbage
        assert it.get_state() == states[step]
        assert sorted(os.listdir(d)) == (['1', '2'] if step == 2 else ['1', '2.damaged']), where
        outcomes.append(step)
    assert 1 in outcomes  # the flips do land in bytes that matter


def test_lost_steps_sees_a_deleted_or_changed_step(tmp_path):
    assert faults.lost_steps(['4', '8'], ['4']) == ['8']
    os.makedirs(tmp_path / 'checkpoints' / '8.damaged')
    assert faults.lost_steps(['4', '8'], ['4', '8.damaged'], {'8': 'x'}, str(tmp_path)) == ['8 (its files changed)']


def test_non_finite_loss_is_one_line_with_its_own_exit_code(tmp_path):
    class Ckpt:
        directory = '/w/checkpoints'

        def latest_step(self):
            return 8

    with pytest.raises(loop.NonFiniteMetrics) as e:
        loop._check_finite(9, {'loss': float('nan'), 'lr': 1e-3}, Ckpt())
    assert isinstance(e.value, FloatingPointError)
    assert cli.error_line(e.value) == (
        'error: config.base_lr: non-finite training metrics at step 9 (loss=nan); the run stopped without saving '
        '(the last good checkpoint is step 8 in /w/checkpoints); lower base_lr, lengthen the warm-up or set '
        'grad_clip_norm, then relaunch (it resumes from there)')
    assert cli.EXIT_NON_FINITE == 3 not in (cli.EXIT_OK, cli.EXIT_USER_ERROR, cli.EXIT_PREEMPTED)


def test_skipped_images_are_listed_in_the_workdir(tmp_path):
    root = make_folder(tmp_path / 'imgs', per_class=3)
    open(os.path.join(root, 'train', 'cat', 'empty.png'), 'wb').close()
    c = defaults.data_config()
    c.root, c.data_dir, c.image_size = root, str(tmp_path / 'tfds'), 32
    with pytest.raises(errors.DataError) as e:  # refused: one line, where the full list is
        datasets.prepare(c)
    assert '\n' not in str(e.value) and f'({root}/train/cat/empty.png: empty (0 bytes); all listed in ' in str(e.value)
    c.skip_bad_images = True
    assert datasets.write_skipped(c, str(tmp_path / 'wd')) == str(tmp_path / 'wd' / datasets.SKIPPED_FILE)
    lines = (tmp_path / 'wd' / datasets.SKIPPED_FILE).read_text().splitlines()
    assert lines[0].startswith('# ') and lines[1:] == [f'{root}/train/cat/empty.png\tempty (0 bytes)']
    os.remove(os.path.join(root, 'train', 'cat', 'empty.png'))
    datasets.prepare.cache_clear()
    c.data_dir = str(tmp_path / 'tfds2')
    assert datasets.write_skipped(c, str(tmp_path / 'wd2')) is None and not os.path.exists(tmp_path / 'wd2')


def test_the_command_line_exits_3_on_a_non_finite_loss(tmp_path, capsys):
    """``cli.run`` maps the NaN stop to one ``error:`` line and exit code 3 (in this process;
    the subprocess tests of test_cli cover the other codes)."""
    from absl import flags

    ckpt = type('Ckpt', (), {'directory': '/w', 'latest_step': lambda self: None})()

    def main(argv):
        loop._check_finite(3, {'loss': float('inf')}, ckpt)

    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'cifar10.py')
    try:
        with pytest.raises(SystemExit) as e:
            cli.run(main, ['colormae', f'--config={config}:smoke', f'--workdir={tmp_path}'])
    finally:
        flags.FLAGS.unparse_flags()
    assert e.value.code == cli.EXIT_NON_FINITE == 3
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == ['error: config.base_lr: non-finite training metrics at step 3 (loss=inf); the run stopped without '
                   'saving (the last good checkpoint is none in /w); lower base_lr, lengthen the warm-up or set '
                   'grad_clip_norm, then relaunch (it resumes from there)']


# ----------------------------------------------------------------------------- real launches

@pytest.mark.slow
def test_kill_and_a_second_run_on_a_held_workdir(tmp_path, monkeypatch):
    """8 steps of the benchmark's config (a FAMT pass before step 5), in subprocesses, against
    an uninterrupted run: the first run held (SIGSTOP) at step 2, a second run on its workdir
    is refused (exit code 2, naming the holder); the first resumes (SIGCONT), is killed
    (``kill -9``) after step 5, and a relaunch resumes from its newest step and ends bitwise at
    the reference (every loss logged equal too), nothing lost."""
    monkeypatch.setattr(faults, 'TOTAL_STEPS', 8)
    monkeypatch.setenv('FAULTS_JAX_CACHE', str(tmp_path / 'jax_cache'))
    bench = faults.Bench(str(tmp_path), tries=1, seed=0, log=lambda *a: None)
    ref = bench.reference()
    assert ref.steps == ['4', '8']

    wd = str(tmp_path / 'wd')
    a = faults.Launch(wd, bench.flags)
    assert a.wait_for(lambda e: faults._last_logged(e) >= 2)
    a.signal(signal.SIGSTOP)
    b = faults.Launch(wd, bench.flags)
    try:
        assert b.wait() == cli.EXIT_USER_ERROR, b.err[-3000:]
    finally:
        a.signal(signal.SIGCONT)
    (refused,) = b.error_lines()
    assert refused.startswith(f'error: --workdir {wd}: another run holds it: host ') and f'pid {a.p.pid}' in refused
    assert a.wait_for(lambda e: faults._last_logged(e) >= 5)
    a.signal(signal.SIGKILL)
    assert a.wait() == -signal.SIGKILL
    at_kill = faults.step_folders(wd)
    assert at_kill in (['4'], ['4', '8'])  # (8: committed before the kill landed)
    again = faults.Launch(wd, bench.flags)
    assert again.wait() == 0, again.err[-3000:]
    assert faults._resumed_at(again.err) == int(at_kill[-1])
    ok, lost, why = faults.judge(ref, wd, [a, again], at_kill)
    assert ok and lost == [], why
