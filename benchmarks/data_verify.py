r"""What verifying the data costs at start-up (docs/pretraining.md, "Data you can trust").

Prepares an image folder (CIFAR-10 by default) into a new ``data_dir`` once (timed: the
preparation now reads and hashes every image while it decodes it, and hashes the files it
wrote), then, per round, what a new run does before it trains, each part timed alone:

* ``scan``: listing the folder and opening the prepared dataset (what a run did before the
  verification existed);
* ``source check``: a ``stat`` of every image against the record (:func:`sources._source_stats`,
  compared by :func:`sources._source_changes`);
* ``prepared files``: the SHA-256 of every prepared file against the record;
* ``prepare()`` whole, as a new run calls it (all of the above);
* the device pipeline's cache: ``np.load`` of the two ``.npy`` files as before, against
  :func:`device.decoded_split` (load, then shape, dtype, source and SHA-256 checks).

The file cache is warm after the first round, as on a relaunch. Prints a table and writes JSON.

  python benchmarks/data_verify.py --rounds 5 --out benchmarks/results/data_verify_cpu.json
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from colormae_jax import defaults
from colormae_jax.data import device, sources

import benchlib


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default='../shared/data/cifar10', help='the image folder (<split>/<class>/*.jpg)')
    p.add_argument('--data_dir', default='', help='where to prepare it (default: a new temporary folder, deleted)')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--out', default='')
    args = p.parse_args(argv)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix='data_verify_')
    c = defaults.data_config()
    c.root, c.data_dir = os.path.abspath(args.root), data_dir
    try:
        prep_s, builder = _timed(lambda: sources.prepare(c))
        splits = sorted(builder.info.splits)
        decode_s, _ = _timed(lambda: [device.decoded_split(c, s) for s in splits])
        record = sources._read_record(builder.data_dir)
        n_files = len(record['files'])
        mb = sum(f['size'] for f in record['files'].values()) / 2 ** 20
        cache_mb = sum(os.path.getsize(p) for s in splits for p in device._cache_paths(c, s)[:2]) / 2 ** 20
        rows = {k: [] for k in ('scan', 'source check', 'prepared files', 'prepare() whole', 'cache np.load',
                                'cache decoded_split')}
        for _ in range(args.rounds):
            sources.prepare.cache_clear()
            rows['scan'].append(_timed(lambda: (sources._scan(c.root), sources.get_builder(c)))[0])
            rows['source check'].append(_timed(lambda: sources._source_changes(builder, record, {}))[0])
            d = builder.data_dir
            rows['prepared files'].append(_timed(lambda: sources._hash_all(
                [os.path.join(d, n) for n in sorted(record['files'])], 'timing'))[0])
            sources.prepare.cache_clear()
            rows['prepare() whole'].append(_timed(lambda: sources.prepare(c))[0])
            rows['cache np.load'].append(_timed(lambda: [np.load(x) for s in splits
                                                         for x in device._cache_paths(c, s)[:2]])[0])
            rows['cache decoded_split'].append(_timed(lambda: [device.decoded_split(c, s) for s in splits])[0])
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f'{args.root}: {sum(builder.info.splits[s].num_examples for s in splits)} images; prepared files: '
          f'{n_files}, {mb:.1f} MB; device cache {cache_mb:.1f} MB; load average {os.getloadavg()[0]:.2f}')
    print(f'preparing: {prep_s:.1f} s; decoding the device cache: {decode_s:.1f} s')
    print('| part | median s | min s | max s |\n|---|---:|---:|---:|')
    for k, v in rows.items():
        print(f'| {k} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} |')
    verify = med['prepare() whole'] - med['scan']
    extra = med['cache decoded_split'] - med['cache np.load']
    print(f'verification at start-up: grain +{verify:.2f} s (prepare() {med["prepare() whole"]:.2f} s against the '
          f'scan alone {med["scan"]:.2f} s); device cache +{extra:.2f} s on top of loading it '
          f'({med["cache decoded_split"]:.2f} s against {med["cache np.load"]:.2f} s)')
    if args.out:
        benchlib.write_json(args.out, {
            'command': 'python benchmarks/data_verify.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
            'machine': f'{platform.machine()}, {os.cpu_count()} CPUs', 'load_average': os.getloadavg()[0],
            'images': {s: builder.info.splits[s].num_examples for s in splits}, 'prepared_files': n_files,
            'prepared_mb': mb, 'cache_mb': cache_mb, 'prepare_s': prep_s, 'decode_s': decode_s,
            'rounds': rows, 'median': med, 'verify_grain_s': verify, 'verify_cache_extra_s': extra})
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
