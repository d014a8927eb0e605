"""Nothing lost around evaluations: a run saves its step before evaluating, a long pass logs its
progress and stops on SIGTERM between two batches (exit 75), and the relaunch runs only the
interrupted evaluation, with the figures of an uninterrupted run."""
import json
import logging as py_logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import pytest

from colormae_jax import config_lib, loop, main
from colormae_jax.tasks import evaluation

from helpers import make_folder, smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(spec):
    return config_lib.load_config_file(os.path.join(REPO, 'configs', spec))


DEV = jax.devices()[:1]


def test_pass_progress_logs_count_and_eta_then_stops_on_sigterm(monkeypatch, caplog):
    clock = iter(range(0, 1000, 10))  # 10 s per call of the clock
    monkeypatch.setattr(loop.PassProgress, '_clock', staticmethod(lambda: float(next(clock))))
    caplog.set_level(py_logging.INFO)
    p = loop.PassProgress('kNN monitor after step 10', 600, hint='--config.knn.every_epochs=0 turns it off')
    p.update(100)  # the first batch (compiling): sets the reference, no line
    p.update(100)  # 10 s later: 10 images/s -> the first line, with the pass's cost and the hint
    p.update(100)  # 10 s later: the next line is due 30 s after the first
    for _ in range(3):
        p.update(100)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('kNN monitor after step 10')]
    assert lines[0] == ('kNN monitor after step 10: 600 images, about 60 s at the measured 10 images/s (200 done, '
                        'ETA 40 s); --config.knn.every_epochs=0 turns it off'), lines
    assert lines[1:] == ['kNN monitor after step 10: 500/600 images (83%), 10 images/s, ETA 10 s'], lines
    assert p.count == 600

    q = loop.PassProgress('test features', 10)
    q.update(1)  # outside a loop SIGTERM is not ours: no stop check
    with loop.sigterm_stops_passes():
        q.update(1)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(loop.EvaluationInterrupted, match='test features: stopped by SIGTERM after 3 of 10'):
            q.update(1)
        loop.PassProgress('FAMT weight update', 10, interruptible=False).update(1)  # it polls on its own


def test_eval_records_drop_the_steps_that_run_again(tmp_path):
    r = loop._EvalRecords(str(tmp_path), 0)
    r.put(4, {'best': 1.0})
    r.put(8, {'best': 2.0})
    assert loop._EvalRecords(str(tmp_path), 8).get(8) == {'best': 2.0}
    again = loop._EvalRecords(str(tmp_path), 4)  # resumed from step 4: step 8's evaluation will run again
    assert again.get(4) == {'best': 1.0} and again.get(8) is None
    assert json.loads((tmp_path / 'evaluated.json').read_text()) == {'4': {'best': 1.0}}
    assert loop._EvalRecords(str(tmp_path), 0).records == {}  # a fresh start keeps nothing


def test_knn_curve_keeps_one_line_per_step(tmp_path):
    """A run resumed from an earlier step writes the monitor's later lines again: they replace the old ones."""
    from colormae_jax.tasks import pretrain
    path = str(tmp_path / 'knn.jsonl')
    for step, acc in ((10, 1.0), (20, 2.0), (30, 3.0), (20, 2.5), (30, 3.5)):  # resumed from step 10 after 30
        pretrain._append_knn(path, {'knn/cls_top1': acc, 'step': step})
    assert [json.loads(x) for x in open(path)] == [{'knn/cls_top1': 1.0, 'step': 10}, {'knn/cls_top1': 2.5, 'step': 20},
                                                   {'knn/cls_top1': 3.5, 'step': 30}]


