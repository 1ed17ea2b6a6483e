"""Thurstone scaling of SR methods and MAD-competition image selection."""
from dspo_basicsr.ranking.thurstone import (ThurstoneError, bootstrap_intervals, comparison_components,
                                            thurstone_nll, thurstone_scores)
from dspo_basicsr.ranking.votes import PairVotes, read_count_matrix, read_pair_votes, read_votes

__all__ = ['ThurstoneError', 'bootstrap_intervals', 'comparison_components', 'thurstone_nll',
           'thurstone_scores', 'PairVotes', 'read_count_matrix', 'read_pair_votes', 'read_votes']
