"""cai.agreement against published worked examples and hand-computed values."""

import math

import pytest

from cai.agreement import (
    accuracy_weight,
    agreement_report,
    category_counts,
    dawid_skene,
    fleiss_kappa,
    hard_choice,
    krippendorff_alpha,
    pairwise_agreement,
    weighted_mean,
)

N = None
# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", section C: 4 observers, 12 units, missing data.
# Published: nominal 0.743, interval 0.849.
KRIPP = [list(x) for x in zip([1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
                              [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
                              [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
                              [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N])]


def test_krippendorff_paper_example():
    assert krippendorff_alpha(KRIPP, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(KRIPP, "interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_by_hand():
    # two coders, units (1,1) (0,0) (1,0): n = 6 pairable values.
    # nominal: D_o = (only unit 3: 2 ordered disagreeing pairs / (2-1)) / 6 = 1/3;
    #          D_e = (6^2 - 3^2 - 3^2) / (6 * 5) = 18/30; alpha = 1 - (1/3) / (3/5) = 4/9
    rows = [[1, 1], [0, 0], [1, 0]]
    assert krippendorff_alpha(rows, "nominal") == pytest.approx(4 / 9)
    # interval on (0.9, 0.7), (0.2, 0.2): D_o = [2*(0.2)^2 + 0] / 4 = 0.02;
    # D_e = sum over ordered pairs of (a-b)^2 / (4*3): values .9 .7 .2 .2 -> 2*(.04+.49+.49+.25+.25+0) = 3.04 -> /12
    assert krippendorff_alpha([[0.9, 0.7], [0.2, 0.2]], "interval") == pytest.approx(1 - 0.02 / (3.04 / 12))
    # a unit with one value is not pairable; no variation at all -> None
    assert krippendorff_alpha([[1, N], [1, 1]], "nominal") is None
    with pytest.raises(ValueError):
        krippendorff_alpha(rows, "ordinal")


def test_fleiss_wikipedia_example():
    # Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters, 5 categories -> P_bar 0.378, P_e 0.213,
    # kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 1], [2, 1]])


def test_fleiss_by_hand_and_counts():
    # 3 raters, 2 categories; units (A,A,A) (A,A,B) (B,B,B) (A,B,B).
    # P_i = 1, 1/3, 1, 1/3 -> P_bar = 2/3; p_A = p_B = 6/12 -> P_e = 1/2; kappa = (2/3 - 1/2) / (1/2) = 1/3
    rows = [[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]]
    counts = category_counts(rows, [0, 1])
    assert counts == [[0, 3], [1, 2], [3, 0], [2, 1]]
    assert fleiss_kappa(counts) == pytest.approx(1 / 3)
    assert category_counts([[1, None, 0]], [0, 1]) == []


def test_pairwise_agreement_and_report():
    rows = [[1, 1, 0], [0, 0, 0], [1, N, 1], [0, 1, 1]]  # x|y: 2 of 3 units; x|z: 2 of 4; y|z: 2 of 3
    pa = pairwise_agreement(rows, ["x", "y", "z"])
    assert pa["pairs"]["x|y"] == {"agreement": 2 / 3, "units": 3}
    assert pa["pairs"]["x|z"] == {"agreement": 2 / 4, "units": 4}
    assert pa["pairs"]["y|z"] == {"agreement": 2 / 3, "units": 3}
    assert pa["mean"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert hard_choice(0.5) is None and hard_choice(0.51) == 1 and hard_choice(0.2) == 0
    rep = agreement_report([[0.9, 0.8], [0.1, 0.3], [0.6, 0.4], [0.5, 0.7]], ["a", "b"])
    assert rep["pairwise_agreement"]["pairs"]["a|b"] == {"agreement": 2 / 3, "units": 3}  # the tie is left out
    assert rep["fleiss_units"] == 3
    assert rep["alpha_nominal"] == pytest.approx(krippendorff_alpha([[1, 1], [0, 0], [1, 0]], "nominal"))


def test_weights():
    assert weighted_mean([0.9, 0.1], [3, 1]) == pytest.approx(0.7)
    assert weighted_mean([0.9, 0.1], [0, 0]) == pytest.approx(0.5)
    assert accuracy_weight(5, 10) == 0.0 and accuracy_weight(2, 10) == 0.0  # at or below chance: no say
    assert accuracy_weight(9, 10) == pytest.approx(math.log((10 / 12) / (2 / 12)))


def test_dawid_skene_recovers_truth_with_an_adversarial_annotator():
    truth = [1, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    wrong = {"good1": {0}, "good2": {4}, "good3": {7}, "adversary": set(range(10))}
    labels = [{a: (1 - t if u in bad else t) for a, bad in wrong.items()} for u, t in enumerate(truth)]
    # majority vote ties (2 vs 2) on the three units one good annotator got wrong
    majority = [sum(u.values()) / len(u) for u in labels]
    assert sum(m == 0.5 for m in majority) == 3
    ds = dawid_skene(labels)
    assert [round(p) for p in ds["posterior"]] == truth
    assert all(abs(p - t) < 0.05 for p, t in zip(ds["posterior"], truth))
    ev = ds["evaluators"]
    assert ev["adversary"]["accuracy"] < 0.05
    assert all(ev[a]["accuracy"] > 0.8 for a in ("good1", "good2", "good3"))
