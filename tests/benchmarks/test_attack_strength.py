"""benchmarks/attack_strength.py at its smallest size: every known-answer case (linear worst
cases in measurement and image space, the penalised quadratic, linear classifiers' minimal
perturbations) found within 1 % by the default searches."""

from __future__ import annotations

import torch

from benchmarks.attack_strength import PASS_SCORE, known_answer_cases

torch.set_num_threads(1)


def test_default_searches_reach_the_known_answers_within_one_percent() -> None:
    cases = known_answer_cases(size=4, images=2, seed=0, robust_nets_iterations=0)
    scored = [case for case in cases if case.scored]
    low = [case.line() for case in scored if case.score < PASS_SCORE]
    assert not low, "\n".join(low)
