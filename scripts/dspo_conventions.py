"""Print what DSPO's open conventions (instance error, area weights) do to a small instance at the default beta.

    python scripts/dspo_conventions.py [--beta 8000] [--delta 1e-4]

The figures of ``docs/objectives.md`` ("Conventions the paper leaves open"); the setting is described in
:mod:`dspo_basicsr.bench.dspo_conventions`.
"""
import argparse

from dspo_basicsr.bench.dspo_conventions import convention_figures
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--beta', type=float, default=DEFAULT_BETA, help='KL weight beta (default %(default)g)')
    parser.add_argument('--delta', type=float, default=1e-4, help='per-pixel error the policy removed on winners')
    args = parser.parse_args()
    for title, paired in (('all three instances paired', (True, True, True)),
                          ('only the small instance paired', (True, False, False))):
        print(f'{title} (beta {args.beta:g}, delta {args.delta:g}):')
        print('  instance_error  area_weights  | small: logit   weight   pixel grad | background: logit   weight   '
              'pixel grad')
        for row in convention_figures(args.beta, args.delta, paired):
            background = '-' if row['background_logit'] is None else f"{row['background_logit'] + 0.0:.4g}"
            print(f"  {row['instance_error']:<14}  {row['area_weights']:<12}  | {row['logit'] + 0.0:>12.4g} "
                  f"{row['weight']:>8.4g} {row['pixel_gradient']:>12.4g} | {background:>17} "
                  f"{row['background_weight']:>8.4g} {row['background_pixel_gradient']:>12.4g}")


if __name__ == '__main__':
    main()
