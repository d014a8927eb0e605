"""Cluster detection of colormae_jax.distributed from the schedulers' environment variables, and
what ``initialize`` hands to ``jax.distributed.initialize`` (replaced here by a recorder: the
real multi-process start-up is tested by tests/test_multihost.py)."""
import importlib.util

import jax
import pytest

from colormae_jax import distributed

SLURM = {'SLURM_JOB_ID': '123', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1',
         'SLURM_LOCALID': '0', 'JAX_PLATFORMS': 'cuda'}


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every jax.distributed.initialize call; ``calls.error`` is raised."""
    recorded = []

    def fake(**kwargs):
        recorded.append(kwargs)
        if getattr(fake, 'error', None):
            raise fake.error

    monkeypatch.setattr(jax.distributed, 'initialize', fake)
    return fake, recorded


@pytest.fixture
def libtpu(monkeypatch):
    """A libtpu package seems to be installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: object() if name == 'libtpu' else find_spec(name, *a))


def test_detect_cluster_from_the_environment():
    assert distributed.detect_cluster(SLURM) == ('slurm', 2)
    batch_step = {k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'}  # sbatch's script, not srun
    assert distributed.detect_cluster(batch_step) is None
    assert distributed.detect_cluster(dict(SLURM, SLURM_NTASKS='two')) is None
    assert distributed.detect_cluster({'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '0'}) == ('ompi', 4)
    assert distributed.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a,b', 'JAX_PLATFORMS': 'cpu'}) is None
    assert distributed.detect_cluster({}) is None


def test_detect_tpu(libtpu):
    assert distributed.detect_cluster({'JAX_PLATFORMS': 'tpu'}) == ('tpu', None)  # a TPU VM: JAX reads the slice
    gke = {'JAX_PLATFORMS': 'tpu,cpu', 'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3', 'MEGASCALE_NUM_SLICES': '2'}
    assert distributed.detect_cluster(gke) == ('tpu', 8)
    assert distributed.detect_cluster({'JAX_PLATFORMS': 'cpu'}) is None


def test_detected_cluster_lets_jax_fill_in_the_settings(calls):
    fake, recorded = calls
    info = distributed.initialize(environ=SLURM, heartbeat_timeout=7)
    assert (info.initialized, info.how) == (True, 'detected slurm')
    assert recorded == [dict(coordinator_address=None, num_processes=None, process_id=None,
                             initialization_timeout=distributed.DEFAULT_INITIALIZATION_TIMEOUT,
                             heartbeat_timeout_seconds=7)]
    assert not distributed.initialize(environ=dict(SLURM, SLURM_NTASKS='1')).initialized  # one task: nothing
    assert len(recorded) == 1

    fake.error = ValueError('coordinator_address should be defined.')
    with pytest.raises(distributed.DistributedError, match=r'ompi: jax.distributed could not find --coordinator_addr'):
        distributed.initialize(environ={'OMPI_COMM_WORLD_SIZE': '2', 'JAX_PLATFORMS': 'cuda'})


def test_tpu_vm_without_a_slice_is_single_process(calls, libtpu):
    fake, recorded = calls
    info = distributed.initialize(environ={'JAX_PLATFORMS': 'tpu'})
    assert (info.initialized, info.how, len(recorded)) == (True, 'detected tpu', 1)
    fake.error = ValueError('coordinator_address should be defined.')  # JAX found no TPU slice
    info = distributed.initialize(environ={'JAX_PLATFORMS': 'tpu'})
    assert (info.initialized, info.how, len(recorded)) == (False, 'single-process', 2)
    with pytest.raises(distributed.DistributedError, match='tpu: jax.distributed could not find --coordinator'):
        distributed.initialize(distributed='on', environ={'JAX_PLATFORMS': 'tpu'})
