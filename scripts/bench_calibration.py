"""Benchmark: rank-calibration epoch time with cached backbone features vs recomputing the backbone, and MAD
selection backbone passes / time with feature reuse vs per-pair computation. One run, ratios side by side.

    python scripts/bench_calibration.py [--epochs 4] [--images 8] [--methods 4] [--device cpu]
                                        [--cache-backend memory|lmdb]
"""
import argparse

from dspo_basicsr.bench.calibration import bench_feature_cache, bench_mad_reuse


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=4, help='epochs per setting (cached: the first fills the cache)')
    parser.add_argument('--images', type=int, default=8, help='images per method')
    parser.add_argument('--methods', type=int, default=4, help='SR methods (calibration); MAD uses one more')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cache-backend', default='memory', choices=['memory', 'lmdb'])
    args = parser.parse_args()

    print('Rank calibration, CLIP ViT-B/32-sized backbone (random weights), rectifier-only training:')
    cache = bench_feature_cache(args.epochs, args.methods, args.images, backend=args.cache_backend,
                                device=args.device)
    print('MAD selection, VGG16-sized D1 (DISTS-like) and D2 backbones:')
    mad = bench_mad_reuse(methods=args.methods + 1, images=args.images, device=args.device)

    print()
    print(f'{"":34} {"baseline":>14} {"ours":>14} {"ratio":>8}')
    print(f'{"calibration epoch (s, median)":34} {cache["uncached"]:>14.3f} {cache["cached"]:>14.4f} '
          f'{cache["speedup"]:>7.1f}x   (recompute backbone vs cached; first cached epoch '
          f'{cache["cached_first"]:.3f} s fills the cache)')
    print(f'{"calibration backbone passes":34} {cache["uncached_passes"]:>14d} {cache["cached_passes"]:>14d} '
          f'{cache["uncached_passes"] / cache["cached_passes"]:>7.1f}x   ({args.epochs} epochs, '
          f'{cache["images_per_epoch"]} images per epoch)')
    print(f'{"MAD D1 + D2 backbone passes":34} {mad["per_pair"]["d1"] + mad["per_pair"]["d2"]:>14d} '
          f'{mad["reuse"]["d1"] + mad["reuse"]["d2"]:>14d} '
          f'{(mad["per_pair"]["d1"] + mad["per_pair"]["d2"]) / (mad["reuse"]["d1"] + mad["reuse"]["d2"]):>7.1f}x   '
          f'(per pair vs reused; D1 {mad["per_pair"]["d1"]} vs {mad["reuse"]["d1"]})')
    print(f'{"MAD selection time (s)":34} {mad["per_pair"]["seconds"]:>14.3f} {mad["reuse"]["seconds"]:>14.3f} '
          f'{mad["speedup"]:>7.1f}x   (same selection: {mad["same_selection"]})')


if __name__ == '__main__':
    main()
