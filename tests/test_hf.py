"""Hugging Face transformers ViTMAE interop (colormae_jax.interop.torch_hf, tools.convert) against the installed
``ViTMAEForPreTraining``: random weights, the same images and the same mask (its ``noise`` argument)."""
import dataclasses
import functools
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from colormae_jax import masking  # noqa: E402
from colormae_jax.interop import (  # noqa: E402
    torch_hf as interop,
    weights,
)
from colormae_jax.models import mae as M  # noqa: E402
from colormae_jax.tools import convert  # noqa: E402

from helpers import assert_identical, rel  # noqa: E402

pytestmark = pytest.mark.slow  # transformers import + from_pretrained: ~50 s for the module
B, GRID = 3, 8
HF_CFG = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1,
              decoder_num_attention_heads=2, decoder_intermediate_size=64, norm_pix_loss=True, mask_ratio=0.75)
# the same model on our side (HF's layer_norm_eps default, 1e-12, carried)
C = M.MAEConfig(image_size=32, patch=4, width=32, depth=2, mlp_dim=128, heads=2, dec_width=32, dec_depth=1,
                dec_heads=2, dec_mlp_ratio=2, norm_pix_loss=True, ln_eps=1e-12)


def hf_random(seed=0, **over):
    """A ViTMAEForPreTraining with every tensor random (biases, norms, tokens too) and MAE's sin-cos tables
    (transformers 5 builds it with a zero decoder_pos_embed)."""
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**dict(HF_CFG, **over)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'pos_embed' in name or 'position_embeddings' in name:
                p.copy_(torch.from_numpy(M.sincos_table_with_cls(GRID, p.shape[-1])))
            elif name.endswith('layernorm_before.weight') or 'norm.weight' in name or 'layernorm_after' in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope='module')
def inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, 32, 32, 3)).astype(np.float32)
    noise = rng.random((B, GRID * GRID)).astype(np.float32)
    order = np.argsort(noise, axis=1).astype(np.int32)  # HF: argsort, the first int(L * (1 - r)) kept
    keep = int(GRID * GRID * (1 - 0.75))
    return images, noise, order[:, :keep], order[:, keep:]


def hf_outputs(model, inputs):
    images, noise, _, masked = inputs
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(pixel_values=x, noise=torch.from_numpy(noise))
        latent = model.vit(pixel_values=x, noise=torch.from_numpy(noise)).last_hidden_state
    logits = np.take_along_axis(out.logits.numpy(), masked[..., None].astype(np.int64), 1)  # the masked patches
    return float(out.loss), latent.numpy(), logits


@functools.partial(jax.jit, static_argnums=0)
def _forward(c, params, images, visible, masked):
    model = nnx.merge(M.abstract_mae(c)[0], params)
    part = masking.Partition(visible, jnp.zeros((B, 0), jnp.int32), masked)
    loss, pred = model(images, part)
    return loss, model.encoder(images, visible), pred


def our_outputs(params, c, inputs):
    images, _, visible, masked = inputs
    loss, latent, pred = _forward(c, params, images, visible, masked)
    return float(loss), np.asarray(latent), np.asarray(pred)


def assert_parity(ours, theirs):
    for name, a, b in zip(('loss', 'encoder output', 'predictions'), ours, theirs):
        assert rel(a, b) < 1e-5, (name, rel(a, b))


