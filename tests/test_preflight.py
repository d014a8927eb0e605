"""The pre-flight check (colormae_jax.tools.preflight): real steps compiled for a TPU slice and an H100
node that are not attached, a config too big for its slice refused with a change that fits, and the
layer forms following the mesh's platform (a TPU program holds none of the XLA:CPU forms)."""
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from colormae_jax import config_lib, masking, parallel, topologies
from colormae_jax.models import mae as model_lib
from colormae_jax.tasks import pretrain
from colormae_jax.tools import preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'configs/imagenet.py:smoke,mask=famt'  # mu/16 at 64 px, batch 8; FAMT from step 2: every program kind
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def _cuda_python() -> str | None:
    """A Python with the CUDA plugin: COLORMAE_CUDA_PYTHON (.ci/run makes one), or this one if it has it."""
    if os.environ.get('COLORMAE_CUDA_PYTHON'):
        return os.environ['COLORMAE_CUDA_PYTHON']
    try:
        return sys.executable if importlib.util.find_spec('jax_plugins.xla_cuda12') else None
    except ModuleNotFoundError:
        return None


def run(args, tmp_path, python=sys.executable, name='out.json'):
    out = tmp_path / name
    r = subprocess.run([python, '-m', 'colormae_jax.tools.preflight', *args, f'--json={out}'], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    doc = json.loads(out.read_text()) if out.exists() else None
    return r, doc


def rows(doc, target):
    return doc['targets'][target]['rows']


# ------------------------------------------------------------------------------ no compiler needed

@pytest.mark.parametrize('name, want', [
    ('v5e-16', ('tpu', 'v5e', 'v5e:4x4')), ('v5e-64', ('tpu', 'v5e', 'v5e:8x8')),
    ('v4-32', ('tpu', 'v4', 'v4:2x2x4')), ('v5p-64', ('tpu', 'v5p', 'v5p:2x4x4')),
    ('v6e-256', ('tpu', 'v6e', 'v6e:16x16')), ('v5e:2x4', ('tpu', 'v5e', 'v5e:2x4')),
])
def test_tpu_names(name, want):
    platform, kind, args = topologies.parse(name)
    assert (platform, kind, args['topology']) == want


def test_gpu_names():
    assert topologies.parse('h100:8') == ('gpu', 'h100', {'hosts': 1, 'gpus': 8})
    assert topologies.parse('H200:2x8') == ('gpu', 'h200', {'hosts': 2, 'gpus': 8})
    assert topologies.parse('a100') == ('gpu', 'a100', {'hosts': 1, 'gpus': 8})


@pytest.mark.parametrize('name, says', [
    ('v9-16', "unknown TPU 'v9'"), ('v5e-12', 'no v5e slice of 12 chips'), ('v4:4x4', 'v4 slices have 3 sides'),
    ('h100:9', '1 to 8 GPUs'), ('tpu-16', 'not a topology name'), ('4x4', 'not a topology name'),
])
def test_bad_names(name, says):
    with pytest.raises(topologies.TopologyError, match=says):
        topologies.parse(name)


def test_gpu_without_target_config_is_refused(monkeypatch):
    monkeypatch.setattr(topologies, 'check_plugin', lambda *a: None)
    with pytest.raises(topologies.TopologyError, match=r"no target config for GPU kind 'b200'; built in: a100, h100"):
        topologies.resolve('b200:8')


def test_missing_compilers_name_what_to_install(monkeypatch):
    monkeypatch.setattr(topologies.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(topologies.TopologyError, match=r'--topology=v5e-16: compiling for TPU needs libtpu.*'
                                                        r'pip install -e "\.\[tpu\]"'):
        topologies.check_plugin('tpu', 'v5e-16')
    with pytest.raises(topologies.TopologyError, match=r'needs the CUDA plugin.*pip install -e "\.\[cuda\]"'):
        topologies.check_plugin('gpu', 'h100:8')


def test_count_of_products_and_scans():
    def f(x, w, ws):
        y = x @ w  # 2 * 8 * 16 * 32
        y, _ = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), y, ws)  # 3 x 2 * 8 * 32 * 32
        return y.sum()
    args = (jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones((3, 32, 32)))
    flops, nbytes = preflight.count(jax.make_jaxpr(f)(*args).jaxpr)
    assert flops == 2 * 8 * 16 * 32 + 3 * 2 * 8 * 32 * 32
    assert nbytes == 4 * (8 * 16 + 16 * 32 + 8 * 32) + 3 * 4 * (8 * 32 + 32 * 32 + 8 * 32)
    grad_flops, _ = preflight.count(jax.make_jaxpr(jax.grad(f, argnums=1))(*args).jaxpr)
    # the forward, then dw = x^T dy for the first product and dc = dy wi^T through the scan (ws is not differentiated)
    assert grad_flops == flops + 2 * 8 * 16 * 32 + 3 * 2 * 8 * 32 * 32


