import pytest

from moe_understudy.data.instructions import Example
from moe_understudy.eval.rouge import SeedScores, rouge_l, score_examples


def test_identical_text_scores_one_hundred_and_disjoint_text_zero():
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(100.0)
    assert rouge_l("dogs bark", ["the cat sat"]) == 0.0


def test_rouge_l_is_the_lcs_f1_times_one_hundred():
    # LCS("a b c d", "a c e") = "a c": precision 2/4, recall 2/3, F1 = 4/7
    assert rouge_l("a b c d", ["a c e"]) == pytest.approx(100 * 4 / 7)


def test_porter_stemming_matches_inflections():
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)


def test_the_best_reference_counts():
    assert rouge_l("yes", ["no", "yes"]) == pytest.approx(100.0)
    assert rouge_l("yes", []) == 0.0


def test_score_examples_uses_each_examples_references():
    examples = [Example("p", "positive"), Example("q", "x", references=("negative", "bad"))]
    assert score_examples(["positive", "bad"], examples) == pytest.approx([100.0, 100.0])
    with pytest.raises(ValueError):
        score_examples(["one"], examples)


def test_seed_scores_average_per_task_and_spread_over_seeds():
    examples = [Example("p", "r", task="a"), Example("p", "r", task="a"), Example("p", "r", task="b")]
    scores = SeedScores()
    scores.add([100.0, 0.0, 50.0], examples)  # seed 1: overall 50, a 50, b 50
    scores.add([100.0, 100.0, 100.0], examples)  # seed 2: overall 100
    s = scores.summary()
    assert s["per_seed"] == pytest.approx([50.0, 100.0])
    assert s["mean"] == pytest.approx(75.0) and s["std"] == pytest.approx(25.0)
    assert s["tasks"]["a"]["mean"] == pytest.approx(75.0) and s["tasks"]["b"]["std"] == pytest.approx(25.0)


def test_seed_scores_keep_each_examples_score_averaged_over_seeds():
    examples = [Example("p", "r"), Example("q", "r")]
    scores = SeedScores()
    scores.add([100.0, 0.0], examples)
    scores.add([50.0, 20.0], examples)
    assert scores.summary()["per_example"] == pytest.approx([75.0, 10.0])
