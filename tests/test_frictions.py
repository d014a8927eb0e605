"""What a new user meets first: help on every command, one-line errors for a Hugging Face config.json
that disagrees with its weights, exports that re-import as they were written, short import summaries,
quiet reads of a run, data-root hints that name an existing folder, and the study's dry run."""
import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from colormae_jax import cli
from colormae_jax.checkpoints import checkpointer as checkpoint
from colormae_jax.errors import ConfigError
from colormae_jax.interop import torch_hf, weights
from colormae_jax.models import mae as M
from colormae_jax.tools import convert, seg_folder, visualize

from helpers import assert_identical, cifar10

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# outside the variant table (width 24, 3 heads) with a decoder that is not MAE's (16 x 1, 2 heads)
C = M.MAEConfig(image_size=32, patch=4, width=24, depth=2, mlp_dim=48, heads=3, dec_width=16, dec_depth=1,
                dec_heads=2)


def _run(*argv, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p):
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


# ------------------------------------------------------------------------------ help

@pytest.mark.slow
def test_help_on_every_command():
    """-h and --helpshort print the command's usage and exit 0 (absl alone: 'Unknown command line
    flag h', and exit 1 after --helpshort)."""
    absl = {'tools.noise': ['-m', 'colormae_jax.tools.noise'], 'study': ['benchmarks/cifar10_study.py'],
            'main': ['-m', 'colormae_jax.main']}
    procs = {(name, flag): _run(*argv, flag) for name, argv in absl.items() for flag in ('-h', '--helpshort')}
    for (name, flag), p in procs.items():
        rc, out, err = _finish(p)
        assert rc == 0, (name, flag, err[-500:])
        assert 'flags:' in out, (name, flag)
    assert '--workdir' in _finish(_run('-m', 'colormae_jax.main', '-h'))[1]  # cli's flags, not only main's


def test_help_of_the_argparse_tools(capsys):
    for main, argv in [(convert.main, []), (convert.main, ['import']), (convert.main, ['export']),
                       (visualize.main, []), (seg_folder.main, [])]:
        for flag in ('-h', '--helpshort'):
            with pytest.raises(SystemExit) as e:
                main([*argv, flag])
            assert e.value.code == 0
            assert 'usage:' in capsys.readouterr().out


# ------------------------------------------------------------------------------ config.json against the weights

def _hf_folder(path, **edits):
    torch_hf.export_hf(M.init_mae_params(C, 0), C, str(path))
    cfg_path = path / 'config.json'
    cfg = json.loads(cfg_path.read_text())
    cfg.update(edits)
    cfg_path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize('key,value,found,what', [
    ('hidden_size', 32, 24, "the patch embedding's output width"),
    ('num_hidden_layers', 3, 2, 'encoder blocks'),
    ('decoder_intermediate_size', 64, 64, None),  # agrees: a multiple of the decoder width
    ('image_size', 64, 32, "the position table's grid x patch"),
])
def test_a_config_json_that_disagrees_with_its_weights(tmp_path, capsys, key, value, found, what):
    src = _hf_folder(tmp_path / 'hf', **{key: value})
    rc = convert.main(['import', src, str(tmp_path / 'out')])
    err = capsys.readouterr().err
    if what is None:
        assert rc == 0, err
        return
    want = (f'error: {src}/config.json: {key} is {value}, but the weights say {found} ({what}); fix config.json '
            f'to match the weights')
    assert rc == 2 and err.startswith(want) and err.count('\n') == 1, err
    with pytest.raises(ConfigError) as e:  # init_from: the same words, after the key
        weights.load_pretrained(src)
    line = cli.error_line(e.value)
    assert line.startswith(f"error: config.init_from: cannot read pre-trained params from '{src}': {src}/config.json:"
                           f' {key} is {value}, but the weights say {found}'), line


