"""MAE's interpolate_pos_embed (bicubic, align_corners=False) in numpy, against torch."""
import numpy as np
import pytest

from colormae_jax.models import mae as model, posembed

torch = pytest.importorskip('torch')


@pytest.mark.parametrize('old,new', [(14, 32), (14, 24), (8, 16), (16, 8), (7, 7)])
def test_resize_equals_torch_bicubic(old, new):
    table = np.random.RandomState(old * 100 + new).randn(1, 1 + old * old, 16).astype(np.float32)
    got = posembed.resize_pos_embed(table, new)
    # MAE's util/pos_embed.py::interpolate_pos_embed, body.
    t = torch.from_numpy(table)
    extra, pos = t[:, :1], t[:, 1:]
    pos = pos.reshape(-1, old, old, 16).permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(pos, size=(new, new), mode='bicubic', align_corners=False)
    want = torch.cat([extra, pos.permute(0, 2, 3, 1).flatten(1, 2)], 1).numpy()
    assert got.shape == (1, 1 + new * new, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_same_grid_is_identity_and_recompute_is_sincos():
    table = model.sincos_table_with_cls(14, 32)
    assert posembed.pos_table(14, 32, table) is table
    np.testing.assert_array_equal(posembed.pos_table(32, 32, table, 'recompute'), model.sincos_table_with_cls(32, 32))
    with pytest.raises(ValueError, match='not a square grid'):
        posembed.resize_pos_embed(table[:, :-1], 8)
