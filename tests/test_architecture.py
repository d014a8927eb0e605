"""The package's layers run one way (README, "Architecture"): a module imports only modules of
its own layer or below, at any depth (function-level imports count), with no cycle; no private
JAX API, no module patched into ``sys.modules``, no ``sys.path`` edit in the configs."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / 'colormae_jax'

# Top to bottom. ``tools`` are command-line programs on top of the library.
LAYERS = [
    ('entry', ['main', 'cli', 'api', 'api.*', 'tools', 'tools.*']),
    ('tasks', ['tasks', 'tasks.*']),
    ('shared', ['loop', 'optim', 'knn', 'config_lib', 'checkpoints.checkpointer', 'checkpoints.checksums',
                'interop.*', 'masking', 'masking.*']),
    ('base', ['models', 'models.*', 'data', 'data.*', 'checkpoints', 'checkpoints.workdir', 'interop', 'parallel',
              'metrics', 'distributed', 'defaults', 'viz', 'topologies']),
    ('bottom', ['errors']),
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PKG.rglob('*.py'):
        rel = p.relative_to(PKG).with_suffix('')
        parts = [x for x in rel.parts if x != '__init__']
        if parts:
            out['.'.join(parts)] = p
    return out


def _layer(name: str) -> int:
    for i, (_, pats) in enumerate(LAYERS):
        for pat in pats:
            if name == pat or (pat.endswith('.*') and name.startswith(pat[:-1])):
                return i
    raise AssertionError(f'colormae_jax.{name} is in no layer of tests/test_architecture.py: add it')


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in ``path`` (relative to colormae_jax)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith('colormae_jax.'):
                n = n[len('colormae_jax.'):]
                while n and n not in modules:  # 'masking.core.Strategy' -> 'masking.core'
                    n = n.rpartition('.')[0]
                if n:
                    found.add(n)
            elif n == 'colormae_jax':
                continue
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_every_import_goes_down_or_sideways():
    bad = [f'{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})'
           for m, deps in _graph().items() for d in deps if _layer(d) < _layer(m)]
    assert not bad, bad


def test_no_import_cycle():
    graph = _graph()
    for pkg in [m for m in graph if any(x.startswith(m + '.') for x in graph)]:
        graph[pkg] = {d for d in graph[pkg] if not d.startswith(pkg + '.')}  # a package re-exports its modules
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize('needle', ['jax._src', 'sys.modules'])
def test_public_apis_only(needle):
    hits = [str(p.relative_to(ROOT)) for p in PKG.rglob('*.py') if needle in p.read_text()]
    assert not hits, f'{needle} in {hits}'


def test_configs_do_not_edit_sys_path():
    hits = [p.name for p in (ROOT / 'configs').glob('*.py') if 'sys.path' in p.read_text()]
    assert not hits