def test_a_resume_with_another_duration_says_so(caplog):
    saved = config('cifar10.py:smoke')
    saved.total_steps = 10

    class Ckpt:
        def _item(self, step, name):
            return json.loads(saved.to_json())

    caplog.set_level(py_logging.INFO)
    c = config('cifar10.py:smoke')
    c.total_steps = 30
    loop._note_new_plan(Ckpt(), 10, c, 30)
    [line] = [r.getMessage() for r in caplog.records if 'planned anew' in r.getMessage()]
    assert line.startswith('Resumed at step 10 with total_steps 10 -> 30') and 'for 30 steps' in line, line
    caplog.clear()
    c.total_steps = 10
    loop._note_new_plan(Ckpt(), 10, c, 10)
    assert not [r for r in caplog.records if 'planned anew' in r.getMessage()]


def test_smoke_configs_bound_every_evaluation():
    for task in ('knn', 'linear_probe', 'finetune'):
        c = config(f'cifar10_eval.py:task={task},smoke')
        assert 0 < c.knn.max_train <= 5000 and 0 < c.knn.max_test <= 1000
        assert 0 < c.probe.max_train <= 5000 and 0 < c.probe.max_test <= 1000
        assert 0 < c.finetune.max_test <= 1000
    for c in (config('cifar10.py:smoke'), config('imagenet.py:smoke')):
        assert 0 < c.knn.max_train <= 5000 and 0 < c.knn.max_test <= 1000
    assert 0 < config('ade20k_seg.py:smoke').seg.eval_max <= 100


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp('evp')
    return make_folder(base / 'imgs', per_class=16, splits=('train', 'test')), str(base / 'tfds')


# The quick start's command on the tiny folder: 4 steps, then the kNN monitor over 32 + 32 images in
# batches of 4; only the final step is a checkpoint.
def _flags(root, data_dir, wd):
    return ['--config=configs/cifar10.py:smoke', f'--workdir={wd}', f'--config.data.root={root}',
            f'--config.data.data_dir={data_dir}', '--config.batch_size=8', '--config.total_steps=4',
            '--config.ckpt.every_steps=100', '--config.knn.every_epochs=100', '--config.knn.batch_size=4',
            '--config.image_summary_every_epochs=0']


# The same command, its feature batches slowed down and announced, so that SIGTERM lands inside the pass.
_SLOW = textwrap.dedent('''
    import sys, time
    from colormae_jax import knn, main
    real = knn.make_feature_fn
    def slow(*a, **k):
        f = real(*a, **k)
        def g(p, x):
            print('FEATURE BATCH', flush=True)
            time.sleep(0.2)
            return f(p, x)
        return g
    knn.make_feature_fn = slow
    sys.argv = ['colormae_jax.main'] + sys.argv[1:]
    main.cli()
''')


def _run(args, **kw):
    env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True, **kw)


