"""The RealSR-1K subjective results as released (SR-IQA-SMC25 layout): ranking, groups, short errors, 2AFC set."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from scipy.stats import norm

from dspo_basicsr.data.iqa_list_dataset import TwoAFCPairDataset
from dspo_basicsr.ranking import ThurstoneError, VoteFileError, methods_from_file_names, rank_methods, read_votes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = 'sr_pair_names,group,name1_column,name2_column,score1_column,score2_column'
# method names with '-' and image ids with '_' as in the released file
TRUE_SCORES = {'SeeSR': 0.8, 'Real-ESRGAN': 0.2, 'BSRGAN': -0.3, 'RGT': -0.7}
IMAGES = ['01450', 'grass_72', 'cloud_025', 'lakesea_40', '0604', '134008']
SUBJECTS = 23


def write_realsr1k(path, seed=0):
    """A small file with the released header and naming; votes drawn from TRUE_SCORES (23 subjects)."""
    rng = np.random.default_rng(seed)
    methods = list(TRUE_SCORES)
    lines = [HEADER]
    for group in ('mad', 'mid'):
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                first, second = (a, b) if rng.random() < 0.5 else (b, a)
                for image in IMAGES:
                    wins = rng.binomial(SUBJECTS, norm.cdf(TRUE_SCORES[first] - TRUE_SCORES[second]))
                    lines.append(f'{first}_{second},{group},{image}_{first}.png,{image}_{second}.png,'
                                 f'{wins / SUBJECTS!r},{1 - wins / SUBJECTS!r}')
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_methods_from_file_names():
    assert methods_from_file_names('grass_72_BSRGAN.png', 'grass_72_Real-ESRGAN.png') == ('BSRGAN', 'Real-ESRGAN')
    assert methods_from_file_names('x_Real-ESRGAN.png', 'x_ResShift.png') == ('Real-ESRGAN', 'ResShift')
    # only the pair name can tell methods whose names hold '_'
    assert methods_from_file_names('im_1_my_net.png', 'im_1_other.png', 'my_net_other') == ('my_net', 'other')
    assert methods_from_file_names('sr_outputs/SeeSR/img_1.png', 'sr_outputs/LDL/img_1.png') == ('SeeSR', 'LDL')
    assert methods_from_file_names('a.png', 'b.png') is None
    assert methods_from_file_names('01450_BSRGAN.png', '01450_DASR.png', 'DASR_BSRGAN') is None


@pytest.mark.slow
def test_realsr1k_ranks_with_one_command(tmp_path):
    votes = write_realsr1k(tmp_path / 'sr_subjective_results.csv')
    out = tmp_path / 'ranking'
    result = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'rank_methods.py'), str(votes),
                             '--format', 'realsr1k', '--votes-per-pair', str(SUBJECTS), '--bootstrap', '50',
                             '--out', str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'PYTHONPATH': REPO})
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[1] for row in table[1:]] == list(TRUE_SCORES), result.stdout   # best first, methods not files
    assert '4 methods, 72 compared pairs' in result.stdout
    assert (out / 'ranking.json').is_file() and (out / 'ranking.png').is_file()


def test_realsr1k_header_is_found_and_groups_selected(tmp_path):
    votes = str(write_realsr1k(tmp_path / 'votes.csv'))
    everything = read_votes(votes, SUBJECTS)                      # no --format: the header says which preset
    assert sorted(everything.names) == sorted(TRUE_SCORES) and len(everything.records) == 72
    mad = read_votes(votes, SUBJECTS, group='mad')
    assert len(mad.records) == 36
    by_suffix = read_votes(votes, SUBJECTS, format='realsr1k', method_from='suffix')
    np.testing.assert_array_equal(by_suffix.counts(), everything.counts())
    # the command: the columns named, no --format: the methods still come from the file names
    named = read_votes(votes, SUBJECTS, columns=('name1_column', 'name2_column', 'score1_column', 'score2_column'))
    np.testing.assert_array_equal(named.counts(), everything.counts())
    ranking = rank_methods(votes, SUBJECTS, group='mid', num_samples=20)
    assert ranking['methods'][0] == 'SeeSR' and ranking['group'] == 'mid'
    with pytest.raises(VoteFileError, match=r"groups are 'mad', 'mid'.*--group"):
        read_votes(votes, SUBJECTS, group='MAD')


def test_file_names_as_methods_error_is_short(tmp_path):
    votes = str(write_realsr1k(tmp_path / 'votes.csv'))
    # the report of the issue: the name columns read as method names make every file its own "method"
    with pytest.raises(ThurstoneError) as info:
        rank_methods(votes, SUBJECTS, ('name1_column', 'name2_column', 'score1_column', 'score2_column'),
                     method_from='column', num_samples=10)
    message = str(info.value)
    assert len(message) < 1000, len(message)
    assert 'disconnected: 6 groups' in message and 'more groups' in message and '--format realsr1k' in message
    assert 'link' not in message      # a column mix-up is not fixed by linking groups


def test_unknown_layout_says_what_was_tried(tmp_path):
    path = tmp_path / 'votes.csv'
    path.write_text('a,b,c,d,e\n' + '\n'.join(['x.png,y.png,0.5,0.5,1'] * 30) + '\n')
    with pytest.raises(VoteFileError) as info:
        read_votes(str(path), SUBJECTS)
    message = str(info.value)
    for expected in ('pairs pair list', 'realsr1k pair list', 'square vote-count matrix',
                     '4 names in its header but 30', '--columns', '--format'):
        assert expected in message
    assert len(message) < 1000


def test_disconnected_methods_hint_names_flags():
    counts = np.zeros((4, 4))
    counts[0, 1], counts[1, 0] = 7, 3
    counts[2, 3], counts[3, 2] = 4, 6
    from dspo_basicsr.ranking import thurstone_scores
    with pytest.raises(ThurstoneError, match='--link-prior 1'):
        thurstone_scores(counts, names=['a', 'b', 'c', 'd'])
    unanimous = np.array([[0, 5.0], [0, 0]])
    with pytest.raises(ThurstoneError, match='--prior 0.5'):
        thurstone_scores(unanimous, names=['a', 'b'])


def test_two_afc_dataset_reads_realsr1k(tmp_path):
    votes = write_realsr1k(tmp_path / 'votes.csv')
    for image in IMAGES:
        for method in TRUE_SCORES:
            cv2.imwrite(str(tmp_path / f'{image}_{method}.png'), np.full((8, 8, 3), 128, np.uint8))
    dataset = TwoAFCPairDataset({'name': 'realsr1k', 'meta_file': str(votes), 'dataroot': str(tmp_path),
                                 'format': 'realsr1k', 'group': 'mad'})
    assert len(dataset) == 36
    item = dataset[0]
    first = votes.read_text().splitlines()[1].split(',')
    assert item['pair'] == first[0] and item['group'] == 'mad'
    assert item['fraction_a'] == pytest.approx(float(first[4]))
    assert item['img_a'].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="groups are \\['mad', 'mid'\\]"):
        TwoAFCPairDataset({'meta_file': str(votes), 'dataroot': str(tmp_path), 'format': 'realsr1k', 'group': 'x'})