def test_layer_forms_follow_the_target_platform():
    assert model_lib.cpu_forms('auto') == model_lib.CPU_FORMS  # the tests' backend is the CPU
    with model_lib.forms_for('tpu'):
        assert model_lib.cpu_forms('auto') == frozenset()
        assert model_lib.cpu_forms('cpu') == model_lib.CPU_FORMS  # asked for by name: kept
    config = config_lib.load_config_file(os.path.join(REPO, 'configs/imagenet.py:smoke'))
    mesh = parallel.make_mesh(config.mesh)
    t = pretrain.make_trainer(config, mesh, 10)
    step = pretrain.compile_step(t, masking.create(config.mask, t.mae.grid), parallel.replicated(mesh))
    batch = preflight.image_batch(8, 64, config.data, mesh)
    cpu = preflight.cpu_forms_in(step.trace(t.abstract_state, batch, ()).lower())
    assert cpu == ['_attention_core', '_layer_norm']  # the check sees the forms where they are
    with model_lib.forms_for(jax.sharding.Mesh(jax.devices()[:1], ('data',))):
        assert model_lib.forms_platform() == 'cpu'


def _one_error_line(r, *want):
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(('WARNING', 'I0000', 'E0000'))]
    errors = [x for x in lines if x.startswith('error: ')]
    assert r.returncode == 2 and len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    for w in want:
        assert w in errors[0], errors[0]


@pytest.mark.slow
def test_bad_input_is_one_error_line(tmp_path):
    r, _ = run(['--config', TINY, '--topology=v5e:3x3x3'], tmp_path)
    _one_error_line(r, 'error: --topology=v5e:3x3x3:', 'v5e slices have 2 sides')
    r, _ = run(['--config', TINY, '--topology=b200:8'], tmp_path)
    if _cuda_python() == sys.executable:
        _one_error_line(r, "no target config for GPU kind 'b200'", '--target_config=b200=FILE.txtpb')
    else:
        _one_error_line(r, 'needs the CUDA plugin', 'pip install -e ".[cuda]"')
    r, _ = run(['--config', TINY, '--topology=v5e-16', '--config.batch_size=6'], tmp_path)
    if HAS_LIBTPU:
        _one_error_line(r, 'config.batch_size: 6 is not divisible by the 4 hosts')
    else:
        _one_error_line(r, 'needs libtpu', 'pip install -e ".[tpu]"')


# ------------------------------------------------------------------------------ compiled for a TPU slice

needs_tpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed: pip install -e ".[tpu]"')


@needs_tpu
@pytest.mark.slow
def test_tiny_model_fits_v5e_2x2_with_fsdp_1_and_2(tmp_path):
    r, doc = run(['--config', TINY, '--topology=v5e:2x2'], tmp_path, name='fsdp1.json')
    assert r.returncode == 0, r.stderr[-3000:]
    one = rows(doc, 'v5e:2x2')
    assert set(one) == {'step random 0.75', 'step famt 0.45/0.4', 'FAMT weight pass', 'kNN feature pass'}
    assert doc['targets']['v5e:2x2']['fits'] and all(x['fits'] for x in one.values())
    for x in one.values():
        assert x['cpu_forms'] == []  # traced for TPU from a CPU host: no XLA:CPU form
        assert x['xla_tflop_per_device'] > 0 and x['analytic_tflop'] > 0 and 0 < x['peak_bytes'] < 2 ** 30
    # masking 0.45 and throwing 0.40 computes less than masking 0.75 (10 visible of 16 against 4 ...
    # the encoder shrinks, the decoder grows): the two counts agree on which step is the larger
    a, b = one['step random 0.75'], one['step famt 0.45/0.4']
    assert (a['analytic_tflop'] > b['analytic_tflop']) == (a['xla_tflop_per_device'] > b['xla_tflop_per_device'])
    assert 'fits' in r.stdout and 'not measurements' in r.stdout

    r, doc = run(['--config', TINY, '--topology=v5e:2x2', "--config.mesh=(('data', -1), ('fsdp', 2))",
                  '--programs=step'], tmp_path, name='fsdp2.json')
    assert r.returncode == 0, r.stderr[-3000:]
    two = rows(doc, 'v5e:2x2')
    assert set(two) == {'step random 0.75', 'step famt 0.45/0.4'} and all(x['fits'] for x in two.values())
    assert two['step random 0.75']['state_bytes'] < one['step random 0.75']['state_bytes']  # sharded over fsdp

    # the CPU forms asked for by name: the TPU program holds them, and the check says so
    r, doc = run(['--config', 'configs/imagenet.py:smoke', '--topology=v5e:2x2', '--config.model.attn_impl=cpu',
                  '--programs=step'], tmp_path, name='forms.json')
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows(doc, 'v5e:2x2')['step random 0.75']['cpu_forms'] == ['_attention_core', '_layer_norm']


