"""Where the demo's pretrained base loses PSNR on the held-out crops (bicubic, VAE round trip, sampled base).

    python scripts/demo_base_quality.py [-opt options/demo/dspo_demo.yml]

Works on every demo option file (options/demo/dspo_<framework>_demo.yml too); prints JSON, in dB.
"""
import argparse
import json

from dspo_basicsr.demo.base_quality import base_quality


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', default='options/demo/dspo_demo.yml', help='a demo training option file')
    args = parser.parse_args()
    import dspo_basicsr  # noqa: F401  (registers the frameworks)
    print(json.dumps(base_quality(args.opt), indent=2))


if __name__ == '__main__':
    main()
