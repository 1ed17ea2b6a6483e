"""Generate the synthetic data of the BIQA rank-calibration demo (options/demo/biqa_calibration_demo.yml).

    python scripts/make_biqa_demo_data.py [--root datasets/demo/biqa] [--images 12] [--seed 0]
"""
import argparse
import json

from dspo_basicsr.demo.biqa import make_biqa_demo_data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default='datasets/demo/biqa', help='output folder')
    parser.add_argument('--images', type=int, default=12, help='scenes per method')
    parser.add_argument('--size', type=int, default=48, help='image side')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make_biqa_demo_data(args.root, num_images=args.images, size=args.size, seed=args.seed),
                     indent=2))


if __name__ == '__main__':
    main()
