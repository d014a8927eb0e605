"""PyTorch interop (colormae_jax.tools.convert) against a plain-PyTorch MAE with the official names."""
import argparse
import dataclasses
import os
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from colormae_jax import masking  # noqa: E402
from colormae_jax.checkpoints import checkpointer as checkpoint  # noqa: E402
from colormae_jax.interop import weights  # noqa: E402
from colormae_jax.models import mae as M  # noqa: E402
from colormae_jax.tools import convert  # noqa: E402

import torch_mae  # noqa: E402
from helpers import assert_identical, cifar10, rel  # noqa: E402

C = M.MAEConfig(image_size=32, patch=4, width=32, depth=2, mlp_dim=128, heads=2, dec_width=32, dec_depth=1,
                dec_heads=2, attn_impl='einsum')
B, N, V = 3, 64, 16


@pytest.fixture(scope='module')
def ref():
    return torch_mae.randomize(torch_mae.MaskedAutoencoderViT(), seed=0).eval()


@pytest.fixture(scope='module')
def batch():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, 32, 32, 3)).astype(np.float32)
    order = np.stack([rng.permutation(N) for _ in range(B)]).astype(np.int32)
    return images, order[:, :V], order[:, V:]


def merge(params, c=C):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: M.MAE(c, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params)


def ours_random(seed=3):
    return nnx.to_pure_dict(nnx.split(M.MAE(C, rngs=nnx.Rngs(seed)))[1])


