"""Build a framework demo: a tiny SeeSR / AddSR / OSEDiff pretrained on the demo crops (released layouts) and a
preference set sampled by it, under ROOT/<framework>/ (dspo_basicsr/demo/frameworks.py).

    python scripts/make_framework_demo.py --framework seesr|addsr|osediff [--root datasets/demo] [--overwrite]
    basicsr train -opt options/demo/dspo_<framework>_demo.yml
"""
import argparse
import json
import time

from dspo_basicsr.demo.frameworks import FRAMEWORK_DEMOS, build_framework_demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--framework', required=True, choices=sorted(FRAMEWORK_DEMOS))
    parser.add_argument('--root', default='datasets/demo', help='output folder (the framework gets ROOT/<framework>)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true', help='rebuild an existing framework demo')
    args = parser.parse_args()
    import dspo_basicsr  # noqa: F401  (registers the frameworks)
    start = time.perf_counter()
    try:
        paths = build_framework_demo(args.framework, args.root, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as err:
        raise SystemExit(str(err)) from None
    paths['seconds'] = round(time.perf_counter() - start, 1)
    print(json.dumps(paths, indent=2))


if __name__ == '__main__':
    main()
