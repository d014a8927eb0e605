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

  python benchmarks/faults.py --out benchmarks/results/faults_cpu.json
  python benchmarks/faults.py --cases kill,damage --tries 2        # a quick version
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
CASES = ('kill', 'term', 'damage', 'flip', 'concurrent')
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

    def __init__(self, wd: str, flags: list[str], env: dict | None = None):
        self.wd, self.t0 = wd, time.monotonic()
        self.tb_before = set(glob.glob(os.path.join(wd, 'tb', 'events.*')))
        self.p = subprocess.Popen([sys.executable, '-m', 'colormae_jax.main', *flags, f'--workdir={wd}'], cwd=REPO,
                                  env=env or launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    """The uninterrupted run: its losses, final checksum record and params."""

    def __init__(self, wd: str, losses: dict[int, float], steps: list[str]):
        self.wd, self.losses, self.steps = wd, losses, steps
        self.record = read_record(wd, TOTAL_STEPS)
        self.params = read_params(wd, TOTAL_STEPS)

    def final_state_differs(self, wd: str) -> str | None:
        """What differs from the reference's final state (None: bitwise equal)."""
        if not os.path.isdir(os.path.join(wd, 'checkpoints', str(TOTAL_STEPS))):
            return f'no step {TOTAL_STEPS}'
        rec = read_record(wd, TOTAL_STEPS)
        for part in ('state', 'extra', 'data', 'layout', 'config'):
            if rec.get(part) != self.record.get(part):
                return f'checksum record: {part} differs'
        got = read_params(wd, TOTAL_STEPS)
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
    missing = [s for s in range(start + 1, TOTAL_STEPS + 1) if s not in logged]
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
        bench.reference()
        for c in cases:
            getattr(bench, f'case_{c}')()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(bench.rows))
    result = {'command': 'python benchmarks/faults.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
              'machine': f'{platform.machine()}, {os.cpu_count()} CPUs', 'seconds': round(time.time() - t0, 1),
              'total_steps': TOTAL_STEPS, 'flags': bench.flags, 'rows': bench.rows, 'tries': bench.details}
    if args.out:
        benchlib.write_json(args.out, result)
    return 0 if all(r['survived'] == r['tries'] and not r['data_lost'] for r in bench.rows) else 1


if __name__ == '__main__':
    sys.exit(main())