@pytest.mark.slow
def test_sigterm_during_the_final_knn_then_relaunch(folder, tmp_path):
    """SIGTERM during the kNN monitor after the last step: the step is saved already, the pass stops
    between two batches, the run exits 75; the relaunch trains nothing, runs the monitor once and
    writes the figures of an uninterrupted run."""
    root, data_dir = folder
    a, b = tmp_path / 'a', tmp_path / 'b'
    full = _run(['-m', 'colormae_jax.main', *_flags(root, data_dir, a)], stderr=subprocess.PIPE)
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]

    p = _run(['-c', _SLOW, *_flags(root, data_dir, b)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, batches = [], 0
    try:
        for line in p.stdout:
            out.append(line)
            batches += line.startswith('FEATURE BATCH')
            if batches == 3:  # the train features' third batch of 8
                assert os.listdir(b / 'checkpoints') == ['4']  # saved (and waited for) before the evaluation
                p.send_signal(signal.SIGTERM)
                break
        out.extend(p.stdout)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    out = ''.join(out)
    assert rc == main.EXIT_PREEMPTED == 75, out[-3000:]
    assert out.count('FEATURE BATCH') <= 4, out[-3000:]  # stopped within a batch, not after the 16 of the pass
    assert 'kNN monitor after step 4: stopped by SIGTERM after ' in out
    assert os.listdir(b / 'checkpoints') == ['4'] and not (b / 'knn.jsonl').exists()
    assert 'Stopped early (SIGTERM or deadline; exit code 75' in [x for x in out.splitlines() if x.strip()][-1]

    again = _run(['-m', 'colormae_jax.main', *_flags(root, data_dir, b)], stderr=subprocess.PIPE)
    err = again.stderr.read()
    assert again.wait(timeout=600) == 0, err[-3000:]
    assert 'Training is already complete (step 4 of 4)' in err and 'loss=' not in err  # nothing retrained
    assert 'The evaluation after step 4 did not finish before the run stopped: running it now.' in err
    assert (b / 'knn.jsonl').read_text() == (a / 'knn.jsonl').read_text()  # one line, the same figures
    assert json.loads((b / 'evaluated.json').read_text()) == json.loads((a / 'evaluated.json').read_text())


@pytest.mark.slow
def test_sigterm_during_a_probe_evaluation_then_resume(folder, tmp_path, monkeypatch):
    """The linear probe evaluates after steps 4, 8 and 12, each a checkpoint. SIGTERM during the
    evaluation after step 8: step 8 is saved, the run stops as preempted; the relaunch runs that
    evaluation, trains on to 12 and reports what an uninterrupted run reports."""
    root, data_dir = folder
    pre = smoke_config(root, data_dir, **{'image_summary_every_epochs': 0.0, 'total_steps': 2})
    main.run(pre, str(tmp_path / 'mae'), devices=DEV)
    c = config('cifar10_eval.py:task=linear_probe,smoke')
    c.data.root, c.data.data_dir, c.init_from = root, data_dir, str(tmp_path / 'mae')
    c.batch_size, c.total_steps, c.warmup_steps, c.eval_every_epochs = 8, 12, 2, 1.0
    c.ckpt.every_steps, c.ckpt.keep = 100, 3  # the checkpoints are those before each evaluation (and the last)
    full = main.run(c, str(tmp_path / 'a'), devices=DEV)
    assert sorted(os.listdir(tmp_path / 'a' / 'checkpoints'), key=int) == ['4', '8', '12']

    real, calls = loop.PassProgress.update, []

    def sigterm_in(what):
        def update(self, n):
            if what in self.what:
                calls.append(n)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
            return real(self, n)
        calls.clear()
        monkeypatch.setattr(loop.PassProgress, 'update', update)

    sigterm_in('linear probe: features')  # before the loop: nothing trained yet, nothing saved
    zeroth = main.run(c, str(tmp_path / 'b'), devices=DEV)
    assert zeroth['preempted'] and zeroth['results'] == {} and len(calls) == 2
    assert not (tmp_path / 'b' / 'checkpoints').exists() and not (tmp_path / 'b' / 'results.json').exists()
    sigterm_in('evaluation after step 8')
    first = main.run(c, str(tmp_path / 'b'), devices=DEV)
    assert first['preempted'] and first['step'] == 8 and len(calls) == 2
    assert first['losses'] == full['losses'][:8]
    assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints'), key=int) == ['4', '8']
    assert not (tmp_path / 'b' / 'results.json').exists()
    monkeypatch.setattr(loop.PassProgress, 'update', real)
    evaluated = []
    monkeypatch.setattr(evaluation.ClassifierTask, 'evaluate', lambda self, state, progress=None: evaluated.append(
        progress.what) or _evaluate(self, state, progress))
    second = main.run(c, str(tmp_path / 'b'), devices=DEV)
    assert [w.rsplit(' ', 1)[-1] for w in evaluated] == ['8', '12']  # the interrupted one, then the next
    assert not second['preempted'] and second['losses'] == full['losses'][8:]
    assert second['results'] == full['results']
    assert json.load(open(tmp_path / 'b' / 'results.json')) == json.load(open(tmp_path / 'a' / 'results.json'))


_evaluate = evaluation.ClassifierTask.evaluate
