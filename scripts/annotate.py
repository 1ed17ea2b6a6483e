#!/usr/bin/env python
"""The annotation studio: a local web app for instance preferences, 2AFC pairs and win-rate studies.

    python scripts/annotate.py serve --work WORK --db WORK/annotations.sqlite [--top-k 5]
    python scripts/annotate.py serve --pairs results/mad/mad_pairs.csv --sr SR_ROOT --lr LR_ROOT --db pairs.sqlite
    python scripts/annotate.py serve --winrate results/dspo results/dpo --lq LQ --db winrate.sqlite [--rounds 3]
    python scripts/annotate.py report --db DB --out results/annotation [--write-instances]
    python scripts/annotate.py demo [--root datasets/demo]

``serve`` listens on 127.0.0.1:8765; ``--host 0.0.0.0`` exposes it and then requires an access token (printed
with the address). Each annotator's name is theirs once signed in (a secret in a browser cookie);
``--annotators a,b,c`` prints one invitation link per name and lets only those names sign in. A database
holds one study: once created, ``serve --db DB`` and ``report --db DB`` need no study arguments.
``report`` prints the majority votes, agreement (pairwise, Fleiss' kappa), answers and
time per annotator and win rates, and writes the exports: ``human_annotations.json`` (for
``score_instances.py --scorer human --annotations``; ``--write-instances`` also writes WORK/instances/ from
it), ``votes_realsr1k.csv`` + ``images/`` and ``vote_counts.csv`` (for ``rank_methods.py`` and
``TwoAFCPairDataset``), ``win_rates.csv`` and ``win_rates.png``.
"""
import argparse
import os
import sys

from dspo_basicsr.annotation.studies import StudyError


def _study_options(args):
    chosen = [name for name in ('work', 'pairs', 'winrate') if getattr(args, name)]
    if len(chosen) > 1:
        raise StudyError(f'Choose one study: --{" / --".join(chosen)} were all given.')
    if not chosen:
        return None
    if args.work:
        return {'kind': 'instances', 'work': args.work, 'top_k': args.top_k}
    if args.pairs:
        if not (args.sr and args.lr):
            raise StudyError('A 2AFC study needs --sr SR_ROOT (method folders) and --lr LR_ROOT with --pairs.')
        return {'kind': 'pairs', 'pairs_csv': args.pairs, 'sr_root': args.sr, 'lr_root': args.lr}
    if not args.lq:
        raise StudyError('A win-rate study needs --lq LQ_ROOT with --winrate A B.')
    return {'kind': 'winrate', 'folder_a': args.winrate[0], 'folder_b': args.winrate[1], 'lq_root': args.lq,
            'names': args.names, 'rounds': args.rounds}


def _add_study_arguments(parser):
    parser.add_argument('--db', required=True, help='SQLite file of the answers (created when missing)')
    parser.add_argument('--work', default=None, help='instances: work folder after segment_instances.py')
    parser.add_argument('--top-k', type=int, default=5, help='instances: the K largest instances per sample')
    parser.add_argument('--pairs', default=None, help="2AFC: mad_select.py's pairs CSV")
    parser.add_argument('--sr', default=None, help='2AFC: SR_ROOT/<method>/<image>.png')
    parser.add_argument('--lr', default=None, help='2AFC: LR_ROOT/<image>.png')
    parser.add_argument('--winrate', nargs=2, default=None, metavar=('A', 'B'), help='win rate: two result folders')
    parser.add_argument('--lq', default=None, help='win rate: the LQ inputs')
    parser.add_argument('--names', nargs=2, default=None, metavar=('NAME_A', 'NAME_B'), help='win rate: method names')
    parser.add_argument('--rounds', type=int, default=3, help='win rate: annotation rounds')


def _add_server_arguments(parser):
    parser.add_argument('--host', default='127.0.0.1', help='listen address (other than loopback needs a token)')
    parser.add_argument('--port', type=int, default=8765)
    parser.add_argument('--token', default=None, help='access token (default: a random one off loopback)')
    parser.add_argument('--annotators', default=None,
                        help='comma-separated names: print one invitation link each; only these names may sign in')


def _names(text):
    return [name.strip() for name in text.split(',') if name.strip()] if text else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    serve_parser = commands.add_parser('serve', help='run the web app of a study')
    _add_study_arguments(serve_parser)
    _add_server_arguments(serve_parser)
    report_parser = commands.add_parser('report', help='aggregate the answers and write the exports')
    _add_study_arguments(report_parser)
    report_parser.add_argument('--out', required=True, help='folder of the report and exports')
    report_parser.add_argument('--min-votes', type=int, default=1, help='instances: answers an item needs')
    report_parser.add_argument('--write-instances', action='store_true',
                               help='instances: also write WORK/instances/<sid>.json from the majority vote')
    demo_parser = commands.add_parser('demo', help="serve the embedded demo's instances (built when missing)")
    demo_parser.add_argument('--root', default='datasets/demo', help='folder of scripts/make_demo_data.py')
    demo_parser.add_argument('--db', default=None, help='default: ROOT/annotation_work/annotations.sqlite')
    _add_server_arguments(demo_parser)
    args = parser.parse_args(argv)

    from dspo_basicsr.annotation.studio import demo_work_folder, open_study, serve

    try:
        if args.command == 'demo':
            work = demo_work_folder(args.root)
            study, store = open_study(args.db or os.path.join(work, 'annotations.sqlite'),
                                      {'kind': 'instances', 'work': work})
            serve(study, store, args.host, args.port, args.token, annotators=_names(args.annotators))
            return 0
        study, store = open_study(args.db, _study_options(args))
        if args.command == 'serve':
            serve(study, store, args.host, args.port, args.token, annotators=_names(args.annotators))
            return 0
        from dspo_basicsr.annotation.report import format_report, write_report
        report = write_report(study, store, args.out, args.min_votes)
        print(format_report(report))
        if report.get('incomplete'):
            print(f'{len(report["incomplete"])} samples not fully answered are left out of the export: '
                  f'{", ".join(report["incomplete"][:5])}{" ..." if len(report["incomplete"]) > 5 else ""}')
        for name, path in report['files'].items():
            print(f'{name}: {path}')
        if args.write_instances:
            if study.kind != 'instances':
                raise StudyError('--write-instances is for an instance study.')
            from dspo_basicsr.annotation.studio import write_instance_files
            step = write_instance_files(study, report['files']['human_annotation'])
            print(step.summary())
            return 1 if step.failed else 0
        return 0
    except StudyError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
