#!/usr/bin/env python
"""Contact sheets of a preference set (or of a work folder before assembly, e.g. for human annotators).

    python scripts/show_preference_set.py datasets/mine.lmdb --out sheets/
    python scripts/show_preference_set.py --work WORK --out sheets/

Each sheet shows LQ | candidates c0..c{N-1} | the label map over the default candidate; the instances a
candidate is preferred in are outlined green (+id), dispreferred red (-id).
"""
import argparse
import sys

import dspo_basicsr  # noqa: F401
from dspo_basicsr.data.preference_set import PreferenceLMDB
from dspo_basicsr.preference.contact_sheet import write_contact_sheets
from dspo_basicsr.preference.pipeline import WorkFolder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('set', nargs='?', default=None, help='preference set NAME.lmdb')
    parser.add_argument('--work', default=None, help='show a work folder (items finished through scoring)')
    parser.add_argument('--out', required=True, help='output folder of <sid>.png sheets')
    parser.add_argument('--ids', nargs='*', default=None, help='only these sample ids')
    parser.add_argument('--limit', type=int, default=None, help='at most this many samples')
    parser.add_argument('--height', type=int, default=256, help='tile height in pixels')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    if (args.set is None) == (args.work is None):
        parser.error('give either a preference set or --work')

    if args.set:
        source = PreferenceLMDB(args.set)
        ids, load = source.ids(), source.__getitem__
    else:
        source = WorkFolder(args.work)
        ids, load = source.sids('instances'), source.load_sample
    if args.ids:
        missing = sorted(set(args.ids) - set(ids))
        if missing:
            parser.error(f'sample ids not found: {", ".join(missing)}')
        ids = [sid for sid in ids if sid in set(args.ids)]
    ids = ids[:args.limit] if args.limit else ids
    paths = write_contact_sheets((load(sid) for sid in ids), args.out, height=args.height,
                                 progress=not args.no_progress)
    print(f'{len(paths)} contact sheets in {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