@needs_tpu
@pytest.mark.slow
def test_fine_tuning_and_segmentation_compile_for_tpu_slices(tmp_path):
    r, doc = run(['--config', 'configs/imagenet_eval.py:task=finetune', '--config.data.image_size=32',
                  '--config.batch_size=8', '--encoder=mu/16', '--topology=v5e:2x2'], tmp_path, name='ft.json')
    assert r.returncode == 0, r.stderr[-3000:]
    ft = rows(doc, 'v5e:2x2')
    assert set(ft) == {'train step', 'eval step'} and all(x['fits'] and x['cpu_forms'] == [] for x in ft.values())
    assert ft['train step']['analytic_tflop'] > 2 * ft['eval step']['analytic_tflop']  # forward and backward
    # v5e-16 is 4 hosts: the evaluation, on one host's devices, compiles for one host's worth of chips
    r, doc = run(['--config', 'configs/ade20k_seg.py:smoke', '--config.batch_size=16', '--encoder=mu/16',
                  '--num_examples=64', '--topology=v5e-16'], tmp_path, name='seg.json')
    assert r.returncode == 0, r.stderr[-3000:]
    assert doc['targets']['v5e-16']['processes'] == 4 and 'batch 4 per host' in r.stdout
    seg = rows(doc, 'v5e-16')
    assert set(seg) == {'train step', 'eval windows'} and all(x['fits'] and x['cpu_forms'] == [] for x in seg.values())


@needs_tpu
@pytest.mark.slow
def test_sigterm_stops_within_seconds_and_the_same_command_resumes(tmp_path):
    out = tmp_path / 'r.json'
    cmd = [sys.executable, '-m', 'colormae_jax.tools.preflight', '--config', TINY, '--topology=v5e:2x2',
           f'--json={out}']
    log = tmp_path / 'stderr.txt'
    with open(log, 'w') as err:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 600
        while 'compiling 2/4' not in log.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # SIGTERM once the first program is written and the second compiles
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 75, log.read_text()[-3000:]
    first = json.loads(out.read_text())['targets']['v5e:2x2']['rows']
    assert list(first) == ['step random 0.75']
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(out.read_text())['targets']['v5e:2x2']['rows']
    assert len(again) == 4 and again['step random 0.75'] == first['step random 0.75']  # not compiled again
    assert 'compiling 1/4' not in r.stderr and 'compiling 2/4' in r.stderr


@needs_tpu
@pytest.mark.slow
def test_too_big_for_the_slice_gets_a_change_that_fits(tmp_path):
    # a one-block decoder 12288 wide: 1.8e9 params, 20 GiB of params and Adam state against 16 GiB per chip
    big = ['--config', 'configs/imagenet.py:smoke', '--config.model.decoder.width=12288', '--topology=v5e:2x2',
           '--programs=step']
    r, doc = run(big, tmp_path, name='big.json')
    assert r.returncode == 0, r.stderr[-3000:]
    target = doc['targets']['v5e:2x2']
    step = target['rows']['step random 0.75']
    assert not target['fits'] and not step['fits'] and step['peak_bytes'] > 16 * 2 ** 30
    assert 'RESOURCE_EXHAUSTED' in step['refused']  # XLA's refusal is a row, not a crash
    overrides = target['suggestion']['overrides']
    assert overrides.startswith('--config.') and overrides in r.stdout
    assert 'does not fit' in r.stdout
    r, doc = run(big + shlex.split(overrides), tmp_path, name='fixed.json')  # pasted: it fits
    assert r.returncode == 0, r.stderr[-3000:]
    assert doc['targets']['v5e:2x2']['fits'], doc['targets']['v5e:2x2']


# ------------------------------------------------------------------------------ compiled for H100s

@pytest.mark.slow
@pytest.mark.skipif(_cuda_python() is None, reason='no CUDA plugin: pip install -e ".[cuda]" (or '
                                                   'COLORMAE_CUDA_PYTHON, as .ci/run sets it)')
def test_tiny_model_fits_h100_and_too_big_gets_a_change(tmp_path):
    py = _cuda_python()
    r, doc = run(['--config', TINY, '--topology=h100:8', '--programs=step'], tmp_path, python=py)
    assert r.returncode == 0, r.stderr[-3000:]
    t = doc['targets']['h100:8']
    assert t['fits'] and t['chip']['memory_bytes'] == 84942979072 and t['devices'] == 8
    for x in t['rows'].values():
        assert x['fits'] and x['cpu_forms'] == [] and x['analytic_tflop'] > 0
    # four decoder blocks 12288 wide: 7.2e9 params, 81 GiB of params and Adam state against 79 GiB per card
    big = ['--config', 'configs/imagenet.py:smoke', '--config.model.decoder.width=12288',
           '--config.model.decoder.depth=4', '--topology=h100:4', '--programs=step']
    r, doc = run(big, tmp_path, python=py, name='big.json')
    assert r.returncode == 0, r.stderr[-3000:]
    t = doc['targets']['h100:4']
    assert not t['fits'] and t['rows']['step random 0.75']['peak_bytes'] > 84942979072
    overrides = t['suggestion']['overrides']
    assert overrides.startswith('--config.') and overrides in r.stdout
    r, doc = run(big + shlex.split(overrides), tmp_path, python=py, name='fixed.json')
    assert r.returncode == 0 and doc['targets']['h100:4']['fits'], r.stderr[-3000:]
