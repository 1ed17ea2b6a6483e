"""Annotation studio without a browser: store, studies, statistics, exports, and the server's HTTP rules."""
import json
import os
import runpy
import sqlite3
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from dspo_basicsr.annotation.report import (
    fleiss_kappa,
    human_annotation_json,
    majority_instances,
    pairwise_agreement,
    wilson_interval,
    write_report,
)
from dspo_basicsr.annotation.server import render_item_page
from dspo_basicsr.annotation.store import AnnotationStore
from dspo_basicsr.annotation.studies import InstanceStudy, PairStudy, StudyError, WinRateStudy, inside_roots
from dspo_basicsr.annotation.studio import access_token, open_study
from dspo_basicsr.data.iqa_list_dataset import TwoAFCPairDataset
from dspo_basicsr.ranking.votes import read_votes

from annotation_fixtures import (
    ThreadServer,
    make_method_folders,
    make_work_folder,
    write_descriptions,
    write_pairs_csv,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def browser_session():
    """An opener that keeps cookies (one annotator's browser)."""
    import http.cookiejar
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def request(url, body=None, headers=None, session=None, data=None):
    """``(status, bytes)`` of a GET, or of a POST of ``body`` as JSON (or of raw ``data``)."""
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json', **(headers or {})})
    try:
        with (session or urllib.request.build_opener()).open(req, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# -- statistics ---------------------------------------------------------------------------------------------
def test_fleiss_kappa_and_agreement_match_known_values():
    # Fleiss' kappa example of Wikipedia (10 items, 14 raters, 5 categories): kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    labels = [[c for c, count in enumerate(row) for _ in range(count)] for row in table]
    assert fleiss_kappa(labels) == pytest.approx(0.2099, abs=5e-4)
    assert fleiss_kappa([['a', 'a'], ['b', 'b']]) == pytest.approx(1.0)
    assert fleiss_kappa([['a', 'b'], ['a', 'b']]) == pytest.approx(-1.0)
    assert fleiss_kappa([['a']]) is None  # one rater per item: no agreement to measure
    assert pairwise_agreement([['a', 'a', 'b'], ['c', 'c']]) == pytest.approx(2 / 4)


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


# -- store --------------------------------------------------------------------------------------------------
def test_store_writes_each_answer_durably_and_undo_keeps_the_log(tmp_path):
    path = tmp_path / 'a.sqlite'
    store = AnnotationStore(path)
    first = store.add_answer('ann', 'x/1', 0, {'best': 1}, {'position': 0}, 2.5)
    store.add_answer('ann', 'x/2', 0, {'best': 0}, {'position': 1}, 1.0)
    assert store.undo_last('ann').item == 'x/2'
    # a second connection (another process after a crash) sees the committed rows; WAL mode is on
    other = sqlite3.connect(path)
    assert other.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    assert other.execute('SELECT COUNT(*), SUM(undone) FROM answers').fetchone() == (2, 1)
    reopened = AnnotationStore(path)
    assert [(a.id, a.item, a.answer, a.seconds) for a in reopened.answers()] == [(first, 'x/1', {'best': 1}, 2.5)]
    assert reopened.undo_last('nobody') is None
    (tmp_path / 'junk.sqlite').write_bytes(b'not a database' * 100)
    with pytest.raises(ValueError, match='is not an annotation database'):
        AnnotationStore(tmp_path / 'junk.sqlite')


# -- instance study -----------------------------------------------------------------------------------------
def test_instance_study_items_crops_and_resume_order(tmp_path):
    work = make_work_folder(str(tmp_path), num=2, descriptions={'img0': {1: ['a red ball', '<b>x</b>', 'a dog']}})
    study = InstanceStudy(work.root, top_k=2, min_crop=16)
    assert len(study.items) == 4 and all(study.split(k)[1] in study.records[study.split(k)[0]]['instances']
                                         for k in study.items)
    # the K largest instances, by area, largest first
    with open(work.seg_json('img0')) as handle:
        areas = json.load(handle)['areas']
    assert study.records['img0']['instances'] == sorted(range(len(areas)), key=lambda i: (-areas[i], i))[:2]
    order = study.order('ann', 0)
    assert sorted(order) == sorted(study.items) and order == study.order('ann', 0)  # fixed per annotator
    assert study.next_item({(0, order[0])}, 'ann') == (0, order[1])
    # crops: the candidate crop is SR-sized, the LQ crop 4x smaller, the whole image on request
    import cv2
    key = 'img0/' + str(study.records['img0']['instances'][0])
    crop = cv2.imdecode(np.frombuffer(study.image_png(key, 'c0'), np.uint8), cv2.IMREAD_COLOR)
    lq = cv2.imdecode(np.frombuffer(study.image_png(key, 'lq'), np.uint8), cv2.IMREAD_COLOR)
    full = cv2.imdecode(np.frombuffer(study.image_png(key, 'c0', full=True), np.uint8), cv2.IMREAD_COLOR)
    assert full.shape == (32, 32, 3) and min(crop.shape[:2]) >= 16
    assert crop.shape[0] <= 4 * lq.shape[0] < crop.shape[0] + 4 and crop.shape[1] <= 4 * lq.shape[1] < crop.shape[1] + 4
    assert (full[..., 0] == 255).any()  # the magenta outline is drawn
    with pytest.raises(KeyError):
        study.image_png('../../etc/passwd', 'c0')
    with pytest.raises(KeyError):
        study.image_png(key, 'c9')
    # every text of the page is escaped
    study.records['img0']['prompt'] = '<img src=x onerror=alert(1)>'
    page = render_item_page(study, 'an<i>', 0, 'img0/1', 0)
    assert '<img src=x' not in page and '&lt;img src=x onerror=alert(1)&gt;' in page
    assert '&lt;b&gt;x&lt;/b&gt;' in page and 'an&lt;i&gt;' in page and '<i>' not in page
    with pytest.raises(ValueError, match='two different candidates'):
        study.validate('img0/1', {'best': 1, 'worst': 1})
    with pytest.raises(ValueError, match='candidate index 0..2'):
        study.validate('img0/1', {'best': 1, 'worst': 3})


def test_files_outside_the_study_folders_are_refused(tmp_path):
    inside = tmp_path / 'work'
    inside.mkdir()
    (tmp_path / 'secret.png').write_bytes(b'x')
    os.symlink(tmp_path / 'secret.png', inside / 'link.png')
    assert inside_roots(str(inside / 'link.png'), [str(inside)]) is None  # a symlink out of the folder
    assert inside_roots(str(inside / '..' / 'secret.png'), [str(inside)]) is None
    assert inside_roots(str(inside / 'a.png'), [str(inside)]) == os.path.realpath(inside / 'a.png')
    sr, lr = make_method_folders(str(tmp_path / 'm'))
    outside = write_pairs_csv(tmp_path / 'bad.csv', str(tmp_path / 'elsewhere'), [('ours', 'sharp', '0001')])
    with pytest.raises(StudyError, match='line 2: the image of method'):
        PairStudy(outside, sr, lr)


def test_majority_vote_ties_and_no_preference_give_no_pair(tmp_path):
    work = make_work_folder(str(tmp_path), num=1)
    study = InstanceStudy(work.root, top_k=3, min_crop=16)
    keys = [f'img0/{i}' for i in study.records['img0']['instances']]
    write_descriptions(work, 'img0', {study.records['img0']['instances'][0]: ['sky', 'smeared fur', 'tree']})
    store = AnnotationStore(tmp_path / 'a.sqlite')

    def answer(name, key, best=None, worst=None, ticks=()):
        value = {'no_preference': True} if best is None else {'best': best, 'worst': worst}
        store.add_answer(name, key, 0, study.validate(key, dict(value, hallucinated=list(ticks))), {}, 1.0)

    answer('a', keys[0], 2, 0, ticks=[1])
    answer('b', keys[0], 2, 1, ticks=[1])
    answer('c', keys[0], 1, 0)
    answer('a', keys[1], 0, 1)     # best tie between 0 and 2: no pair
    answer('b', keys[1], 2, 1)
    answer('a', keys[2], 0, 1)     # "no clear preference" wins
    answer('b', keys[2])
    answer('c', keys[2])
    majority = majority_instances(study, store.answers())
    first = majority[keys[0]]
    assert (first['win'], first['lose'], first['votes']) == (2, 0, 3)
    assert first['negative'] == ['smeared fur']  # ticked by 2 of 3
    assert (majority[keys[1]]['win'], majority[keys[1]]['lose']) == (-1, -1)
    assert (majority[keys[2]]['win'], majority[keys[2]]['lose'], majority[keys[2]]['no_preference']) == (-1, -1, 2)
    content, incomplete = human_annotation_json(study, majority)
    assert not incomplete and list(content['samples']['img0']['instances']) == [keys[0].split('/')[1]]
    assert len(majority_instances(study, store.answers(), min_votes=3)) == 2


# -- server over HTTP ---------------------------------------------------------------------------------------
def test_server_answers_undo_resume_token_and_refusals(tmp_path):
    work = make_work_folder(str(tmp_path), num=1)
    study, store = open_study(str(tmp_path / 'a.sqlite'), {'kind': 'instances', 'work': work.root, 'top_k': 2})
    server = ThreadServer(study, store)
    ann = browser_session()
    try:
        status, page = request(server.url + 'annotate?annotator=ann', session=ann)
        first = study.next_item(set(), 'ann')[1]
        assert status == 200 and f'data-item="{first}"'.encode() in page
        status, _ = request(server.url + 'api/answer', {'annotator': 'ann', 'item': first, 'round': 0,
                                                        'answer': {'best': 0, 'worst': 2}, 'seconds': 3}, session=ann)
        assert status == 200
        # the same item again (a stale tab) is refused; so is a bad answer
        assert request(server.url + 'api/answer', {'annotator': 'ann', 'item': first, 'round': 0,
                                                   'answer': {'best': 0, 'worst': 2}}, session=ann)[0] == 409
        second = study.next_item({(0, first)}, 'ann')[1]
        status, body = request(server.url + 'api/answer', {'annotator': 'ann', 'item': second, 'round': 0,
                                                           'answer': {'best': 0, 'worst': 0}}, session=ann)
        assert status == 400 and b'two different candidates' in body
        assert request(server.url + 'api/undo', {'annotator': 'ann'}, session=ann)[0] == 200
        assert f'data-item="{first}"'.encode() in request(server.url + 'annotate?annotator=ann', session=ann)[1]
        # images: only the study's items and roles; nothing by path
        assert request(server.url + f'image?item={first}&role=c0')[0] == 200
        for query in ('item=..%2F..%2Fetc%2Fpasswd&role=c0', f'item={first}&role=..%2F..%2Fseg',
                      'item=img0%2F..%2F..%2F..&role=lq'):
            assert request(server.url + 'image?' + query)[0] == 404
        assert request(server.url + 'static/..%2Fserver.py')[0] == 404
        assert request(server.url + 'static/annotate.js')[0] == 200
        # a loopback server: other host names and non-JSON posts (a cross-site form) are refused
        assert request(server.url + 'api/progress', headers={'Host': 'evil.example:80'})[0] == 400
        assert request(server.url + 'api/undo', {'annotator': 'ann'}, headers={'Content-Type': 'text/plain'})[0] == 400
    finally:
        server.stop()
    # a token server refuses requests without it, accepts it once as ?token= then by cookie or header
    assert access_token('127.0.0.1') is None and access_token('0.0.0.0') and access_token('0.0.0.0', 'abc') == 'abc'
    server = ThreadServer(study, store, token='s3cret')
    try:
        assert request(server.url + 'api/progress')[0] == 403
        assert request(server.url + 'annotate?annotator=ann&token=wrong')[0] == 403
        assert request(server.url + 'api/progress?token=s3cret')[0] == 200
        assert request(server.url + 'api/progress', headers={'X-Annotation-Token': 's3cret'})[0] == 200
        assert request(server.url + 'api/undo', {'annotator': 'ann'})[0] == 403
    finally:
        server.stop()
    # the database belongs to its study
    with pytest.raises(StudyError, match='belongs to another study'):
        open_study(str(tmp_path / 'a.sqlite'), {'kind': 'instances', 'work': work.root, 'top_k': 3})
    assert open_study(str(tmp_path / 'a.sqlite'))[0].top_k == 2


def test_server_caps_bodies_checks_types_and_keeps_each_annotator_to_their_own_name(tmp_path):
    """Issue 24 item 7: 413 for a large body, 400 (no traceback) for bad types, 403 for another's name."""
    from dspo_basicsr.annotation.server import MAX_BODY_BYTES
    from dspo_basicsr.annotation.studio import invitation_links

    work = make_work_folder(str(tmp_path), num=1)
    study, store = open_study(str(tmp_path / 'a.sqlite'), {'kind': 'instances', 'work': work.root, 'top_k': 2})
    server = ThreadServer(study, store)
    ann, eve = browser_session(), browser_session()
    try:
        assert request(server.url + 'annotate?annotator=ann', session=ann)[0] == 200  # first sign-in: secret issued
        first = study.next_item(set(), 'ann')[1]
        base = {'annotator': 'ann', 'item': first, 'round': 0}
        huge = json.dumps(dict(base, answer={'best': 0, 'worst': 1}, pad='x' * (MAX_BODY_BYTES + 1))).encode()
        assert request(server.url + 'api/answer', session=ann, data=huge)[0] == 413
        for bad in ({'answer': 'best'}, {'round': [0]}, {'round': '0'}, {'item': 7},
                    {'answer': {'best': 0, 'worst': 1, 'hallucinated': [{}]}}, {'annotator': ['ann']}):
            status, body = request(server.url + 'api/answer', {**base, 'answer': {'best': 0, 'worst': 1}, **bad},
                                   session=ann)
            assert status == 400 and b'Traceback' not in body and json.loads(body)['error'], bad
        # another browser can neither take the name nor answer or undo for it
        assert request(server.url + 'annotate?annotator=ann', session=eve)[0] == 403
        assert request(server.url + 'api/answer', dict(base, answer={'best': 0, 'worst': 1}), session=eve)[0] == 403
        assert request(server.url + 'api/undo', {'annotator': 'ann'}, session=eve)[0] == 403
        assert request(server.url + 'api/answer', dict(base, answer={'best': 0, 'worst': 1}), session=ann)[0] == 200
        assert request(server.url + 'annotate?annotator=eve', session=eve)[0] == 200  # a name of one's own
        cookie = next(c for c in ann.handlers if hasattr(c, 'cookiejar')).cookiejar
        assert all(c.has_nonstandard_attr('HttpOnly') for c in cookie)
    finally:
        server.stop()
    assert [a.item for a in store.answers('ann')] == [first]
    # invitation links: only the invited names sign in, each with their own link
    links = invitation_links(store, 'http://127.0.0.1:0/', ['bo', 'ann'])
    assert 'invite=' in links['bo'] and links['bo'] != links['ann']
    server = ThreadServer(study, store, invited_only=True)
    try:
        bo = browser_session()
        assert request(server.url + 'annotate?annotator=bo', session=bo)[0] == 403
        assert request(server.url + 'annotate?annotator=zed', session=bo)[0] == 403
        assert request(server.url + links['bo'].split('/', 3)[3], session=bo)[0] == 200
        assert request(server.url + 'annotate?annotator=bo', session=bo)[0] == 200  # the cookie now
        assert request(server.url + 'annotate?annotator=ann', session=ann)[0] == 200
    finally:
        server.stop()


# -- 2AFC and win-rate exports -------------------------------------------------------------------------------
def test_pair_study_export_feeds_rank_methods_and_the_2afc_dataset(tmp_path, monkeypatch):
    sr, lr = make_method_folders(str(tmp_path / 'm'))
    methods = ('bicubic', 'ours', 'sharp')
    pairs = [(a, b, image) for i, a in enumerate(methods) for b in methods[i + 1:] for image in ('0001', '0002')]
    study = PairStudy(write_pairs_csv(tmp_path / 'mad_pairs.csv', sr, pairs), sr, lr)
    store = AnnotationStore(tmp_path / 'p.sqlite')
    quality = {'ours': 2, 'bicubic': 1, 'sharp': 0}
    for name in ('ann1', 'ann2', 'ann3'):
        for key in study.order(name, 0):
            pair = study.pairs[key]
            better = 'a' if quality[pair['method_a']] > quality[pair['method_b']] else 'b'
            if name == 'ann3' and pair['image'] == '0001':
                better = 'a' if better == 'b' else 'b'  # one annotator disagrees on half the pairs
            store.add_answer(name, key, 0, study.validate(key, {'choice': better}), study.shown(key, name, 0), 1.0)
    shown = [a.shown for a in store.answers()]
    # sides are shuffled per annotator: the same pair is not shown the same way to everyone
    sides = {(a.item, a.shown['left']) for a in store.answers()}
    assert {s['left'] for s in shown} == set(methods) and len(sides) > len(study.items)
    report = write_report(study, store, str(tmp_path / 'out'))
    assert report['agreement']['method']['pairwise_agreement'] == pytest.approx((6 * 3 - 3 * 2) / (6 * 3))
    votes = read_votes(report['files']['count_matrix'])
    assert votes.counts()[votes.names.index('ours'), votes.names.index('sharp')] == 5  # 2 images x 3 - 1
    monkeypatch.setattr(sys, 'argv', ['rank_methods.py', report['files']['count_matrix'], '--prior', '0.5',
                                      '--bootstrap', '50', '--out', str(tmp_path / 'ranking')])
    runpy.run_path(os.path.join(ROOT, 'scripts', 'rank_methods.py'), run_name='__main__')
    with open(tmp_path / 'ranking' / 'ranking.json') as handle:
        ranking = json.load(handle)
    assert sorted(ranking['scores'], key=lambda m: -ranking['scores'][m]) == ['ours', 'bicubic', 'sharp']
    dataset = TwoAFCPairDataset({'meta_file': report['files']['realsr1k_votes'],
                                 'dataroot': str(tmp_path / 'out' / 'images'),
                                 'columns': {'pair': 'sr_pair_names', 'image_a': 'name1_column',
                                             'image_b': 'name2_column', 'fraction_a': 'score1_column',
                                             'fraction_b': 'score2_column'}})
    assert len(dataset) == 6
    with open(report['files']['realsr1k_votes']) as handle:
        rows = [line.strip().split(',') for line in handle]
    assert rows[0] == ['sr_pair_names', 'group', 'name1_column', 'name2_column', 'score1_column', 'score2_column']
    assert ['ours_sharp', 'mad', '0001_ours.png', '0001_sharp.png', '0.666667', '0.333333'] in rows
    item = next(dataset[i] for i in range(6) if dataset.items[i]['path_a'].endswith('0001_ours.png'))
    assert item['fraction_a'] == pytest.approx(2 / 3, abs=1e-5) and '/images/0001_ours.png' in item['key_a']
    assert item['img_a'].shape == (3, 32, 32)


def test_win_rate_study_report_per_round_and_plot(tmp_path):
    sr, lr = make_method_folders(str(tmp_path / 'm'))
    study = WinRateStudy(os.path.join(sr, 'ours'), os.path.join(sr, 'sharp'), lr, rounds=2)
    store = AnnotationStore(tmp_path / 'w.sqlite')
    for round_index in range(2):
        for n, key in enumerate(study.order('ann', round_index)):
            choice = 'a' if round_index == 0 or n == 0 else 'b'  # round 1: 3/3 for ours, round 2: 1/3
            store.add_answer('ann', key, round_index, study.validate(key, {'choice': choice}),
                             study.shown(key, 'ann', round_index), 1.0)
    report = write_report(study, store, str(tmp_path / 'out'))
    rows = {r['round']: r for r in report['win_rates']}
    assert (rows[1]['wins'], rows[2]['wins'], rows['all']['wins'], rows['all']['answers']) == (3, 1, 4, 6)
    assert rows['all']['low'] == pytest.approx(wilson_interval(4, 6)[0])
    import cv2
    plot = cv2.imread(report['files']['win_rates_png'])
    assert plot is not None and plot.shape[1] > 200
    with pytest.raises(StudyError, match='two different names'):
        WinRateStudy(os.path.join(sr, 'ours'), os.path.join(sr, 'ours'), lr)


def test_demo_work_folder_and_write_instances_from_the_vote(tmp_path):
    """``annotate.py demo``'s work folder comes from the demo set; ``report --write-instances`` closes the chain."""
    from dspo_basicsr.annotation.studio import demo_work_folder
    from dspo_basicsr.data.preference_set import write_preference_lmdb
    from dspo_basicsr.preference.pipeline import assemble_preference_set

    from preference_fixtures import coordinate_sample

    samples = [coordinate_sample('a', sr_h=32, sr_w=48), coordinate_sample('b', sr_h=32, sr_w=48, seed=1)]
    for sample in samples:  # the chain's label maps number instances 0..M-1
        ids, seg = np.unique(sample.seg, return_inverse=True)
        sample.seg = seg.reshape(sample.seg.shape).astype(np.uint16)
        sample.instances = [dict(i, id=ids.tolist().index(i['id'])) for i in sample.instances]
    write_preference_lmdb(str(tmp_path / 'demo_pref.lmdb'), samples, progress=False)
    work = demo_work_folder(str(tmp_path))
    assert demo_work_folder(str(tmp_path)) == work  # a second call reuses it
    study, store = open_study(str(tmp_path / 'db.sqlite'), {'kind': 'instances', 'work': work, 'top_k': 2})
    assert len(study.items) == 4
    key = study.items[0]
    import cv2
    crop = cv2.imdecode(np.frombuffer(study.image_png(key, 'c1', full=True), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert crop.shape == samples[0].candidates[1].shape and (crop[..., 2] == 11).mean() > 0.8  # the candidate
    for n, key in enumerate(study.order('ann', 0)[:3]):  # sample of the 4th item stays incomplete
        store.add_answer('ann', key, 0, study.validate(key, {'best': n % 3, 'worst': (n + 1) % 3}), {}, 1.0)
    done_sid = study.split(study.order('ann', 0)[0])[0]
    assert script_main('annotate')(['report', '--db', str(tmp_path / 'db.sqlite'), '--out', str(tmp_path / 'out'),
                                    '--write-instances']) == 0
    with open(tmp_path / 'out' / 'human_annotations.json') as handle:
        assert list(json.load(handle)['samples']) == [done_sid]
    preference_set, report = assemble_preference_set(work, str(tmp_path / 'set.lmdb'), progress=False)
    assert report.done == [done_sid]
    answers = {study.split(a.item)[1]: (a.answer['best'], a.answer['worst']) for a in store.answers()
               if study.split(a.item)[0] == done_sid}
    pairs = {i['id']: (i['win'], i['lose']) for i in preference_set[done_sid].instances if i['win'] >= 0}
    assert pairs == answers


def script_main(name):
    return runpy.run_path(os.path.join(ROOT, 'scripts', f'{name}.py'), run_name='dspo_test')['main']
