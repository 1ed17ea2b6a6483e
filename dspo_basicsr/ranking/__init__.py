"""Thurstone scaling of SR methods and MAD-competition image selection.

("Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment".)
"""
from dspo_basicsr.ranking.mad import (
                                      FeatureDistance,
                                      MADResult,
                                      default_perceptual_distance,
                                      default_semantic_distance,
                                      mad_select,
                                      run_mad_selection,
                                      structure_texture_distance,
)
from dspo_basicsr.ranking.ranking_report import format_ranking, plot_ranking, rank_methods, write_ranking_json
from dspo_basicsr.ranking.thurstone import (
                                      ThurstoneError,
                                      bootstrap_intervals,
                                      comparison_components,
                                      thurstone_nll,
                                      thurstone_scores,
)
from dspo_basicsr.ranking.votes import (
                                      PAIR_FORMATS,
                                      PairVotes,
                                      VoteFileError,
                                      methods_from_file_names,
                                      read_count_matrix,
                                      read_pair_votes,
                                      read_votes,
)

__all__ = [
    'ThurstoneError', 'bootstrap_intervals', 'comparison_components', 'thurstone_nll', 'thurstone_scores',
    'PAIR_FORMATS', 'PairVotes', 'VoteFileError', 'methods_from_file_names', 'read_count_matrix', 'read_pair_votes',
    'read_votes',
    'rank_methods', 'format_ranking', 'write_ranking_json', 'plot_ranking',
    'FeatureDistance', 'MADResult', 'structure_texture_distance', 'default_perceptual_distance',
    'default_semantic_distance', 'mad_select', 'run_mad_selection',
]
