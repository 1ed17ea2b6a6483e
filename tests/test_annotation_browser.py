"""The annotation studio driven in headless Chromium (Debian's chromium + chromium-driver, via selenium).

Set ``ANNOTATION_SCREENSHOTS=DIR`` to also save a screenshot of each study type (the README's images).
"""
import json
import os
import runpy
import sys

import pytest

from dspo_basicsr.annotation.store import AnnotationStore
from dspo_basicsr.annotation.studies import InstanceStudy
from dspo_basicsr.annotation.studio import open_study
from dspo_basicsr.data.preference_set import PreferenceLMDB

from annotation_fixtures import (
    ServerProcess,
    ThreadServer,
    chromium,
    make_method_folders,
    make_work_folder,
    write_pairs_csv,
)
from pipeline_fixtures import write_chain_yaml

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOTS = os.environ.get('ANNOTATION_SCREENSHOTS')
XSS = '<script>window.injected = 1</script><img src=x onerror="window.injected = 2">'


def script(name):
    return runpy.run_path(os.path.join(ROOT, 'scripts', f'{name}.py'), run_name='dspo_test')['main']


@pytest.fixture
def browser():
    driver = chromium()
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for_item(browser, previous=None, timeout=20):
    """The ``data-item`` of the page once it differs from ``previous`` (the page reloaded)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def changed(driver):
        try:
            item = driver.execute_script("var m = document.querySelector('main.study'); "
                                         "return m && document.readyState === 'complete' ? "
                                         "[m.dataset.item, document.getElementById('count').textContent] : null;")
        except Exception:  # noqa: BLE001  (the page is reloading)
            return False
        return item if item and tuple(item) != tuple(previous or ()) else False

    return tuple(WebDriverWait(browser, timeout).until(changed))


def keys(browser, *sequence):
    from selenium.webdriver.common.action_chains import ActionChains
    actions = ActionChains(browser)
    for key in sequence:
        if isinstance(key, tuple):  # (modifier, key)
            actions.key_down(key[0]).send_keys(key[1]).key_up(key[0])
        else:
            actions.send_keys(key)
    actions.perform()


def test_instance_study_in_the_browser_survives_a_killed_server(tmp_path, browser):
    """Clicks and keys, undo, a SIGKILLed server restarted, the export through the chain into an LMDB set."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    work = make_work_folder(str(tmp_path), num=2)
    study = InstanceStudy(work.root, top_k=2)
    order = study.order('Ada', 0)
    first_sid, first_instance = study.split(order[0])
    # the VLM description of one candidate of the first item holds markup: it must show as text
    from annotation_fixtures import write_descriptions
    write_descriptions(work, first_sid, {first_instance: ['a red ball', XSS, 'a dog']})
    db = str(tmp_path / 'annotations.sqlite')
    server = ServerProcess(['--work', work.root, '--db', db, '--top-k', '2'])
    try:
        browser.get(server.url)
        browser.find_element(By.ID, 'name').send_keys('Ada', Keys.ENTER)
        item = wait_for_item(browser)
        assert item == (order[0], '0 / 4')
        descriptions = [p.text for p in browser.find_elements(By.CSS_SELECTOR, 'p.description')]
        assert descriptions[1] == XSS and browser.execute_script('return window.injected') is None
        if SCREENSHOTS:
            browser.save_screenshot(os.path.join(SCREENSHOTS, 'annotation_instances.png'))
        # item 1 by mouse: best = candidate 3, worst = candidate 1, tick the description of candidate 2
        browser.find_element(By.CSS_SELECTOR, '#candidate-2 img').click()
        browser.find_element(By.CSS_SELECTOR, '#candidate-0 button.worst').click()
        browser.find_element(By.CSS_SELECTOR, 'input.hallucinated[data-index="1"]').click()
        browser.find_element(By.ID, 'submit').click()
        item = wait_for_item(browser, item)
        assert item == (order[1], '1 / 4')
        # item 2 by keys: F shows the whole image and back, 2 = best, 3 = worst, Enter submits
        src = browser.find_element(By.CSS_SELECTOR, '#candidate-0 img').get_attribute('src')
        keys(browser, 'f')
        assert 'full=1' in browser.find_element(By.CSS_SELECTOR, '#candidate-0 img').get_attribute('src')
        keys(browser, 'f', '2', '3', Keys.ENTER)
        item = wait_for_item(browser, item)
        assert browser.find_element(By.CSS_SELECTOR, '#candidate-0 img').get_attribute('src') != src
        # item 3: no clear preference (0), then undo it (U): item 3 comes back
        keys(browser, '0')
        item3 = wait_for_item(browser, item)
        assert item3 == (order[3], '3 / 4')
        keys(browser, 'u')
        item = wait_for_item(browser, item3)
        assert item == (order[2], '2 / 4')
        keys(browser, '1', '2', Keys.ENTER)
        item = wait_for_item(browser, item)
        assert item == (order[3], '3 / 4')
    finally:
        server.kill()  # SIGKILL: nothing flushed at exit
    answers = AnnotationStore(db).answers('Ada')
    assert [(a.item, a.answer['best'], a.answer['worst'], a.answer['hallucinated']) for a in answers] == [
        (order[0], 2, 0, [1]), (order[1], 1, 2, []), (order[2], 0, 1, [])]
    assert all(a.seconds > 0 for a in answers)

    # restarted (no study arguments: the database knows its study), the annotator resumes at item 4
    server = ServerProcess(['--db', db])
    try:
        browser.get(server.url + 'annotate?annotator=Ada')
        item = wait_for_item(browser)
        assert item == (order[3], '3 / 4')
        keys(browser, '3', '1', Keys.ENTER)
        done = wait_for_item(browser, item)
        assert done == ('', '4 / 4') and 'All done' in browser.find_element(By.TAG_NAME, 'h1').text
    finally:
        server.kill()

    # the export feeds score_instances.py --scorer human (--overwrite: the VLM step wrote instances/ already),
    # then build_preference_set.py
    out = str(tmp_path / 'report')
    assert script('annotate')(['report', '--db', db, '--out', out]) == 0
    annotation = os.path.join(out, 'human_annotations.json')
    opt = write_chain_yaml(tmp_path / 'chain.yml', network={'type': 'unused'})
    assert script('score_instances')(['-opt', opt, '--work', work.root, '--scorer', 'human', '--annotations',
                                      annotation, '--overwrite', '--no-progress']) == 0
    lmdb = str(tmp_path / 'human.lmdb')
    assert script('build_preference_set')(['--work', work.root, '--out', lmdb, '--no-progress']) == 0
    preference_set = PreferenceLMDB(lmdb)
    expected = {(a.item.split('/')[0], int(a.item.split('/')[1])): (a.answer['best'], a.answer['worst'])
                for a in AnnotationStore(db).answers()}
    for sid in preference_set.ids():
        sample = preference_set[sid]
        for instance in sample.instances:
            pair = expected.get((sid, instance['id']), (-1, -1))
            assert (instance['win'], instance['lose']) == pair
    first = preference_set[first_sid]
    assert XSS.rstrip('.') in first.negative_prompt  # the ticked description became negative prompt text


