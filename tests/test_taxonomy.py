import torch

from vllm_heterocache import taxonomy
from vllm_heterocache.head_profile import HeadType


def t(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_median_matches_numpy_convention():
    assert taxonomy.median(torch.tensor([3.0, 1.0, 2.0])) == 2.0
    assert taxonomy.median(torch.tensor([4.0, 1.0, 2.0, 3.0])) == 2.5


def test_overlap_matrix():
    m = taxonomy.overlap_matrix(t([0, 1, 2, 3], [2, 3, 4, 5], [6, 7, 8, 9]), 10)
    assert m[0, 1] == 0.5 and m[0, 2] == 0.0 and m[1, 1] == 1.0 and torch.equal(m, m.T)


def test_stability_is_the_median_overlap_with_the_prefill_set():
    prefill = t([0, 1, 2, 3], [0, 1, 2, 3])
    decode = torch.stack([
        t([0, 1, 2, 3], [0, 1, 2, 3]),
        t([0, 1, 8, 9], [6, 7, 8, 9]),
        t([0, 1, 2, 9], [0, 7, 8, 9]),
    ])
    s = taxonomy.stability_scores(prefill, decode, 10)
    assert s.tolist() == [0.75, 0.25]


def test_star_clustering_picks_highest_degree_then_lowest_index():
    # 0-1, 0-2, 3-4 adjacent; 0 has degree 2 -> pivot first; then 3 (tie with 4, lower index)
    sim = torch.eye(5)
    for i, j in ((0, 1), (0, 2), (3, 4)):
        sim[i, j] = sim[j, i] = 0.9
    assert taxonomy.star_clusters(sim, 0.5) == [(0, (1, 2)), (3, (4,))]
    # threshold is inclusive (>=)
    assert taxonomy.star_clusters(sim, 0.9) == [(0, (1, 2)), (3, (4,))]
    assert taxonomy.star_clusters(sim, 0.95) == []


def test_groups_keep_clusters_inside_a_rank():
    sim = torch.full((4, 4), 0.9)
    assert taxonomy.star_clusters(sim, 0.5) == [(0, (1, 2, 3))]
    assert taxonomy.star_clusters(sim, 0.5, groups=[0, 0, 1, 1]) == [(0, (1,)), (2, (3,))]


def test_classify_and_budget_ratios():
    stability = torch.tensor([[0.9, 0.2, 0.6, 0.3]])
    sim = torch.eye(4).unsqueeze(0).clone()
    sim[0, 2, 3] = sim[0, 3, 2] = 0.8
    types, clusters = taxonomy.classify(stability, sim, tau_stable=0.5, tau_sim=0.5)
    assert types == [[HeadType.ANCHOR, HeadType.VOLATILE, HeadType.PIVOT, HeadType.SATELLITE]]
    assert [(c.layer, c.pivot, c.satellites) for c in clusters] == [(0, 2, (3,))]
    ratios = taxonomy.budget_ratios(types, stability)
    assert ratios[0][1] is None and ratios[0][2] is None
    # inverse stability, normalised to average 1 over the compressed heads
    w0, w3 = 1 / (0.9 + taxonomy.RATIO_EPS), 1 / (0.3 + taxonomy.RATIO_EPS)
    assert abs(ratios[0][0] - 2 * w0 / (w0 + w3)) < 1e-6
    assert abs(ratios[0][3] - 2 * w3 / (w0 + w3)) < 1e-6
    assert ratios[0][3] > ratios[0][0]
