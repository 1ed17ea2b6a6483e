"""Build the tiny embedded demo: tiny SD2 + ControlNet folder, a preference LMDB set, validation folders.

    python scripts/make_demo_data.py [--root datasets/demo] [--overwrite] [--held-out-pairs]

--held-out-pairs also writes ROOT/demo_pref_val.lmdb, a preference set of the validation crops built the same
way, on which options/demo/compare_*.yml measure the implicit accuracy.
"""
import argparse
import json

from dspo_basicsr.demo.dspo import build_demo_data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default='datasets/demo', help='output folder')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--size', type=int, default=64, help='SR crop size')
    parser.add_argument('--crops-per-photo', type=int, default=2, help='training crops per bundled photo')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true', help='replace an existing preference set')
    parser.add_argument('--held-out-pairs', action='store_true',
                        help='also build demo_pref_val.lmdb from the validation crops (the compare options need it)')
    args = parser.parse_args()
    import dspo_basicsr  # noqa: F401  (registers the framework)
    paths = build_demo_data(args.root, args.scale, args.size, args.crops_per_photo, seed=args.seed,
                            overwrite=args.overwrite, held_out_pairs=args.held_out_pairs)
    print(json.dumps(paths, indent=2))


if __name__ == '__main__':
    main()
