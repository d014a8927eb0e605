r"""Fault injection: do training runs survive what happens to real jobs?

Every case runs ``python -m colormae_jax.main`` in subprocesses (a tiny MAE on a synthetic
64-image folder, FAMT from step 4 with weight passes before steps 5, 13, 21, ..., a
checkpoint every 4 steps, all kept) and is judged against one uninterrupted run of the same
config:

* same final state, bitwise: the last checkpoint's checksum record (every array of the train
  state, the FAMT store, the data iterator's state) equals the reference's, and its params,
  restored with orbax, are bitwise equal; every loss any launch logged (TensorBoard, float32)
  equals the reference's loss of that step, and every step's loss was logged;
* no checkpoint lost: every step folder that existed before the fault is still there after
  the recovery, as it was or set aside as ``STEP.damaged`` (its files unchanged), and the
  final run holds every step the reference holds.

Cases (``--cases``; ``--tries N`` caps the tries of each, for a quick version):

  kill       ``kill -9`` at 20 random steps, one after the other on one workdir (each relaunch
             resumes, the next kill comes later);
  term       SIGTERM at 5 points, one of them during a FAMT weight pass: exit code 75 after
             saving, then a relaunch resumes;
  damage     each kind of damage to the newest checkpoint (array file truncated to 0 bytes,
             ``manifest.ocdbt`` deleted, ``ocdbt.process_0/`` deleted, an empty step folder,
             the iterator JSON overwritten, 400 random bytes inside the array data) on a
             copy of the reference stopped at step 16, then a relaunch; and every step
             damaged: the run must stop with one ``error:`` line and exit code 2, nothing
             deleted;
  flip       one byte flipped at 10 random offsets inside the newest step's array files;
  concurrent two runs on one workdir: started together (one is refused, or they run one
             after the other), and the second started while the first is at step 2 and at
             step 20 (held there by SIGSTOP): the second must be refused within seconds (exit
             2, naming the holder), the first must finish as the reference.
  data       the data side, on a 3,000-image folder with 8-step runs of the smoke model (random
             masks) judged against uninterrupted grain and device-pipeline runs: the folder
             changed after it was prepared (one image replaced; a cat and a dog image swapped)
             must be refused naming the images, then prepared again with
             ``data.reprepare=True`` as a fresh preparation; the prepared data damaged (shard
             truncated, a byte flipped, shard deleted, dataset_info.json deleted) must be
             refused before anything trains, naming the file, then prepared again and resumed;
             the device cache damaged (4 KiB inverted, the images at 16x16, zeros, truncated)
             must be decoded again with a warning; a file-size limit (ulimit -f) or a full disk
             (a small tmpfs) while preparing or saving, an unwritable data_dir and a read-only
             checkpoints/ must be one ``error:`` line with exit 2, nothing lost, and the relaunch
             must end as the reference; two runs preparing one data_dir take turns; SIGTERM
             while preparing or decoding must exit 75 with nothing left behind; kill -9 while
             writing the array_record leaves leftovers that the relaunch removes. The full
             disk and read-only rows need root (mounts); they are skipped otherwise.

  python benchmarks/faults.py --out benchmarks/results/faults_cpu.json
  python benchmarks/faults.py --cases kill,damage --tries 2        # a quick version
  python benchmarks/faults.py --cases data --out benchmarks/results/faults_data_cpu.json
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

import benchlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 40
STOPPED_AT = 16  # the damage cases start from the reference cut back to this step
CASES = ('kill', 'term', 'damage', 'flip', 'concurrent', 'data')
DAMAGE_KINDS = ('truncated_array', 'no_manifest', 'no_process_0', 'empty_step', 'junk_iterator', 'random_bytes')
DAMAGE_NAMES = {'truncated_array': 'array file truncated to 0 bytes', 'no_manifest': 'manifest.ocdbt deleted',
                'no_process_0': 'ocdbt.process_0/ deleted', 'empty_step': 'empty step folder',
                'junk_iterator': 'iterator JSON overwritten', 'random_bytes': '400 random bytes in array data',
                'all_damaged': 'every step damaged'}


def run_flags(root: str, data_dir: str, total_steps: int | None = None) -> list[str]:
    """The config of every launch: the smoke model, FAMT from step 4, every step logged, a
    checkpoint every 4 steps, all kept (so that a lost one shows)."""
    total_steps = total_steps or TOTAL_STEPS
    return ['--config=configs/cifar10.py:smoke,mask=famt', f'--config.data.root={root}',
            f'--config.data.data_dir={data_dir}', '--config.batch_size=8', f'--config.total_steps={total_steps}',
            '--config.warmup_steps=2', '--config.log_every_steps=1', '--config.ckpt.every_steps=4',
            '--config.ckpt.keep=1000', '--config.knn.every_epochs=0', '--config.image_summary_every_epochs=0',
            '--config.mask.famt.warmup_steps=4', '--config.mask.famt.update_every_steps=8',
            '--config.mask.famt.update_batch_size=1', '--config.mask.schedule=random:0.75,famt:0.45/0.40@4steps']


def make_folder(root: str, per_class: int = 32, seed: int = 0) -> str:
    """A synthetic ``<root>/train/<class>/*.png`` folder (2 classes, 32x32 noise)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in ('cat', 'dog'):
        os.makedirs(os.path.join(root, 'train', c), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                os.path.join(root, 'train', c, f'{i:04d}.png'))
    return root


# ----------------------------------------------------------------------------- launching

class Launch:
    """``python -m colormae_jax.main FLAGS --workdir=WD`` with its stderr read as it comes."""

    count = 0  # launches so far

    def __init__(self, wd: str, flags: list[str], env: dict | None = None, file_size_limit_kib: int | None = None):
        self.wd, self.t0 = wd, time.monotonic()
        self.tb_before = set(glob.glob(os.path.join(wd, 'tb', 'events.*')))
        cmd = [sys.executable, '-m', 'colormae_jax.main', *flags, f'--workdir={wd}']
        if file_size_limit_kib is not None:  # as a shell does it: ulimit -f, then the command
            cmd = ['bash', '-c', f'ulimit -f {int(file_size_limit_kib)} && exec "$0" "$@"', *cmd]
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env or launch_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        Launch.count += 1
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        fd = self.p.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._chunks.append(chunk)

    @property
    def err(self) -> str:
        return b''.join(self._chunks).decode(errors='replace')

    def wait_for(self, pred, timeout: float = 300.0) -> bool:
        """Polls ``pred(stderr so far)`` until True (True) or the process ends (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred(self.err):
                return True
            if self.p.poll() is not None:
                self._reader.join(5)
                return bool(pred(self.err))
            time.sleep(0.005)
        return False

    def signal(self, sig) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout: float = 600.0) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        self._reader.join(10)
        self.seconds = time.monotonic() - self.t0
        return rc

    def losses(self) -> dict[int, float]:
        """{step: loss} of this launch's TensorBoard event files."""
        new = sorted(set(glob.glob(os.path.join(self.wd, 'tb', 'events.*'))) - self.tb_before)
        out: dict[int, float] = {}
        for path in new:
            out.update(read_scalars(path, 'loss'))
        return out

    def error_lines(self) -> list[str]:
        return [x for x in self.err.splitlines() if x.startswith('error: ')]


def launch_env() -> dict:
    """One CPU device, and JAX's persistent compilation cache (relaunches skip compiling; the
    same executables, so the same bits) when FAULTS_JAX_CACHE names a folder."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
    if os.environ.get('FAULTS_JAX_CACHE'):
        env.update(JAX_COMPILATION_CACHE_DIR=os.environ['FAULTS_JAX_CACHE'],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    return env


def read_scalars(path: str, tag: str) -> dict[int, float]:
    """{step: value} of scalar ``tag`` in a TensorBoard event file (TFRecord framing; a record
    cut short by a killed writer ends the file)."""
    from tensorboardX.proto import event_pb2
    out = {}
    with open(path, 'rb') as f:
        data = f.read()
    at = 0
    while at + 12 <= len(data):
        (n,) = struct.unpack('<Q', data[at:at + 8])
        if at + 12 + n + 4 > len(data):
            break
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
        at += 12 + n + 4
        for v in event.summary.value:
            if v.tag == tag:
                out[int(event.step)] = float(np.float32(v.simple_value))
    return out


# ----------------------------------------------------------------------------- judging

def step_folders(wd: str) -> list[str]:
    d = os.path.join(wd, 'checkpoints')
    return sorted((n for n in os.listdir(d) if n.split('.')[0].isdigit() and 'tmp' not in n),
                  key=lambda n: (int(n.split('.')[0]), n)) if os.path.isdir(d) else []


def tree_digest(path: str) -> str:
    """A hash of every file under ``path`` (relative names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, '**'), recursive=True)):
        if os.path.isfile(f):
            h.update(os.path.relpath(f, path).encode())
            with open(f, 'rb') as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def lost_steps(before: list[str], after: list[str], damaged_digests: dict[str, str] | None = None,
               wd: str | None = None) -> list[str]:
    """The step folders of ``before`` that are gone from ``after`` (neither kept nor set aside as
    ``STEP.damaged``), and the damaged ones whose files changed (``damaged_digests``: {step:
    digest of its folder after the damage})."""
    lost = []
    for name in before:
        if name in after:
            continue
        aside = [n for n in after if n.startswith(name + '.damaged')]
        if not aside:
            lost.append(name)
        elif damaged_digests and name in damaged_digests and wd is not None and not any(
                tree_digest(os.path.join(wd, 'checkpoints', n)) == damaged_digests[name] for n in aside):
            lost.append(f'{name} (its files changed)')
    return lost


def read_record(wd: str, step: int) -> dict:
    """The checksum record of ``step`` (the JSON orbax wrote)."""
    with open(os.path.join(wd, 'checkpoints', str(step), 'checksums', 'metadata')) as f:
        return json.load(f)


def read_params(wd: str, step: int) -> dict:
    import jax
    import orbax.checkpoint as ocp
    with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as c:
        warnings.simplefilter('ignore', UserWarning)  # "Sharding info not provided": one CPU device, as saved
        state = c.restore(os.path.join(wd, 'checkpoints', str(step), 'state'))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state['params'])}


class Reference:
    """The uninterrupted run: its losses, final checksum record and params. ``parts``: the parts
    of the checksum record compared (the data rows leave out the config, which names their own
    data_dir)."""

    def __init__(self, wd: str, losses: dict[int, float], steps: list[str], total: int | None = None,
                 parts: tuple[str, ...] = ('state', 'extra', 'data', 'layout', 'config')):
        total = total or TOTAL_STEPS
        self.wd, self.losses, self.steps, self.total, self.parts = wd, losses, steps, total, parts
        self.record = read_record(wd, total)
        self.params = read_params(wd, total)

    def final_state_differs(self, wd: str) -> str | None:
        """What differs from the reference's final state (None: bitwise equal)."""
        if not os.path.isdir(os.path.join(wd, 'checkpoints', str(self.total))):
            return f'no step {self.total}'
        rec = read_record(wd, self.total)
        for part in self.parts:
            if rec.get(part) != self.record.get(part):
                return f'checksum record: {part} differs'
        got = read_params(wd, self.total)
        bad = [k for k in self.params if k not in got or not np.array_equal(got[k].view(np.uint8),
                                                                              self.params[k].view(np.uint8))]
        return f'params differ: {bad[:3]}' if bad else None

    def losses_differ(self, logged: dict[int, float]) -> str | None:
        bad = [s for s, v in sorted(logged.items()) if struct.pack('<f', v) != struct.pack('<f', self.losses.get(s))]
        return f'loss differs at steps {bad[:5]}' if bad else None


def judge(ref: Reference, wd: str, launches: list[Launch], before: list[str],
          damaged: dict[str, str] | None = None) -> tuple[bool, list[str], str]:
    """(survived, lost step folders, why not): the final state, every logged loss and the step
    folders of one workdir after its last launch."""
    why = []
    logged: dict[int, float] = {}
    for la in launches:
        losses = la.losses()
        if (d := ref.losses_differ(losses)) is not None:
            why.append(d)
        logged.update(losses)
    start = _resumed_at(launches[-1].err) or 0  # the last launch logged every step it ran
    missing = [s for s in range(start + 1, ref.total + 1) if s not in logged]
    if missing:
        why.append(f'steps without a logged loss: {missing[:5]}')
    if (d := ref.final_state_differs(wd)) is not None:
        why.append(d)
    after = step_folders(wd)
    lost = lost_steps(before, after, damaged, wd) + [s for s in ref.steps if s not in after]
    if os.path.exists(os.path.join(wd, 'run.lock')):
        why.append('run.lock left behind')
    return not why and not lost, lost, '; '.join(why)


# ----------------------------------------------------------------------------- damage

def array_files(step_dir: str, item: str = 'state') -> list[str]:
    """The array data files of ``item`` (ocdbt ``d/`` files), smallest first."""
    return sorted(glob.glob(os.path.join(step_dir, item, 'ocdbt.process_0', 'd', '*')), key=os.path.getsize)


def damage(step_dir: str, kind: str, rng: random.Random | None = None) -> str:
    """Damages a step folder as ``kind`` (:data:`DAMAGE_KINDS`); returns what was done."""
    rng = rng or random.Random(0)
    if kind == 'truncated_array':
        path = array_files(step_dir)[-1]
        open(path, 'w').close()
        return f'truncated {os.path.relpath(path, step_dir)}'
    if kind == 'no_manifest':
        os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))
        return 'deleted state/manifest.ocdbt'
    if kind == 'no_process_0':
        shutil.rmtree(os.path.join(step_dir, 'state', 'ocdbt.process_0'))
        return 'deleted state/ocdbt.process_0/'
    if kind == 'empty_step':
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
        return 'emptied the step folder'
    if kind == 'junk_iterator':
        (path,) = glob.glob(os.path.join(step_dir, 'data', 'process_0-of-*.json'))
        with open(path, 'w') as f:
            f.write('{"step": 3, junk')
        return f'overwrote {os.path.relpath(path, step_dir)}'
    if kind == 'random_bytes':
        path = array_files(step_dir)[-1]
        at = os.path.getsize(path) // 2
        with open(path, 'r+b') as f:
            f.seek(at)
            f.write(rng.randbytes(400))
        return f'400 random bytes at {at} of {os.path.relpath(path, step_dir)}'
    raise ValueError(kind)


def flip_byte(step_dir: str, rng: random.Random, items: tuple[str, ...] = ('state',)) -> str:
    """XORs one byte, at a random offset of the step's array files (chosen by size), with a
    random non-zero value; returns where."""
    files = [f for item in items for f in array_files(step_dir, item) if os.path.getsize(f)]
    sizes = [os.path.getsize(f) for f in files]
    path = rng.choices(files, weights=sizes)[0]
    at = rng.randrange(os.path.getsize(path))
    with open(path, 'r+b') as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ rng.randrange(1, 256)]))
    return f'byte {at} of {os.path.relpath(path, step_dir)} ({os.path.getsize(path)} bytes)'


def stopped_copy(ref: Reference, wd: str, at: int | None = None) -> list[str]:
    """``wd``: the reference's checkpoints up to step ``at`` (default :data:`STOPPED_AT`: a run
    stopped there); returns its steps."""
    at = at or STOPPED_AT
    os.makedirs(os.path.join(wd, 'checkpoints'))
    for name in ref.steps:
        if int(name) <= at:
            shutil.copytree(os.path.join(ref.wd, 'checkpoints', name), os.path.join(wd, 'checkpoints', name))
    return step_folders(wd)


# ----------------------------------------------------------------------------- the cases

class Bench:
    def __init__(self, work: str, tries: int | None, seed: int, log=print):
        self.work, self.tries, self.rng, self.log = work, tries, random.Random(seed), log
        self.root = make_folder(os.path.join(work, 'imgs'))
        self.flags = run_flags(self.root, os.path.join(work, 'tfds'))
        self.rows, self.details = [], []
        self._n = 0

    def workdir(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.work, f'{self._n:02d}_{name}')

    def n(self, default: int) -> int:
        return default if self.tries is None else min(default, self.tries)

    def reference(self) -> Reference:
        wd = self.workdir('reference')
        la = Launch(wd, self.flags)
        rc = la.wait()
        if rc != 0:
            raise RuntimeError(f'the reference run failed ({rc}):\n{la.err[-3000:]}')
        self.ref = Reference(wd, la.losses(), step_folders(wd))
        missing = [s for s in range(1, TOTAL_STEPS + 1) if s not in self.ref.losses]
        if missing:
            raise RuntimeError(f'the reference logged no loss at steps {missing}')
        self.log(f'reference: {TOTAL_STEPS} steps in {la.seconds:.1f} s, checkpoints {self.ref.steps}')
        return self.ref

    def add(self, fault: str, results: list[dict]) -> None:
        row = {'fault': fault, 'tries': len(results), 'survived': sum(r['survived'] for r in results),
               'data_lost': sorted({x for r in results for x in r['lost']})}
        self.rows.append(row)
        self.details.extend(dict(r, fault=fault) for r in results)
        self.log(f'{fault}: {row["survived"]}/{row["tries"]} survived, lost {row["data_lost"] or "nothing"}')

    # -- kill -9 / SIGTERM: one workdir, faults one after the other
    def chain(self, name: str, targets: list[tuple[str, int]], sig) -> list[dict]:
        """Launches on one workdir; the i-th is signalled at ``targets[i]``: ('step', s) once it
        has logged a step >= s (then after a random 0-50 ms), ('famt', n) once it is in its
        n-th FAMT weight pass. A last launch finishes. Each fault is one try, judged by the
        launch after it (resumed from the newest step the workdir held, or that step set
        aside as damaged; no step folder gone) and, all together, by the losses every launch
        logged and the final state."""
        wd, launches, results = self.workdir(name), [], []
        for kind, target in targets + [('finish', 0)]:
            la = Launch(wd, self.flags)
            launches.append(la)
            if kind == 'finish':
                la.wait()
                break
            if kind == 'step':
                hit = la.wait_for(lambda e: _last_logged(e) >= target)
                time.sleep(self.rng.uniform(0, 0.05))
            else:
                hit = la.wait_for(lambda e: e.count('FAMT weight update:') >= target)
            la.signal(sig)
            rc = la.wait()
            t = {'target': f'{kind} {target}', 'last_logged_step': _last_logged(la.err), 'rc': rc,
                 'at_fault': step_folders(wd), 'why': ''}
            if not hit:
                t['why'] = 'the launch ended before the fault;'
            if sig == signal.SIGTERM:
                t['in_famt_pass'] = 'interrupted by SIGTERM' in la.err
                t['saved'] = _saved_step(la.err)
                if rc != 75:
                    t['why'] += f' exit code {rc}, not 75;'
                if t['saved'] is None or str(t['saved']) not in t['at_fault']:
                    t['why'] += f' no step saved on SIGTERM ({t["saved"]});'
                if kind == 'famt' and not t['in_famt_pass']:
                    t['why'] += ' the SIGTERM missed the FAMT pass;'
            elif rc != -signal.SIGKILL:
                t['why'] += f' exit code {rc}, not -9;'
            results.append(t)
        final_ok, final_lost, final_why = judge(self.ref, wd, launches, [])
        for i, t in enumerate(results):
            nxt = launches[i + 1]
            later = results[i + 1]['at_fault'] if i + 1 < len(results) else step_folders(wd)
            t['resumed_at'] = _resumed_at(nxt.err)
            newest = _newest(t['at_fault'])
            if newest is not None and t['resumed_at'] != newest and not any(
                    n.startswith(f'{newest}.damaged') for n in later):
                t['why'] += f' resumed at {t["resumed_at"]}, not at the newest step {newest};'
            t['set_aside'] = [n for n in later if '.damaged' in n and n not in t['at_fault']]
            t['lost'] = lost_steps(t['at_fault'], later)
            if i == len(results) - 1:
                t['lost'] += final_lost
                if not final_ok:
                    t['why'] += ' ' + final_why
            t['survived'] = not t['why'].strip() and not t['lost'] and final_ok
            t['why'] = t['why'].strip()
        for t in results:
            t.pop('at_fault')
        if launches[-1].p.returncode != 0:
            results[-1]['survived'] = False
            results[-1]['why'] += f' the last launch ended with {launches[-1].p.returncode}'
        return results

    def case_kill(self) -> None:
        n = self.n(20)
        steps = sorted(self.rng.sample(range(2, TOTAL_STEPS), n))
        results = self.chain('kill', [('step', s) for s in steps], signal.SIGKILL)
        self.add('kill -9 at a random step', results)

    def case_term(self) -> None:
        # two before the second FAMT pass (before step 13), the pass itself, two after
        early = sorted(self.rng.sample(range(5, 12), 2))
        late = sorted(self.rng.sample(range(14, TOTAL_STEPS), 2))
        targets = [('step', s) for s in early] + [('famt', 1)] + [('step', s) for s in late]
        if self.tries is not None:
            targets = [('famt', 1)] if self.tries <= 1 else targets[:1] + [('famt', 1)] + targets[3:3 + self.tries - 2]
            targets = sorted(targets, key=lambda x: 12.5 if x[0] == 'famt' else x[1])
        results = self.chain('term', targets, signal.SIGTERM)
        self.add('SIGTERM (one in a FAMT weight pass)', results)

    # -- damage to a stopped run's newest step
    def _resume_damaged(self, name: str, hurt) -> dict:
        wd = self.workdir(name)
        before = stopped_copy(self.ref, wd)
        newest = os.path.join(wd, 'checkpoints', before[-1])
        what = hurt(newest)
        digests = {before[-1]: tree_digest(newest)}
        la = Launch(wd, self.flags)
        rc = la.wait()
        ok, lost, why = judge(self.ref, wd, [la], before, digests)
        resumed = _resumed_at(la.err)
        set_aside = f'{before[-1]}.damaged' in step_folders(wd)
        if rc != 0:
            why = f'exit code {rc}: {(la.error_lines() or [la.err[-300:]])[-1]} ' + why
        elif not set_aside and resumed != int(before[-1]):
            why += f' resumed at {resumed} without setting step {before[-1]} aside'
        warning = next((x.split('] ', 1)[-1] for x in la.err.splitlines() if 'is damaged (' in x), '')
        return {'what': what, 'rc': rc, 'resumed_at': resumed, 'set_aside': set_aside, 'warning': warning[:300],
                'survived': ok and rc == 0 and not why.strip(), 'lost': lost, 'why': why.strip(),
                'seconds': round(la.seconds, 1)}

    def case_damage(self) -> None:
        kinds = DAMAGE_KINDS[:self.n(len(DAMAGE_KINDS))]
        for kind in kinds:
            r = self._resume_damaged(kind, lambda d, k=kind: damage(d, k, self.rng))
            self.add(DAMAGE_NAMES[kind], [r])
        self.add(DAMAGE_NAMES['all_damaged'], [self._all_damaged()])

    def _all_damaged(self) -> dict:
        """Every step damaged: one ``error:`` line, exit code 2, every folder kept as ``.damaged``."""
        wd = self.workdir('all_damaged')
        before = stopped_copy(self.ref, wd)
        kinds = [k for k in DAMAGE_KINDS if k != 'empty_step']
        digests = {}
        for i, name in enumerate(before):
            damage(os.path.join(wd, 'checkpoints', name), kinds[i % len(kinds)], self.rng)
            digests[name] = tree_digest(os.path.join(wd, 'checkpoints', name))
        la = Launch(wd, self.flags)
        rc = la.wait()
        after = step_folders(wd)
        lost = lost_steps(before, after, digests, wd)
        errors = la.error_lines()
        why = []
        if rc != 2:
            why.append(f'exit code {rc}, not 2')
        if len(errors) != 1 or 'Traceback' in la.err or 'no step restores and verifies' not in errors[0]:
            why.append(f'not one clear error line: {errors[-1:] or la.err[-300:]}')
        if any(n.isdigit() for n in after):
            why.append(f'a new step was written or one was kept: {after}')
        return {'what': f'{len(before)} steps damaged', 'rc': rc, 'error': (errors or [''])[-1][:300],
                'survived': not why and not lost, 'lost': lost, 'why': '; '.join(why),
                'seconds': round(la.seconds, 1)}

    def case_flip(self) -> None:
        results = []
        for i in range(self.n(10)):
            r = self._resume_damaged(f'flip{i}', lambda d: flip_byte(d, self.rng))
            r['outcome'] = 'set aside' if r['set_aside'] else 'restored (the byte made no difference)'
            results.append(r)
        self.add('one byte flipped at a random offset', results)

    # -- two runs on one workdir
    def case_concurrent(self, whens: list[int] | None = None) -> None:
        """The second run started (a) together with the first: one of them must be refused, or
        they run one after the other (the second finds the first's run complete); (b) while the
        first is at step 2 and (c) at step 20 (held there with SIGSTOP, so that the second
        surely meets it alive; SIGCONT once the second has ended): the second must be refused."""
        results = []
        for when in whens or [0, 2, 20][:self.n(3)]:
            wd = self.workdir(f'concurrent{when}')
            a = Launch(wd, self.flags)
            if when:
                a.wait_for(lambda e: _last_logged(e) >= when)
                a.signal(signal.SIGSTOP)
            b = Launch(wd, self.flags)
            rc_b = b.wait()
            a.signal(signal.SIGCONT)
            rcs = (a.wait(), rc_b)
            why, outcome = [], ''
            if sorted(rcs) == [0, 2]:
                winner, loser = (a, b) if rcs[0] == 0 else (b, a)
                refused = (loser.error_lines() or [''])[-1]
                outcome = f'run {"B" if loser is b else "A"} refused after {loser.seconds:.1f} s'
                if 'another run holds it' not in refused:
                    why.append(f'refused without naming the holder: {refused or loser.err[-300:]}')
                launches = [winner]
            elif rcs == (0, 0) and not when:
                first, second = (a, b) if 'Training is already complete' in b.err else (b, a)
                outcome, refused = 'one after the other (the second found the run complete)', ''
                if 'Training is already complete' not in second.err:
                    why.append('both exited 0 but neither found the run complete')
                launches = [first]
            else:
                refused = ''
                why.append(f'exit codes {rcs}: {(b.error_lines() or [b.err[-300:]])[-1]}')
                launches = [a]
            ok, lost, w = judge(self.ref, wd, launches, [])
            if w:
                why.append(w)
            results.append({'second_started_at_step': when, 'rcs': list(rcs), 'outcome': outcome,
                            'refused': refused[:300], 'survived': ok and not why, 'lost': lost,
                            'why': '; '.join(why)})
        self.add('two runs on one workdir', results)

    # -- data: prepared data, the device cache, storage, preparation under faults
    def _data_setup(self) -> None:
        """The 3,000-image folder, prepared once (the grain reference) and decoded once (the
        device reference): uninterrupted runs of :func:`data_flags`."""
        self.mounts = Mounts()
        self.can_mount = Mounts.available()
        self.big = make_folder(os.path.join(self.work, 'big'), per_class=DATA_PER_CLASS)
        self.data_refs, self.data_dirs = {}, {}
        for pipeline in ('grain', 'device'):
            wd, dd = self.workdir(f'data_reference_{pipeline}'), os.path.join(self.work, f'tfds_{pipeline}')
            if pipeline == 'device':
                shutil.copytree(self.data_dirs['grain'], dd)  # prepared already: only decoded here
            la = Launch(wd, data_flags(self.big, dd, pipeline))
            if la.wait() != 0:
                raise RuntimeError(f'the {pipeline} data reference failed:\n{la.err[-3000:]}')
            self.data_refs[pipeline] = Reference(wd, la.losses(), step_folders(wd), DATA_TOTAL,
                                                 parts=('state', 'extra', 'data'))
            self.data_dirs[pipeline] = dd
            self.log(f'data reference ({pipeline}): {DATA_TOTAL} steps in {la.seconds:.1f} s')

    def _data_dir(self, name: str, like: str | None = None) -> str:
        """A data_dir for one try: a copy of the grain or device reference's, or empty (None)."""
        dd = os.path.join(self.work, f'tfds_{self._n:02d}_{name}')
        if like is not None:
            shutil.copytree(self.data_dirs[like], dd)
        return dd

    def _stopped(self, name: str, pipeline: str) -> tuple[str, list[str]]:
        """A workdir holding the data reference's steps up to :data:`DATA_STOP`."""
        wd = self.workdir(name)
        return wd, stopped_copy(self.data_refs[pipeline], wd, DATA_STOP)

    @staticmethod
    def _refusal(la: Launch, names: tuple[str, ...] = (), trained_ok: bool = False) -> str:
        """Why ``la`` is not a clear refusal: exit 2, one ``error:`` line (naming ``names``), no
        traceback, nothing trained (unless ``trained_ok``), the workdir's lock released."""
        why = []
        if la.p.returncode != 2:
            why.append(f'exit code {la.p.returncode}, not 2')
        errors = la.error_lines()
        if len(errors) != 1 or 'Traceback' in la.err:
            at = la.err.find('Traceback')
            why.append(f'not one error line: {errors[-2:] or la.err[-300:]}' +
                       (f'; a traceback: {la.err[max(0, at - 300):at + 1500]}' if at >= 0 else ''))
        elif any(n not in errors[0] for n in names):
            why.append(f'the line does not name {[n for n in names if n not in errors[0]]}: {errors[0][:300]}')
        if not trained_ok and _last_logged(la.err):
            why.append('it trained before refusing')
        if os.path.exists(os.path.join(la.wd, 'run.lock')):
            why.append('run.lock left behind')
        return '; '.join(why)

    def _finish(self, r: dict, ref: Reference, wd: str, launches: list[Launch], before: list[str]) -> dict:
        ok, lost, why = judge(ref, wd, launches, before)
        if launches[-1].p.returncode != 0:
            why = f'the last launch ended with {launches[-1].p.returncode}: {launches[-1].err[-300:]}; ' + why
        r['why'] = '; '.join(x for x in (r.get('why', ''), why) if x)
        r['lost'] = lost
        r['survived'] = not r['why'] and not lost and launches[-1].p.returncode == 0
        r['seconds'] = round(sum(la.seconds for la in launches), 1)
        return r

    def _row(self, key: str, results: list[dict]) -> None:
        self.add(DATA_NAMES[key], results)

    def data_folder_changed(self, kind: str) -> dict:
        """Prepared, then the folder changed: refused naming the images; relaunched with
        data.reprepare=True: prepared again, as a fresh preparation of the changed folder."""
        root = shutil.copytree(self.big, os.path.join(self.work, f'imgs_{kind}'), copy_function=shutil.copy2)
        dd = self._data_dir(kind)
        prepare_only(root, dd)
        wd = self.workdir(kind)
        paths = change_folder(root, kind)
        la = Launch(wd, data_flags(root, dd))
        la.wait()
        why = self._refusal(la, tuple(os.path.join(root, p) for p in paths))
        again = Launch(wd, data_flags(root, dd, 'grain', '--config.data.reprepare=True'))
        if again.wait() != 0:
            why += f'; the relaunch with data.reprepare=True ended with {again.p.returncode}'
        if prepare_only(root, dd) != prepare_only(root, self._data_dir(f'{kind}_fresh')):
            why += '; prepared again, the examples differ from a fresh preparation of the changed folder'
        return {'what': f'{kind}: {", ".join(paths)}', 'error': (la.error_lines() or [''])[-1][:300],
                'survived': not why.strip('; '), 'lost': [], 'why': why.strip('; '),
                'seconds': round(la.seconds + again.seconds, 1)}

    def data_prepared_damaged(self, kind: str) -> dict:
        """A run stopped at step 4, its prepared data damaged: refused naming the file, nothing
        trained; relaunched with data.reprepare=True: resumes and ends as the reference."""
        wd, before = self._stopped(kind, 'grain')
        dd = self._data_dir(kind, like='grain')
        data_dir = glob.glob(os.path.join(dd, 'image_folder', '*', '*'))[0]
        path = damage_prepared(data_dir, kind)
        la = Launch(wd, data_flags(self.big, dd))
        la.wait()
        r = {'what': f'{kind}: {path}', 'error': (la.error_lines() or [''])[-1][:300],
             'why': self._refusal(la, (path,))}
        again = Launch(wd, data_flags(self.big, dd, 'grain', '--config.data.reprepare=True'))
        again.wait()
        return self._finish(r, self.data_refs['grain'], wd, [again], before)

    def data_cache_damaged(self, kind: str) -> dict:
        """A device-pipeline run stopped at step 4, its cache damaged: a warning, decoded again,
        the run ends as the device reference."""
        wd, before = self._stopped(f'cache_{kind}', 'device')
        dd = self._data_dir(f'cache_{kind}', like='device')
        images = glob.glob(os.path.join(dd, 'image_folder', '*', '*', 'decoded', 'train_images.npy'))[0]
        damage_cache(images, kind)
        la = Launch(wd, data_flags(self.big, dd, 'device'))
        la.wait()
        warning = next((x.split('] ', 1)[-1] for x in la.err.splitlines() if 'decoding the split again' in x), '')
        r = {'what': kind, 'warning': warning[:300], 'why': '' if warning else 'no warning'}
        return self._finish(r, self.data_refs['device'], wd, [la], before)

    def data_file_size(self, when: str) -> dict:
        """ulimit -f while preparing (an empty data_dir) or while saving (prepared already): one
        line, exit 2, nothing half-written; relaunched without the limit: the reference."""
        wd = self.workdir(f'fsize_{when}')
        dd = self._data_dir(f'fsize_{when}', like=None if when == 'prepare' else 'grain')
        la = Launch(wd, data_flags(self.big, dd), file_size_limit_kib=100)
        la.wait()
        r = {'what': f'file-size limit 100 KiB while {when}', 'error': (la.error_lines() or [''])[-1][:300],
             'why': self._refusal(la, ('File too large', 'ulimit'), trained_ok=when == 'save')}
        if leftovers(dd):
            r['why'] += f'; left behind: {leftovers(dd)}'
        before = step_folders(wd)
        again = Launch(wd, data_flags(self.big, dd))
        again.wait()
        return self._finish(r, self.data_refs['grain'], wd, [again], before)

    def data_full_disk(self, when: str) -> dict:
        """A tmpfs too small for the prepared data (data_dir) or for the second checkpoint
        (workdir): one line, exit 2; the disk enlarged, the relaunch ends as the reference."""
        wd = self.workdir(f'full_{when}')
        if when == 'prepare':
            dd = self.mounts.tmpfs(self._data_dir('full_prepare'), '2m')
        else:
            dd = self._data_dir('full_save', like='grain')
            self.mounts.tmpfs(wd, '1m')
        la = Launch(wd, data_flags(self.big, dd))
        la.wait()
        r = {'what': f'tmpfs full while {when}', 'error': (la.error_lines() or [''])[-1][:300],
             'why': self._refusal(la, ('No space left on device',), trained_ok=when == 'save')}
        if leftovers(dd):
            r['why'] += f'; left behind: {leftovers(dd)}'
        before = step_folders(wd)
        self.mounts.resize(dd if when == 'prepare' else wd, '256m')
        again = Launch(wd, data_flags(self.big, dd))
        again.wait()
        out = self._finish(r, self.data_refs['grain'], wd, [again], before)
        self.mounts.release(dd if when == 'prepare' else wd)
        return out

    def data_read_only_data_dir(self) -> dict:
        """An empty data_dir this user cannot write (a read-only tmpfs): one line naming it."""
        wd = self.workdir('ro_data_dir')
        dd = self.mounts.tmpfs(self._data_dir('ro_data_dir'), '1m', ro=True)
        la = Launch(wd, data_flags(self.big, dd))
        la.wait()
        out = {'what': 'read-only tmpfs as data_dir', 'error': (la.error_lines() or [''])[-1][:300],
               'why': self._refusal(la, (dd, '--config.data.data_dir')), 'lost': [], 'seconds': round(la.seconds, 1)}
        out['survived'] = not out['why']
        self.mounts.release(dd)
        return out

    def data_read_only_checkpoints(self) -> dict:
        """A run stopped at step 4 whose checkpoints/ is mounted read-only: refused before
        anything trains, nothing changed; writable again, the relaunch ends as the reference."""
        wd, before = self._stopped('ro_checkpoints', 'grain')
        dd = self._data_dir('ro_checkpoints', like='grain')
        ckpt = os.path.join(wd, 'checkpoints')
        digest = tree_digest(ckpt)
        self.mounts.read_only(ckpt)
        la = Launch(wd, data_flags(self.big, dd))
        la.wait()
        r = {'what': 'checkpoints/ bind-mounted read-only', 'error': (la.error_lines() or [''])[-1][:300],
             'why': self._refusal(la, (ckpt,)), 'refused_after_s': round(la.seconds, 1)}
        self.mounts.release(ckpt)
        if tree_digest(ckpt) != digest:
            r['why'] += '; the checkpoints changed'
        again = Launch(wd, data_flags(self.big, dd))
        again.wait()
        return self._finish(r, self.data_refs['grain'], wd, [again], before)

    def data_concurrent(self) -> list[dict]:
        """Two runs (two workdirs) started together on one empty data_dir: one prepares, the
        other waits for it and uses its result; both end as the reference."""
        dd = self._data_dir('concurrent')
        wds = [self.workdir(f'concurrent_{i}') for i in range(2)]
        las = [Launch(wd, data_flags(self.big, dd)) for wd in wds]
        for la in las:
            la.wait()
        prepared = sum('Prepared ' in la.err for la in las)
        waited = sum('Waiting for' in la.err for la in las)
        out = []
        for wd, la in zip(wds, las):
            r = {'what': f'{prepared} prepared, {waited} waited', 'why': '' if prepared == 1 else
                 f'prepared {prepared} times'}
            out.append(self._finish(r, self.data_refs['grain'], wd, [la], []))
        return out

    def data_signal(self, kind: str, delay: float = 0.0) -> dict:
        """SIGTERM while preparing (at 'Checking the ...') or decoding (at 'Decoding the ...'):
        exit 75 with the usual line, the locks released, nothing half-written; kill -9 while
        writing the array_record: its leftovers removed by the relaunch. The relaunch ends as
        the reference."""
        pipeline = 'device' if kind == 'term_decode' else 'grain'
        wd = self.workdir(kind)
        dd = self._data_dir(kind, like='grain' if kind == 'term_decode' else None)
        mark = {'term_prepare': 'Checking the ', 'term_decode': 'Decoding the ', 'kill_prepare': 'Writing the '}[kind]
        la = Launch(wd, data_flags(self.big, dd, pipeline))
        hit = la.wait_for(lambda e: mark in e)
        time.sleep(delay)
        la.signal(signal.SIGKILL if kind == 'kill_prepare' else signal.SIGTERM)
        rc = la.wait()
        r = {'what': f'{kind} after "{mark.strip()}" + {delay * 1e3:.0f} ms', 'rc': rc, 'why': ''}
        left = leftovers(dd)
        if not hit:
            r['why'] = 'the launch ended before the signal; '
        if kind == 'kill_prepare':
            r['left_by_the_kill'] = left
        else:
            if rc != 75:
                r['why'] += f'exit code {rc}, not 75: {la.err[-300:]}; '
            if 'stopped by SIGTERM' not in la.err or 'relaunch the same command to resume' not in la.err:
                r['why'] += 'not the usual line; '
            if left or os.path.exists(os.path.join(wd, 'run.lock')):
                r['why'] += f'left behind: {left + [x for x in ["run.lock"] if os.path.exists(os.path.join(wd, x))]}; '
        again = Launch(wd, data_flags(self.big, dd, pipeline))
        again.wait()
        if leftovers(dd):
            r['why'] += f'the relaunch left {leftovers(dd)}; '
        r['why'] = r['why'].strip('; ')
        return self._finish(r, self.data_refs[pipeline], wd, [again], [])

    def case_data(self) -> None:
        self._data_setup()
        try:
            for kind in FOLDER_CHANGES:
                self._row(kind, [self.data_folder_changed(kind)])
            for kind in PREPARED_DAMAGE:
                self._row(kind, [self.data_prepared_damaged(kind)])
            for kind in CACHE_DAMAGE:
                self._row(f'cache_{kind}', [self.data_cache_damaged(kind)])
            for when in ('prepare', 'save'):
                self._row(f'fsize_{when}', [self.data_file_size(when)])
            if self.can_mount:
                for when in ('prepare', 'save'):
                    self._row(f'full_{when}', [self.data_full_disk(when)])
                self._row('ro_data_dir', [self.data_read_only_data_dir()])
                self._row('ro_checkpoints', [self.data_read_only_checkpoints()])
            else:
                self.log('full disk and read-only rows skipped: they need root (tmpfs and read-only mounts)')
            self._row('concurrent_prepare', self.data_concurrent())
            self._row('term_prepare', [self.data_signal('term_prepare')])
            self._row('term_decode', [self.data_signal('term_decode')])
            self._row('kill_prepare', [self.data_signal('kill_prepare', self.rng.uniform(0, 0.3))
                                       for _ in range(self.n(2))])
        finally:
            self.mounts.release_all()


# ----------------------------------------------------------------------------- data faults

DATA_TOTAL = 8  # the data rows: 8 steps of the smoke model (random masks), a checkpoint every 4
DATA_STOP = 4
DATA_PER_CLASS = 1500  # 3,000 images: preparing and decoding last long enough to be interrupted
FOLDER_CHANGES = ('replaced', 'swapped')
PREPARED_DAMAGE = ('truncated', 'flipped', 'deleted', 'no_dataset_info')
CACHE_DAMAGE = ('inverted_4k', 'half_size', 'zeros', 'truncated')
DATA_NAMES = {
    'replaced': 'one image of the folder replaced', 'swapped': 'a cat and a dog image swap class folders',
    'truncated': 'array_record shard truncated', 'flipped': 'array_record shard: one byte flipped',
    'deleted': 'array_record shard deleted', 'no_dataset_info': 'dataset_info.json deleted',
    'cache_inverted_4k': 'device cache: 4 KiB inverted', 'cache_half_size': 'device cache: the images at 16x16',
    'cache_zeros': 'device cache: all zeros', 'cache_truncated': 'device cache: .npy truncated',
    'fsize_prepare': 'file-size limit (ulimit -f) while preparing',
    'fsize_save': 'file-size limit (ulimit -f) while saving a checkpoint',
    'full_prepare': 'full disk while preparing', 'full_save': 'full disk while saving a checkpoint',
    'ro_data_dir': 'data_dir not writable', 'ro_checkpoints': 'read-only checkpoints/ on resume',
    'concurrent_prepare': 'two runs preparing one data_dir at once', 'term_prepare': 'SIGTERM while preparing',
    'term_decode': 'SIGTERM while decoding (device pipeline)', 'kill_prepare': 'kill -9 while preparing',
}


def data_flags(root: str, data_dir: str, pipeline: str = 'grain', *extra: str) -> list[str]:
    """The config of the data rows: the smoke model with random masks, 8 steps, a checkpoint
    every 4, all kept; ``pipeline`` 'grain' or 'device'."""
    return ['--config=configs/cifar10.py:smoke', f'--config.data.root={root}', f'--config.data.data_dir={data_dir}',
            f'--config.data.pipeline={pipeline}', '--config.batch_size=8', f'--config.total_steps={DATA_TOTAL}',
            '--config.warmup_steps=2', '--config.log_every_steps=1', '--config.ckpt.every_steps=4',
            '--config.ckpt.keep=1000', '--config.knn.every_epochs=0', '--config.image_summary_every_epochs=0',
            *extra]


def change_folder(root: str, kind: str, seed: int = 1) -> list[str]:
    """Changes an image folder as ``kind`` (:data:`FOLDER_CHANGES`); returns the paths (relative
    to ``root``) a refusal must name: 'replaced' writes other pixels into one image, 'swapped'
    exchanges a cat image and a dog image of the same name."""
    from PIL import Image
    if kind == 'replaced':
        rel = os.path.join('train', 'cat', '0001.png')
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(root, rel))
        return [rel]
    if kind == 'swapped':
        a, b = os.path.join('train', 'cat', '0002.png'), os.path.join('train', 'dog', '0002.png')
        tmp = os.path.join(root, 'swap.tmp')
        os.rename(os.path.join(root, a), tmp)
        os.rename(os.path.join(root, b), os.path.join(root, a))
        os.rename(tmp, os.path.join(root, b))
        return [a, b]
    raise ValueError(kind)


def damage_prepared(data_dir: str, kind: str) -> str:
    """Damages a prepared dataset folder as ``kind`` (:data:`PREPARED_DAMAGE`); returns the path
    a refusal must name."""
    shard = sorted(glob.glob(os.path.join(data_dir, '*.array_record-*')))[0]
    if kind == 'truncated':
        os.truncate(shard, os.path.getsize(shard) // 2)
        return shard
    if kind == 'flipped':
        with open(shard, 'r+b') as f:
            f.seek(os.path.getsize(shard) // 2)
            b = f.read(1)[0]
            f.seek(-1, 1)
            f.write(bytes([b ^ 0xFF]))
        return shard
    if kind == 'deleted':
        os.remove(shard)
        return shard
    if kind == 'no_dataset_info':
        path = os.path.join(data_dir, 'dataset_info.json')
        os.remove(path)
        return path
    raise ValueError(kind)


def damage_cache(images_path: str, kind: str) -> None:
    """Damages the device cache's ``<split>_images.npy`` as ``kind`` (:data:`CACHE_DAMAGE`), its
    record left as it was: 4 KiB inverted in the middle, the images at half the size, all zeros,
    the file cut in half."""
    if kind == 'inverted_4k':
        with open(images_path, 'r+b') as f:
            f.seek(os.path.getsize(images_path) // 2)
            chunk = f.read(4096)
            f.seek(-len(chunk), 1)
            f.write(bytes(255 - x for x in chunk))
    elif kind in ('half_size', 'zeros'):
        a = np.load(images_path)
        np.save(images_path, a[:, ::2, ::2] if kind == 'half_size' else np.zeros_like(a))
    elif kind == 'truncated':
        os.truncate(images_path, os.path.getsize(images_path) // 2)
    else:
        raise ValueError(kind)


def make_leftovers(data_dir: str) -> list[str]:
    """What a ``kill -9`` leaves: a tfds ``incomplete.*`` folder beside the prepared one and a
    temporary file of the device cache."""
    incomplete = os.path.join(os.path.dirname(data_dir), 'incomplete.KILLED_1.0.0')
    os.makedirs(incomplete, exist_ok=True)
    with open(os.path.join(incomplete, 'image_folder-train.array_record-00000-of-00001'), 'wb') as f:
        f.write(b'\0' * 4096)
    os.makedirs(os.path.join(data_dir, 'decoded'), exist_ok=True)
    tmp = os.path.join(data_dir, 'decoded', 'train_images.npy.99999.tmp.npy')
    with open(tmp, 'wb') as f:
        f.write(b'\0' * 4096)
    return [incomplete, tmp]


def leftovers(data_dir_root: str) -> list[str]:
    """Leftovers of preparations and decodings under a data_dir (incomplete folders, temporary
    files, lock files)."""
    found = glob.glob(os.path.join(data_dir_root, 'image_folder', '*', 'incomplete.*'))
    found += glob.glob(os.path.join(data_dir_root, 'image_folder', '*.lock'))
    found += glob.glob(os.path.join(data_dir_root, 'image_folder', '*', '*', 'decoded', '*.tmp*'))
    return sorted(found)


PREPARE = ('import sys; from colormae_jax import defaults; from colormae_jax.data import sources; '
           'c = defaults.data_config(); c.root, c.data_dir = sys.argv[1], sys.argv[2]; '
           'print(sources.content_digest(c))')


def prepare_only(root: str, data_dir: str) -> str:
    """Prepares ``root`` into ``data_dir`` in a subprocess (no training, verified when prepared
    already); returns the digest of the examples, in order (:func:`sources.content_digest`)."""
    out = subprocess.run([sys.executable, '-c', PREPARE, root, data_dir], cwd=REPO, env=launch_env(), check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return out.stdout.split()[-1]


class Mounts:
    """tmpfs and read-only bind mounts for the storage rows (root only); all unmounted at the end."""

    def __init__(self):
        self.points: list[str] = []

    @staticmethod
    def available() -> bool:
        if os.geteuid() != 0:
            return False
        d = tempfile.mkdtemp(prefix='faults_mount_')
        try:
            ok = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', d],
                                stderr=subprocess.DEVNULL).returncode == 0
            if ok:
                subprocess.run(['umount', d], check=True)
            return ok
        finally:
            os.rmdir(d)

    def tmpfs(self, path: str, size: str, ro: bool = False) -> str:
        os.makedirs(path, exist_ok=True)
        subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}' + (',ro' if ro else ''), 'tmpfs', path],
                       check=True)
        self.points.append(path)
        return path

    def resize(self, path: str, size: str) -> None:
        subprocess.run(['mount', '-o', f'remount,size={size}', path], check=True)

    def read_only(self, path: str) -> None:
        subprocess.run(['mount', '--bind', path, path], check=True)
        self.points.append(path)
        subprocess.run(['mount', '-o', 'remount,ro,bind', path], check=True)

    def release(self, path: str) -> None:
        if path in self.points:
            subprocess.run(['umount', path], check=False)
            self.points.remove(path)

    def release_all(self) -> None:
        for p in list(reversed(self.points)):
            self.release(p)


def _last_logged(err: str) -> int:
    """The last step whose loss the console writer logged (``[N] ... loss=``)."""
    last = 0
    for line in err.splitlines()[-400:]:
        if 'loss=' in line and '] [' in line:
            try:
                last = max(last, int(line.split('] [', 1)[1].split(']', 1)[0]))
            except ValueError:
                pass
    return last


def _resumed_at(err) -> int | None:
    err = err if isinstance(err, str) else err.err
    for line in err.splitlines():
        if 'Resumed from ' in line and ' at step ' in line:
            return int(line.rsplit(' at step ', 1)[1].rstrip('.'))
        if 'Training steps 1..' in line:
            return 0
    return None


def _saved_step(err: str) -> int | None:
    for line in err.splitlines():
        for key in ('Saved step ', ': saved step '):
            if key in line:
                try:
                    return int(line.split(key, 1)[1].split()[0].rstrip(';'))
                except (ValueError, IndexError):
                    pass
    return None


def _newest(steps: list[str]) -> int | None:
    digits = [int(s) for s in steps if s.isdigit()]
    return max(digits) if digits else None


def table(rows: list[dict]) -> str:
    out = ['| fault | tries | survived | data lost |', '|---|---|---|---|']
    for r in rows:
        out.append(f'| {r["fault"]} | {r["tries"]} | {r["survived"]} | '
                   f'{", ".join(r["data_lost"]) if r["data_lost"] else "nothing"} |')
    return '\n'.join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, of {",".join(CASES)}')
    p.add_argument('--tries', type=int, default=None, help='at most this many tries per case (a quick version)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--work', default='', help='where the runs go (default: a temporary folder, deleted)')
    p.add_argument('--out', default='', help='write the JSON here')
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(',') if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f'unknown cases {sorted(unknown)}; valid: {",".join(CASES)}')
    work = args.work or tempfile.mkdtemp(prefix='faults_')
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault('FAULTS_JAX_CACHE', os.path.join(work, 'jax_cache'))
    t0 = time.time()
    bench = Bench(work, args.tries, args.seed)
    try:
        if set(cases) - {'data'}:  # the data rows have their own references
            bench.reference()
        for c in cases:
            getattr(bench, f'case_{c}')()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(bench.rows))
    print(f'{Launch.count} launches in {time.time() - t0:.0f} s')
    result = {'command': 'python benchmarks/faults.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
              'machine': f'{platform.machine()}, {os.cpu_count()} CPUs', 'seconds': round(time.time() - t0, 1),
              'launches': Launch.count, 'total_steps': TOTAL_STEPS, 'flags': bench.flags, 'rows': bench.rows,
              'tries': bench.details}
    if 'data' in cases:
        result['data'] = {'total_steps': DATA_TOTAL, 'images': 2 * DATA_PER_CLASS,
                          'flags': data_flags('ROOT', 'DATA_DIR', 'grain|device')}
    if args.out:
        benchlib.write_json(args.out, result)
    return 0 if all(r['survived'] == r['tries'] and not r['data_lost'] for r in bench.rows) else 1


if __name__ == '__main__':
    sys.exit(main())
