#!/usr/bin/env python
"""Data-building throughput, measured side by side in one run on the tiny framework.

1. Candidates/s of one LQ image under ``--seeds`` settings that differ only in seed: sampled as one batch
   (``sampling.batch_size``) against one by one (batch size 1). Both runs produce the same candidates.
2. VLM-scored instances/s of the scoring step against a local stub VLM server (127.0.0.1) answering after
   ``--latency`` seconds: ``max_concurrency`` 8 against 1, each with a fresh request cache.

Example::

    python scripts/bench_data_building.py --seeds 8 --latency 0.2
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import dspo_basicsr  # noqa: F401  (registers the archs and metrics)
from dspo_basicsr.preference.candidates import expand_settings_grid, sample_candidates
from dspo_basicsr.preference.pipeline import (
    WorkFolder,
    build_framework,
    discover_inputs,
    run_candidate_step,
    run_scoring_step,
    run_segment_step,
    scorer_from_options,
    write_image,
)
from dspo_basicsr.preference.vlm_stub_server import StubVLMServer


def bench_candidates(framework, args):
    rng = np.random.default_rng(0)
    lq = rng.integers(0, 256, (args.lq_size, args.lq_size, 3), dtype=np.uint8)
    settings = expand_settings_grid({'seed': list(range(args.seeds))},
                                    {'steps': args.steps, 'guidance_scale': 3.0, 'seed': 0, 'sampler': 'ddpm'})
    sample_candidates(framework, lq, settings[:2], batch_size=2)  # warm-up
    best = {1: float('inf'), args.seeds: float('inf')}
    outputs = {}
    for _ in range(args.repeats):
        for batch_size in best:  # alternated, so both see the same machine load
            start = time.perf_counter()
            outputs[batch_size] = sample_candidates(framework, lq, settings, prompt='a photo', batch_size=batch_size)
            best[batch_size] = min(best[batch_size], time.perf_counter() - start)
    differ = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(outputs[1], outputs[args.seeds]))
    rates = {b: len(settings) / seconds for b, seconds in best.items()}
    print(f'candidates: {len(settings)} seeds of one {args.lq_size}x{args.lq_size} LQ image, {args.steps} DDPM steps, '
          f'best of {args.repeats}; largest pixel difference batched vs one-by-one: {differ}')
    print(f'  one by one   {rates[1]:8.2f} candidates/s')
    ratio = rates[args.seeds] / rates[1]
    print(f'  batch of {args.seeds:<3} {rates[args.seeds]:8.2f} candidates/s   ratio {ratio:.2f}x')


def quadrants(image):
    """A segmenter of four instances: the quadrants of the image."""
    h, w = image.shape[:2]
    masks = []
    for rows in (slice(0, h // 2), slice(h // 2, h)):
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            mask = np.zeros((h, w), bool)
            mask[rows, cols] = True
            masks.append(mask)
    return masks


def segmented_work_folder(root, framework, num_images):
    rng = np.random.default_rng(1)
    lq_dir = os.path.join(root, 'lq')
    os.makedirs(lq_dir)
    for i in range(num_images):
        write_image(os.path.join(lq_dir, f'img{i:03d}.png'), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    work = WorkFolder(os.path.join(root, 'work'))
    settings = expand_settings_grid({'seed': [1, 2]}, {'steps': 2, 'guidance_scale': 3.0, 'seed': 0})
    run_candidate_step(work, discover_inputs(lq_dir), framework, settings, num_keep=3,
                       metrics={}, progress=False)  # the candidates' scores do not matter here
    run_segment_step(work, quadrants, progress=False)
    if len(work.sids('seg')) != num_images:
        sys.exit(f'building the benchmark work folder failed in {work.root}.')
    return work


def bench_vlm(framework, args, root):
    work = segmented_work_folder(root, framework, args.images)
    rates = {}
    for concurrency in (1, 8):
        with StubVLMServer(latency=args.latency) as server:
            opt = {'scorer': {'type': 'vlm', 'min_crop': 16, 'base_url': server.base_url, 'model': 'stub',
                              'api_key_env': None, 'max_concurrency': concurrency,
                              'cache_dir': os.path.join(root, f'cache_{concurrency}')}}
            start = time.perf_counter()
            report = run_scoring_step(work, scorer_from_options(opt), top_k=args.top_k, overwrite=True,
                                      progress=False)
            seconds = time.perf_counter() - start
            if report.failed or not server.requests:
                sys.exit(f'scoring failed: {report.summary()}')
            rates[concurrency] = server.requests / seconds
            in_flight = server.max_in_flight
        print(f'  max_concurrency {concurrency}   {rates[concurrency]:8.2f} instances/s   '
              f'({server.requests} requests in {seconds:.2f} s, at most {in_flight} in flight)')
    print(f'  ratio {rates[8] / rates[1]:.2f}x')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, default=8, help='candidate settings differing only in seed')
    parser.add_argument('--steps', type=int, default=10, help='sampling steps per candidate')
    parser.add_argument('--lq-size', type=int, default=16, help='LQ height and width (SR is 4x)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--latency', type=float, default=0.2, help='seconds the stub VLM takes per answer')
    parser.add_argument('--images', type=int, default=16, help='images scored in the VLM benchmark')
    parser.add_argument('--top-k', type=int, default=3, help='instances scored per image')
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    framework = build_framework({'network': {'type': 'TinyControlSD2Arch', 'scale': 4}})
    print(f'tiny ControlSD2Arch on CPU, {torch.get_num_threads()} threads')
    bench_candidates(framework, args)
    print(f'VLM scoring: {args.images} images x {args.top_k} instances, stub server answering after '
          f'{args.latency * 1000:.0f} ms')
    with tempfile.TemporaryDirectory() as root:
        bench_vlm(framework, args, root)


if __name__ == '__main__':
    main()