def test_2afc_and_win_rate_studies_in_the_browser(tmp_path, browser, monkeypatch):
    """A 2AFC study answered by clicks and arrow keys, ranked by rank_methods.py; a win-rate round by keys."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    sr, lr = make_method_folders(str(tmp_path / 'm'))
    methods = ('bicubic', 'ours', 'sharp')
    pairs = [(a, b, image) for i, a in enumerate(methods) for b in methods[i + 1:] for image in ('0001', '0002')]
    csv_path = write_pairs_csv(tmp_path / 'mad_pairs.csv', sr, pairs)
    study, store = open_study(str(tmp_path / 'p.sqlite'), {'kind': 'pairs', 'pairs_csv': csv_path, 'sr_root': sr,
                                                           'lr_root': lr})
    quality = {'ours': 2, 'bicubic': 1, 'sharp': 0}
    server = ThreadServer(study, store)
    try:
        browser.get(server.url + 'annotate?annotator=Bo')
        item = wait_for_item(browser)
        if SCREENSHOTS:
            browser.save_screenshot(os.path.join(SCREENSHOTS, 'annotation_2afc.png'))
        for n in range(len(study.items)):
            view = study.view(item[0], 'Bo', 0)
            side = 'left' if quality[view['left']['method']] > quality[view['right']['method']] else 'right'
            if n % 2:
                browser.find_element(By.CSS_SELECTOR, f'#{side} img').click()
            else:
                keys(browser, Keys.ARROW_LEFT if side == 'left' else Keys.ARROW_RIGHT)
            item = wait_for_item(browser, item)
        assert item[1] == '6 / 6'
    finally:
        server.stop()
    answers = store.answers('Bo')
    assert all(quality[a.answer['method']] == max(quality[m] for m in (a.shown['left'], a.shown['right']))
               for a in answers)
    assert len({a.shown['left'] for a in answers}) > 1  # sides were shuffled
    out = str(tmp_path / 'report')
    assert script('annotate')(['report', '--db', str(tmp_path / 'p.sqlite'), '--out', out]) == 0
    monkeypatch.setattr(sys, 'argv', ['rank_methods.py', os.path.join(out, 'vote_counts.csv'), '--prior', '0.5',
                                      '--bootstrap', '20', '--out', str(tmp_path / 'ranking')])
    runpy.run_path(os.path.join(ROOT, 'scripts', 'rank_methods.py'), run_name='__main__')
    with open(tmp_path / 'ranking' / 'ranking.json') as handle:
        scores = json.load(handle)['scores']
    assert sorted(scores, key=lambda m: -scores[m]) == ['ours', 'bicubic', 'sharp']

    # win rate: ours vs sharp, one round of three images, always the left image
    study, store = open_study(str(tmp_path / 'w.sqlite'), {
        'kind': 'winrate', 'folder_a': os.path.join(sr, 'ours'), 'folder_b': os.path.join(sr, 'sharp'),
        'lq_root': lr, 'rounds': 1})
    server = ThreadServer(study, store)
    try:
        browser.get(server.url + 'annotate?annotator=Cy')
        item = wait_for_item(browser)
        assert 'prefer given the LQ' in browser.find_element(By.TAG_NAME, 'h1').text
        if SCREENSHOTS:
            browser.save_screenshot(os.path.join(SCREENSHOTS, 'annotation_winrate.png'))
        for _ in study.items:
            keys(browser, 'a')
            item = wait_for_item(browser, item)
    finally:
        server.stop()
    left = [a.shown['left'] for a in store.answers('Cy')]
    assert script('annotate')(['report', '--db', str(tmp_path / 'w.sqlite'), '--out', str(tmp_path / 'wr')]) == 0
    with open(tmp_path / 'wr' / 'report.json') as handle:
        rows = json.load(handle)['win_rates']
    assert rows[-1]['wins'] == left.count('ours') and rows[-1]['answers'] == 3
    assert os.path.isfile(tmp_path / 'wr' / 'win_rates.png')
