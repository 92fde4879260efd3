"""The n-gram proposer drafts what followed the latest earlier occurrence of the longest matching suffix."""

from __future__ import annotations

import numpy as np

from loomserve.platform.spec_decode.ngram import lookup


def test_the_tokens_after_an_earlier_occurrence_of_the_suffix_are_drafted():
    assert lookup(np.array([1, 2, 3, 4, 5, 9, 2, 3]), 1, 3, 2) == [4, 5]


def test_the_longest_matching_suffix_wins_over_a_later_shorter_one():
    # Suffix [7, 3]: occurs after 7 at index 1; the bare 3 occurs later (index 5) followed by 8.
    assert lookup(np.array([0, 7, 3, 4, 6, 3, 8, 7, 3]), 1, 2, 1) == [4]


def test_the_latest_occurrence_wins_among_equally_long_matches():
    assert lookup(np.array([5, 1, 5, 2, 5]), 1, 1, 1) == [2]


def test_no_occurrence_no_drafts():
    assert lookup(np.array([1, 2, 3, 4]), 1, 3, 4) == []


def test_suffixes_shorter_than_the_minimum_are_not_matched():
    assert lookup(np.array([1, 2, 9, 2]), 2, 3, 1) == []


def test_drafts_stop_at_the_end_of_the_context():
    assert lookup(np.array([4, 6, 4]), 1, 1, 5) == [6, 4]