def test_heads_that_do_not_divide_the_width(tmp_path, capsys):
    src = _hf_folder(tmp_path / 'hf', num_attention_heads=5)
    assert convert.main(['import', src, str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.startswith(f'error: {src}/config.json: num_attention_heads is 5, which does not '
                                              f'divide hidden_size 24')


# ------------------------------------------------------------------------------ exports re-import as written

@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """An import folder of the model C (random weights)."""
    params = M.init_mae_params(C, 3)
    return weights.save_params(str(tmp_path_factory.mktemp('src') / 'params'), params, C), params


def test_exports_carry_what_their_import_needs(source, tmp_path, capsys):
    pytest.importorskip('torch')
    src, params = source
    for layout, ext in [('mae', '.pth'), ('mmpretrain', '.pth'), ('timm', '.pth'), ('mae', '.safetensors')]:
        for decoder in ((False, True) if layout != 'timm' else (False,)):
            out = str(tmp_path / f'{layout}{"_dec" if decoder else ""}{ext}')
            assert convert.main(['export', src, out, '--layout', layout] + ['--with_decoder'] * decoder) == 0
            capsys.readouterr()
            dst = str(tmp_path / f'imp_{layout}{decoder}{ext}')
            assert convert.main(['import', out, dst]) == 0, capsys.readouterr().err  # no --heads, --dec_heads
            printed = capsys.readouterr().out
            assert f': layout {layout}.' in printed.splitlines()[0], printed
            back, c = weights.load_params(dst)
            assert (c.heads, c.dec_heads, c.dec_width) == (3, 2, 16)
            if decoder:
                assert_identical(back, params)
            else:  # an encoder-only import: a few lines; the decoder's 19 arrays behind --verbose
                assert len(printed.splitlines()) <= 7 and 'decoder/blocks/0/attn/qkv/kernel' not in printed
                assert 'Left at their initialisation (19): the whole decoder' in printed
                assert_identical(back['encoder'], params['encoder'])
    # init_from reads the same settings
    _, c, what = weights.load_any_params(str(tmp_path / 'mae_dec.pth'))
    assert c.dec_heads == 2 and what.startswith('mae weights')
    # --verbose lists every parameter left at its initialisation
    assert convert.main(['import', str(tmp_path / 'mae.pth'), str(tmp_path / 'v'), '--verbose']) == 0
    printed = capsys.readouterr().out
    assert '  decoder/blocks/0/attn/qkv/kernel' in printed and len(printed.splitlines()) > 19
    # without its settings, a .pth is a foreign file again: the heads are asked for
    os.remove(str(tmp_path / 'mae_dec.pth') + '.json')
    assert convert.main(['import', str(tmp_path / 'mae_dec.pth'), str(tmp_path / 'x')]) == 2
    assert '--heads N' in capsys.readouterr().err
    # settings that belong to another export are refused, naming the file
    meta = torch_hf.export_meta(M.MAEConfig(), 'mae', False)
    with open(str(tmp_path / 'mae.pth') + '.json', 'w') as f:
        json.dump(meta, f)
    assert convert.main(['import', str(tmp_path / 'mae.pth'), str(tmp_path / 'y')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {tmp_path / "mae.pth"}.json: width is 768, but the weights say 24'), err


def test_reading_a_run_prints_no_read_only_warnings(tmp_path, caplog):
    config = cifar10.get_config('smoke')
    c = M.mae_config(config.model, config.data.image_size)
    ckpt = checkpoint.Checkpointer(str(tmp_path / 'wd' / 'checkpoints'), async_save=False)
    ckpt.save(2, {'step': jnp.asarray(2, jnp.int32), 'params': M.init_mae_params(c, 0), 'opt_state': {}}, None,
              config, force=True)
    ckpt.close()
    with caplog.at_level(logging.INFO):
        weights.load_any_params(str(tmp_path / 'wd'))
        assert weights.run_config(str(tmp_path / 'wd'))[1] == 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------ data-root hints

def test_data_root_hint_names_a_folder_that_exists(tmp_path, monkeypatch):
    msg = ("config.data.root: '../shared/data/cifar10' (resolved: /x) is not a directory; point it at a folder "
           "laid out as <root>/<split>/<class>/*.jpg, e.g. --config.data.root=../shared/data/cifar10")
    repo = tmp_path / 'repo'
    (tmp_path / 'shared' / 'data' / 'cifar10').mkdir(parents=True)
    repo.mkdir()
    elsewhere = tmp_path / 'a' / 'elsewhere'  # ../shared from here does not exist
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(cli, 'REPO_ROOT', str(repo))
    assert cli.error_line(ConfigError('data.root', msg.split(': ', 1)[1])).endswith(
        f'e.g. --config.data.root={tmp_path / "shared" / "data" / "cifar10"}')
    monkeypatch.setattr(cli, 'REPO_ROOT', str(tmp_path / 'x' / 'repo'))  # no ../shared beside it
    hint = cli.data_root_hint(msg)
    assert hint.endswith(f'--config.data.root=/ABSOLUTE/PATH/TO/cifar10 (the folder of train/ and test/; a relative '
                         f'path is read from the working directory, {elsewhere})')
    monkeypatch.chdir(repo)  # from where the relative path exists, it stays as it is
    assert cli.data_root_hint(msg) == msg
    assert cli.data_root_hint(msg, '--config c.py:root={}').endswith('e.g. --config c.py:root=../shared/data/cifar10')


# ------------------------------------------------------------------------------ quiet tools, the study, the docs

@pytest.mark.slow
def test_noise_tool_and_study_dry_runs(tmp_path):
    """tools.noise prints its own lines only (no libtpu line); the study's dry runs are costed for the
    CPU (smoke) and say the rate and recipe they assume (full); a missing --root is one line."""
    noise = _run('-m', 'colormae_jax.tools.noise', '--out', str(tmp_path / 'b.npz'), '--size', '4', '--side', '16',
                 '--grid', '8')
    smoke = _run('benchmarks/cifar10_study.py', '--dry_run')
    full = _run('benchmarks/cifar10_study.py', '--dry_run', '--preset', 'full')
    bad = _run(os.path.join(REPO, 'benchmarks', 'cifar10_study.py'), '--root', 'nowhere', cwd=str(tmp_path))
    rc, out, err = _finish(noise)
    assert rc == 0 and out.startswith('wrote') and err == '', err
    rc, out, err = _finish(smoke)
    assert rc == 0 and 'img/s' not in out and 'on this cpu backend, at the times measured' in out, out
    assert out.splitlines()[-1] == 'total: about 128 s (2.1 min, 8 s start included)' and err == '', err
    rc, out, _ = _finish(full)
    assert rc == 0 and 'at 20000 img/s (the default: an estimate' in out
    assert '26 epochs per mask: the 200-epoch recipe of configs/cifar10.py scaled to the budget' in out
    assert 'this backend is cpu: the full preset is sized for one GPU' in out
    rc, out, err = _finish(bad)
    assert rc == 2 and err.startswith('error: --root nowhere (read from the working directory') and \
        err.count('\n') == 1, err


def test_study_output_is_ignored_and_docs_do_not_overwrite_tracked_figures():
    if not os.path.isdir(os.path.join(REPO, '.git')):
        pytest.skip('not a git checkout')
    r = subprocess.run(['git', 'check-ignore', '-q', 'study_out/results.json'], cwd=REPO)
    assert r.returncode == 0  # ignored
    tracked = subprocess.run(['git', 'ls-files', 'docs/figures'], cwd=REPO, capture_output=True, text=True).stdout
    api = open(os.path.join(REPO, 'docs', 'api.md')).read()
    for fig in tracked.split():
        assert 'tools.visualize' not in api or f'--out {fig}' not in api, fig


def test_seg_folder_tool(tmp_path, capsys):
    root = str(tmp_path / 'seg')
    assert seg_folder.main([root, '--train', '2', '--val', '1']) == 0
    assert sorted(os.listdir(os.path.join(root, 'images', 'train'))) == ['000.jpg', '001.jpg']
    lab = np.asarray(__import__('PIL.Image').Image.open(os.path.join(root, 'annotations', 'val', '000.png')))
    assert lab.shape == (40, 48) and set(np.unique(lab)) <= {0, 1, 2, 3}
    assert f'--config.data.root={root}' in capsys.readouterr().out
    assert seg_folder.main([root]) == 2  # never overwritten
    assert capsys.readouterr().err.startswith(f'error: {root}: exists and is not an empty folder')
