"""A new masking strategy is one file and one config section: a toy stateful strategy, dropped
into the masking package's search path, trains, refreshes its host state, adds its batch
fields, and is checkpointed and resumed, with no edit to the loop, the task or checkpoint.py."""
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from colormae_jax import main, masking

from helpers import make_folder, smoke_config

TOY = textwrap.dedent('''
    """Toy strategy: masks the patches with the lowest 'priority' row of a host table that
    counts the steps it has seen."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from colormae_jax.masking import core

    SEEN = []  # (step, batch indices) of every refresh / batch, for the test


    class ToyState(core.HostState):
        def __init__(self, run):
            self.count = np.zeros((), np.int64)
            self.run = run

        def refresh(self, step, params, writer):
            self.count += 1
            SEEN.append(('refresh', step))

        def batch_fields(self, batch):
            SEEN.append(('batch', int(self.count)))
            n = len(batch['index'])
            return {'toy_priority': np.tile(np.arange(self.run.model.num_patches, dtype=np.float32), (n, 1))}

        def items(self):
            return {'toy': {'count': self.count}}

        def abstract_items(self):
            return {'toy': {'count': np.zeros((), np.int64)}}

        def load_items(self, restored):
            self.count = np.asarray(restored['toy']['count'])


    @dataclasses.dataclass(frozen=True)
    class ToyMasking(core.Strategy):
        scale: float = 1.0

        def host_state(self, run):
            return ToyState(run)

        def scores(self, rng, batch, aux):
            return self.scale * batch['toy_priority']  # highest visible: the last patches


    STRATEGIES = {'toy': lambda name, grid, cfg, **ratios: core.from_config(ToyMasking, name, grid, cfg, 'toy',
                                                                            **ratios)}
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    plugin = tmp_path / 'plugin'
    plugin.mkdir()
    (plugin / 'toy.py').write_text(TOY)
    monkeypatch.setattr(masking, '__path__', [*masking.__path__, str(plugin)])
    yield
    import sys
    sys.modules.pop('colormae_jax.masking.toy', None)


def _config(root, data_dir, **over):
    c = smoke_config(root, data_dir, **over)
    c.mask.strategy = 'toy'
    c.mask.toy = ml_collections.ConfigDict({'scale': 2.0})  # the strategy's config section
    return c


@pytest.mark.slow
def test_toy_strategy_is_found_trains_and_resumes(toy, tmp_path):
    root = make_folder(tmp_path / 'imgs', per_class=16)
    data_dir = str(tmp_path / 'tfds')
    assert 'toy' in masking.names()
    s = masking.create(_config(root, data_dir).mask, grid=8)
    assert type(s).__name__ == 'ToyMasking' and s.scale == 2.0

    toy_mod = __import__('colormae_jax.masking.toy', fromlist=['SEEN'])
    full = main.run(_config(root, data_dir), str(tmp_path / 'a'), devices=jax.devices()[:1])
    assert [e for e in toy_mod.SEEN if e[0] == 'refresh'] == [('refresh', i) for i in range(12)]
    assert [e[1] for e in toy_mod.SEEN if e[0] == 'batch'] == list(range(1, 13))  # refreshed before each batch
    assert np.isfinite(full['losses']).all()

    toy_mod.SEEN.clear()
    first = main.run(_config(root, data_dir), str(tmp_path / 'b'), devices=jax.devices()[:1], stop_after=6)
    assert first['losses'] == full['losses'][:6]
    toy_mod.SEEN.clear()
    second = main.run(_config(root, data_dir), str(tmp_path / 'b'), devices=jax.devices()[:1])
    # Resumed from the checkpoint of step 4: the host state's count came back with it.
    assert [e[1] for e in toy_mod.SEEN if e[0] == 'batch'] == list(range(5, 13))
    assert second['losses'] == full['losses'][4:]


def test_toy_strategy_masks_by_its_scores(toy):
    c = ml_collections.ConfigDict({'strategy': 'toy', 'ratio': 0.75, 'throw_ratio': 0.0, 'schedule': '',
                                   'toy': {'scale': 1.0}})
    s = masking.create(c, grid=4)
    batch = {'image': np.zeros((2, 16, 16, 3), np.uint8),
             'toy_priority': np.tile(np.arange(16, dtype=np.float32), (2, 1))}
    part = s(jax.random.PRNGKey(0), batch, ())
    np.testing.assert_array_equal(np.sort(np.asarray(part.visible), axis=1), [[12, 13, 14, 15]] * 2)