def to_v4(sd):
    """transformers 5 names -> 4 (the inverse of transformers' conversion_mapping for ViTMAEForPreTraining)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^vit\.layers\.', 'vit.encoder.layer.', k)
        for new, old in (('attention.q_proj', 'attention.attention.query'),
                         ('attention.k_proj', 'attention.attention.key'),
                         ('attention.v_proj', 'attention.attention.value'),
                         ('attention.o_proj', 'attention.output.dense'),
                         ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense')):
            k = k.replace(new, old)
        out[k] = v.numpy() if hasattr(v, 'numpy') else v
    return out


def test_hf_to_ours(inputs, tmp_path):
    ref = hf_random()
    ref.save_pretrained(str(tmp_path / 'hf'))
    params, c, desc = weights.load_any_params(str(tmp_path / 'hf'))  # init_from=<a save_pretrained folder>
    assert c == C and 'Hugging Face' in desc
    assert_parity(our_outputs(params, c, inputs), hf_outputs(ref, inputs))
    # v4 names (Hub checkpoints such as facebook/vit-mae-base), as a folder and as a bare .safetensors file
    os.makedirs(tmp_path / 'v4')
    save_file(to_v4(ref.state_dict()), str(tmp_path / 'v4' / 'model.safetensors'), metadata={'format': 'pt'})
    (tmp_path / 'v4' / 'config.json').write_text((tmp_path / 'hf' / 'config.json').read_text())
    v4, report = interop.import_source(str(tmp_path / 'v4'))
    assert report.layout == 'hf' and 'transformers v4 key names' in report.notes and not report.unused
    assert not report.unfilled and report.config == C
    assert_identical(v4, params)
    os.remove(tmp_path / 'v4' / 'config.json')  # no config.json: shapes, and transformers' defaults
    bare, report = interop.import_source(str(tmp_path / 'v4' / 'model.safetensors'), heads=2, dec_heads=2)
    assert report.config == dataclasses.replace(C, norm_pix_loss=False, attn_impl='auto')
    assert any('ln_eps=1e-12' in n for n in report.notes)
    assert_identical(bare, params)


def test_ours_to_hf(inputs, tmp_path):
    c = dataclasses.replace(C, ln_eps=1e-6)  # MAE's epsilon goes into config.json
    rng = np.random.default_rng(3)  # every tensor random (numpy: no per-leaf compile)
    params = jax.tree.map(lambda x: (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                          M.init_mae_params(c, 3))
    for names in ('v5', 'v4'):  # transformers 5 reads both
        folder = str(tmp_path / names)
        interop.export_hf(params, c, folder, names=names)
        hf = transformers.ViTMAEForPreTraining.from_pretrained(folder).eval()
        assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss
        np.testing.assert_allclose(hf.decoder.decoder_pos_embed.detach().numpy(),
                                   M.sincos_table_with_cls(GRID, 32))  # loaded, not zeroed at initialisation
        assert_parity(our_outputs(params, c, inputs), hf_outputs(hf, inputs))
        back, _, _ = weights.load_any_params(folder)
        assert_identical(back, params)
    with pytest.raises(interop.ConversionError, match='exists; choose a new directory'):
        interop.export_hf(params, c, str(tmp_path / 'v5'))


def test_cli_and_safetensors_for_every_layout(tmp_path, capsys):
    ref = hf_random(seed=1, norm_pix_loss=False)
    ref.save_pretrained(str(tmp_path / 'hf'))
    dst = str(tmp_path / 'params')
    assert convert.main(['import', str(tmp_path / 'hf'), dst]) == 0
    printed = capsys.readouterr().out
    assert 'layout hf' in printed and 'Filled 48 of 48' in printed and 'LayerNorm epsilon 1e-12' in printed
    params, c = weights.load_params(dst)
    assert c == dataclasses.replace(C, norm_pix_loss=False)
    assert convert.main(['export', dst, str(tmp_path / 'out'), '--layout', 'hf']) == 0
    assert 'from_pretrained' in capsys.readouterr().out
    cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert cfg['layer_norm_eps'] == 1e-12 and cfg['model_type'] == 'vit_mae' and not cfg['norm_pix_loss']
    sd = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / 'out')).state_dict()
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(sd[k].numpy(), v.numpy(), atol=1e-6, err_msg=k)
    for layout in ('mae', 'mmpretrain', 'timm'):  # safetensors in our other layouts
        path = str(tmp_path / f'{layout}.safetensors')
        assert convert.main(['export', dst, path, '--layout', layout]
                            + ([] if layout == 'timm' else ['--with_decoder'])) == 0
        back, report = interop.import_torch(path, c, seed=0)
        assert report.layout == layout and not report.unused
        if layout != 'timm':
            assert_identical(back, params)
    assert convert.main(['export', dst, str(tmp_path / 'x.pth'), '--layout', 'hf']) == 2
    assert 'writes a folder' in capsys.readouterr().err
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'config.json').write_text(json.dumps(dict(cfg, hidden_act='gelu_new')))
    os.link(tmp_path / 'out' / 'model.safetensors', tmp_path / 'bad' / 'model.safetensors')
    with pytest.raises(interop.ConversionError, match='exact GELU'):
        interop.import_source(str(tmp_path / 'bad'))
