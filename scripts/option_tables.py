"""Rewrite the option tables of the docs from the option schemas (``dspo_basicsr.utils.option_schema``).

Usage::

    python scripts/option_tables.py           # rewrite the marked sections of docs/options.md
    python scripts/option_tables.py --check   # exit 1 when the docs are not up to date
"""
import argparse
import os
import sys

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'options.md')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--check', action='store_true', help='only check that the docs are up to date')
    parser.add_argument('--docs', default=DOCS, help='the docs page with <!-- options: NAME --> markers')
    args = parser.parse_args(argv)
    from dspo_basicsr.option_check import update_option_docs
    with open(args.docs, encoding='utf-8') as f:
        text = f.read()
    updated = update_option_docs(text)
    if args.check:
        if updated != text:
            print(f'{args.docs} is not up to date: run python scripts/option_tables.py', file=sys.stderr)
            return 1
        return 0
    if updated != text:
        with open(args.docs, 'w', encoding='utf-8') as f:
            f.write(updated)
        print(f'rewrote the option tables of {args.docs}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