def nchw(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_forward_matches_reference(ref, batch):
    images, vis, msk = batch
    params, report = convert.import_torch(ref.state_dict(), C)
    assert report.layout == 'mae' and not report.unfilled and not report.unused and not report.notes
    model = merge(params)
    part = masking.Partition(jnp.asarray(vis), jnp.zeros((B, 0), jnp.int32), jnp.asarray(msk))
    (loss, pred), latent = jax.jit(lambda x: (model(x, part), model.encoder(x, part.visible)))(jnp.asarray(images))
    with torch.no_grad():
        t_loss, t_pred, t_latent = ref(nchw(images), torch.from_numpy(vis).long(), torch.from_numpy(msk).long())
    assert rel(loss, t_loss) < 1e-5
    assert rel(latent, t_latent) < 1e-5
    assert rel(pred, t_pred) < 1e-5
    # The model inferred from the shapes (heads given: the tiny model is no variant) is the same.
    inferred, _ = convert.infer_config(ref.state_dict(), heads=2, dec_heads=2)
    assert inferred == dataclasses.replace(C, attn_impl='auto')


def test_export_import_bit_identical(ref, tmp_path):
    params = ours_random()
    for layout in ('mae', 'mmpretrain'):
        path = str(tmp_path / f'{layout}.pth')
        convert.export_torch(params, C, path, layout=layout, with_decoder=True)
        back, report = convert.import_torch(path, C)
        assert report.layout == layout and not report.unfilled and not report.unused and not report.notes
        assert_identical(back, params)
    # The official-layout file loads strictly into MaskedAutoencoderViT, sin-cos tables included.
    saved = torch.load(str(tmp_path / 'mae.pth'), weights_only=True)
    assert list(saved) == ['model']
    target = torch_mae.MaskedAutoencoderViT()
    target.load_state_dict(saved['model'], strict=True)
    for key in ('pos_embed', 'decoder_pos_embed'):
        np.testing.assert_allclose(saved['model'][key], ref.state_dict()[key], atol=1e-6)


def test_timm_export_loads_into_reference_encoder(batch, tmp_path):
    images = batch[0]
    params = ours_random()
    path = str(tmp_path / 'timm.pth')
    sd = convert.export_torch(params, C, path, layout='timm')
    assert not any(k.startswith(('decoder', 'mask_token', 'head')) for k in sd)
    vit = torch_mae.VisionTransformer()
    vit.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        want = vit.forward_encoder(nchw(images))
    got = merge(params).encoder(jnp.asarray(images))
    assert rel(got, want) < 1e-5
    # Back again: the encoder is filled, the decoder keeps its initialisation and is listed.
    back, report = convert.import_torch(path, C, seed=3)
    assert report.layout == 'timm' and not report.unused
    assert report.unfilled and all(p.startswith('decoder/') for p in report.unfilled)
    assert_identical(back, params)  # same seed: the decoder's init is the one `params` was made with
    with pytest.raises(convert.ConversionError, match='no decoder'):
        convert.export_torch(params, C, layout='timm', with_decoder=True)


def to_mmpretrain(sd, c=C):
    """The official names -> mmpretrain's MAE (MAEViT + MAEPretrainDecoder), written out by hand."""
    def block(rest):
        for a, b in (('norm1.', 'ln1.'), ('norm2.', 'ln2.'), ('mlp.fc1.', 'ffn.layers.0.0.'),
                     ('mlp.fc2.', 'ffn.layers.1.')):
            if rest.startswith(a):
                return b + rest[len(a):]
        return rest

    out = {}
    for k, v in sd.items():
        if k in ('cls_token', 'pos_embed'):
            k = 'backbone.' + k
        elif k.startswith('patch_embed.proj.'):
            k = 'backbone.patch_embed.projection.' + k.split('.')[-1]
        elif k.startswith('blocks.'):
            _, i, rest = k.split('.', 2)
            k = f'backbone.layers.{i}.{block(rest)}'
        elif k.startswith('norm.'):
            k = 'backbone.ln1.' + k.split('.')[-1]
        elif k.startswith('decoder_blocks.'):
            _, i, rest = k.split('.', 2)
            k = f'neck.decoder_blocks.{i}.{block(rest)}'
        elif k.startswith('decoder_norm.'):
            k = 'neck.ln1.' + k.split('.')[-1]
        else:  # mask_token, decoder_pos_embed, decoder_embed.*, decoder_pred.*
            k = 'neck.' + k
        out[k] = v
    # mmpretrain builds its tables with meshgrid(indexing='ij'), and saves the preprocessor's buffers.
    out['backbone.pos_embed'] = torch_mae.mmpretrain_sincos_pos_embed(c.grid, c.width)
    out['neck.decoder_pos_embed'] = torch_mae.mmpretrain_sincos_pos_embed(c.grid, c.dec_width)
    out['data_preprocessor.mean'] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    out['data_preprocessor.std'] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return out


def test_mmpretrain_layout_equals_official(ref, tmp_path):
    official, _ = convert.import_torch(ref.state_dict(), C)
    path = str(tmp_path / 'mmpretrain.pth')
    torch.save({'meta': {'epoch': 3}, 'state_dict': to_mmpretrain(ref.state_dict())}, path)
    params, report = convert.import_torch(path, C)
    assert report.layout == 'mmpretrain' and not report.unfilled
    assert report.unused == ['data_preprocessor.mean', 'data_preprocessor.std']
    assert len(report.notes) == 2 and all('rows and columns swapped' in n for n in report.notes)
    assert_identical(params, official)


def test_official_wrappers_and_prefixes(ref, tmp_path):
    path = str(tmp_path / 'official.pth')
    sd = {'module.' + k: v for k, v in ref.state_dict().items()}
    torch.save({'model': sd, 'epoch': 799, 'args': argparse.Namespace(norm_pix_loss=True, mask_ratio=0.75)}, path)
    params, report = convert.import_torch(path, C)
    assert report.layout == 'mae' and not report.unused and "['model']" in report.source
    assert_identical(params, convert.import_torch(ref.state_dict(), C)[0])


class NotATensor:
    pass


def test_unreadable_files_say_why(ref, tmp_path):
    good = str(tmp_path / 'good.pth')
    torch.save({'model': ref.state_dict()}, good)
    raw = open(good, 'rb').read()
    cut = str(tmp_path / 'cut.pth')
    open(cut, 'wb').write(raw[:len(raw) // 2])
    with pytest.raises(convert.ConversionError, match='truncated or corrupt'):
        convert.import_torch(cut, C)
    with pytest.raises(convert.ConversionError, match='no such file'):
        convert.import_torch(str(tmp_path / 'missing.pth'), C)
    listing = str(tmp_path / 'list.pth')
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(convert.ConversionError, match='holds a list, not a dict'):
        convert.import_torch(listing, C)
    pickled = str(tmp_path / 'object.pth')
    torch.save({'model': ref.state_dict(), 'extra': NotATensor()}, pickled)
    with pytest.raises(convert.ConversionError) as e:
        convert.import_torch(pickled, C)
    msg = str(e.value)  # leads with the refusal; the recipe for a trusted file comes after
    assert msg.startswith(f'{pickled} was not loaded: it would run code when loaded (')
    assert 'Python objects besides tensors, first: ' in msg and 'NotATensor' in msg
    assert msg.index('Only if you trust the file') > msg.index('was not loaded') and 'weights_only=False' in msg
    with pytest.raises(convert.ConversionError, match='unknown key layout'):
        convert.import_torch({'fc.weight': torch.zeros(2, 2)}, C)


def test_non_finite_weights_are_refused(ref, tmp_path):
    sd = dict(ref.state_dict())
    sd['blocks.0.attn.qkv.weight'] = sd['blocks.0.attn.qkv.weight'].clone()
    sd['blocks.0.attn.qkv.weight'][3, 5] = float('nan')
    sd['blocks.1.mlp.fc2.bias'] = torch.full_like(sd['blocks.1.mlp.fc2.bias'], float('inf'))
    path = str(tmp_path / 'nan.pth')
    torch.save({'model': sd}, path)
    with pytest.raises(convert.ConversionError, match=re.escape(
            f"{path} ['model']: 'blocks.0.attn.qkv.weight' holds NaN or infinite values (1 of 3072)")):
        convert.import_torch(path, C)
    assert convert.main(['import', path, str(tmp_path / 'out'), '--heads', '2', '--dec_heads', '2']) == 2
    assert not os.path.exists(tmp_path / 'out')
    half = {k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    half['norm.bias'] = torch.full_like(half['norm.bias'], float('-inf'))  # float16 too
    with pytest.raises(convert.ConversionError, match="'norm.bias' holds NaN or infinite values"):
        convert.import_torch(half, C)


def test_shape_mismatch_names_the_key(ref):
    sd = dict(ref.state_dict())
    sd['blocks.1.mlp.fc1.weight'] = torch.zeros(64, 32)
    with pytest.raises(convert.ConversionError) as e:
        convert.import_torch(sd, C)
    msg = str(e.value)
    assert "'blocks.1.mlp.fc1.weight' has shape (64, 32); the config needs (128, 32)" in msg
    assert 'encoder/blocks/1/mlp/fc1/kernel' in msg
    with pytest.raises(convert.ConversionError, match="'cls_token' has shape \\(1, 1, 32\\); the config needs "
                                                      "\\(1, 1, 768\\)"):
        convert.import_torch(ref.state_dict(), dataclasses.replace(C, width=768, heads=12, mlp_dim=3072))
    with pytest.raises(convert.ConversionError, match='the checkpoint has 2 encoder blocks, the config 12'):
        convert.import_torch(ref.state_dict(), dataclasses.replace(C, depth=12))
    with pytest.raises(convert.ConversionError, match='none of our variants .*--heads N'):
        convert.infer_config(ref.state_dict())


def test_without_torch_the_tool_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch', None)
    with pytest.raises(convert.ConversionError, match=r'pip install -e "\.\[torch\]"'):
        convert.load_torch_file(__file__)


def test_cli_import_then_export(ref, tmp_path, capsys):
    src, dst, out = str(tmp_path / 'ref.pth'), str(tmp_path / 'params'), str(tmp_path / 'timm.pth')
    torch.save({'model': ref.state_dict()}, src)
    assert convert.main(['import', src, dst, '--heads', '2', '--dec_heads', '2']) == 0
    printed = capsys.readouterr().out
    assert 'layout mae' in printed and 'Filled 48 of 48 parameter arrays.' in printed and 'Wrote' in printed
    params, c = weights.load_params(dst)
    assert c == dataclasses.replace(C, attn_impl='auto')
    assert_identical(params, convert.import_torch(ref.state_dict(), C)[0])
    assert convert.main(['export', dst, out, '--layout', 'timm']) == 0
    vit = torch_mae.VisionTransformer()
    vit.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for k, v in vit.state_dict().items():
        if k == 'pos_embed':  # ours vs MAE's float32 numpy table: ~1e-7 apart
            np.testing.assert_allclose(v.numpy(), ref.state_dict()[k].numpy(), atol=1e-6)
        else:
            np.testing.assert_array_equal(v.numpy(), ref.state_dict()[k].numpy(), err_msg=k)
    assert convert.main(['import', src, dst, '--heads', '2', '--dec_heads', '2']) == 2
    assert 'exists; choose a new directory' in capsys.readouterr().err
    assert convert.main(['import', src, str(tmp_path / 'p2')]) == 2  # heads unknown for a non-variant
    assert '--heads N' in capsys.readouterr().err


def test_export_from_a_training_checkpoint(tmp_path):
    config = cifar10.get_config('smoke')  # mu/4 on 32x32, decoder 32 x 1, 2 heads
    c = M.mae_config(config.model, config.data.image_size)
    params = nnx.to_pure_dict(nnx.split(M.MAE(c, rngs=nnx.Rngs(5)))[1])
    state = {'step': jnp.asarray(7, jnp.int32), 'params': params, 'opt_state': {'mu': params}}
    ckpt = checkpoint.Checkpointer(str(tmp_path / 'wd' / 'checkpoints'), async_save=False)
    ckpt.save(7, state, None, config, force=True)
    ckpt.close()
    out = str(tmp_path / 'mae.pth')
    assert convert.main(['export', str(tmp_path / 'wd'), out, '--with_decoder']) == 0
    target = torch_mae.MaskedAutoencoderViT(depth=c.depth)
    target.load_state_dict(torch.load(out, weights_only=True)['model'], strict=True)
    back, report = convert.import_torch(out, c)
    assert not report.unfilled and not report.notes
    assert_identical(back, params)
    restored, c2, step = weights.load_training_params(str(tmp_path / 'wd'))
    assert step == 7 and c2 == c
    # load_any_params (what init_from and the API read): the step folder, and the .pth itself
    _, c4, what = weights.load_any_params(str(tmp_path / 'wd' / 'checkpoints' / '7'))
    assert c4 == c and what.endswith('step 7')
    _, c5, _ = weights.load_any_params(out)  # the export carries its model (mae.pth.json), heads included
    assert c5 == dataclasses.replace(c, attn_impl='auto', remat=False, dtype=jnp.float32)
    os.remove(out + '.json')  # without it, a foreign file: the mu/4 decoder (32 x 1) is not MAE's, heads unknown
    with pytest.raises(convert.ConversionError, match='heads are not in the shapes.*convert import .* --dec_heads N'):
        weights.load_any_params(out)
    with pytest.raises(checkpoint.CheckpointError, match=r'has no step 3; it has \[7\]'):
        weights.load_training_params(str(tmp_path / 'wd'), step=3)
    assert os.listdir(tmp_path / 'wd' / 'checkpoints') == ['7']
    # The same file imported with the run's config file instead of the inferred shapes.
    config_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'cifar10.py')
    assert convert.main(['import', out, str(tmp_path / 'params'), '--config', f'{config_file}:smoke']) == 0
    loaded, c3 = weights.load_params(str(tmp_path / 'params'))
    assert c3 == c
    assert_identical(loaded, params)
