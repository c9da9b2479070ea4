"""GLDv2 retrieval protocol: solution CSV loader, Kaggle mAP@100 (§7 cases 1, 2, 33)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compatkit.errors import DataRootError
from compatkit.eval.protocols import (
    GLDv2GroundTruth,
    evaluate_gldv2,
    gldv2_map_at_k,
    kaggle_average_precision,
    load_gldv2,
    read_gldv2_ids,
    read_gldv2_solution,
)

SOLUTION = """id,images,Usage
q1,b d,Private
qx,None,Ignored
q3,a,Public
q2,c,Private
qy,None,Ignored
q4,a c,Public
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def solution_csv(tmp_path: Path) -> Path:
    return write(tmp_path / "retrieval_solution_v2.1.csv", SOLUTION)


# ---- metric -------------------------------------------------------------------------------


def test_case1_kaggle_ap() -> None:
    ap = kaggle_average_precision([3, 2, 1, 5, 6], {3, 1})
    assert ap == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert ap == pytest.approx(0.833333, abs=1e-6)


def test_case2_denominator_is_min_of_positives_and_k() -> None:
    positives = set(range(150))
    # the top-100 are all positives: 100 hits over min(150, 100) = 100 → 1, not 100/150
    assert kaggle_average_precision(list(range(100)), positives) == pytest.approx(1.0)
    # 50 positives then 50 misses: Σ P(i) over the hits = 50, over 100
    ranking = list(range(50)) + list(range(1000, 1050))
    assert kaggle_average_precision(ranking, positives) == pytest.approx(0.5)


def test_case2_query_without_hits_scores_zero_and_counts() -> None:
    positives = {"p"}
    miss = [f"n{i}" for i in range(100)] + ["p"]  # the positive sits at rank 101
    hit = ["p"] + [f"n{i}" for i in range(99)]
    assert kaggle_average_precision(miss, positives) == 0.0
    assert gldv2_map_at_k([miss, hit], [positives, positives]) == pytest.approx(0.5)


def test_ranking_is_cut_at_k() -> None:
    assert kaggle_average_precision(["x", "y", "p"], {"p"}, k=2) == 0.0
    assert kaggle_average_precision(["x", "p", "y"], {"p"}, k=2) == pytest.approx(0.5)


def test_repeated_ids_count_once_and_keep_their_slot() -> None:
    assert kaggle_average_precision([3, 3, 1], {3, 1}) == pytest.approx((1 + 2 / 3) / 2)


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="empty positive set"):
        kaggle_average_precision([1, 2], set())
    with pytest.raises(ValueError, match="2 rankings for 1"):
        gldv2_map_at_k([[1], [2]], [{1}])
    with pytest.raises(ValueError, match="at least one query"):
        gldv2_map_at_k([], [])
    with pytest.raises(ValueError, match="k must be"):
        kaggle_average_precision([1], {1}, k=0)


# ---- loaders ------------------------------------------------------------------------------


def test_solution_splits_order_and_alignment(solution_csv: Path) -> None:
    gt = read_gldv2_solution(solution_csv)
    assert gt.query_ids.tolist() == ["q1", "q3", "q2", "q4"]  # file order, Ignored dropped
    assert gt.usage.tolist() == ["Private", "Public", "Private", "Public"]
    expected = {"q1": ["b", "d"], "q3": ["a"], "q2": ["c"], "q4": ["a", "c"]}
    for split in ("public", "private", "all"):
        sub = gt.split(split)
        # case 33: query list and ground-truth list line up
        assert len(sub.positives) == len(sub.query_ids)
        for i, qid in enumerate(sub.query_ids.tolist()):
            assert sub.positives.row(i).tolist() == expected[qid]
    public, private = gt.split("public"), gt.split("private")
    assert public.query_ids.tolist() == ["q3", "q4"]
    assert private.query_ids.tolist() == ["q1", "q2"]
    assert not set(public.query_ids.tolist()) & set(private.query_ids.tolist())
    assert "qx" not in gt.query_ids and "None" not in gt.positives.values
    assert gt.split("private").positive_sets() == [frozenset({"b", "d"}), frozenset({"c"})]


def test_from_lists_checks_input() -> None:
    gt = GLDv2GroundTruth.from_lists([7, 8], [[1, 2], [3]], ["Public", "Private"])
    assert gt.query_ids.tolist() == ["7", "8"] and gt.positives.row(0).tolist() == ["1", "2"]
    with pytest.raises(ValueError, match="2 query ids, 1 positive lists"):
        GLDv2GroundTruth.from_lists([7, 8], [[1]], ["Public", "Private"])
    with pytest.raises(ValueError, match=r"usage values \['Ignored'\]"):
        GLDv2GroundTruth.from_lists([7], [[1]], ["Ignored"])
    with pytest.raises(ValueError, match="at least one positive"):
        GLDv2GroundTruth.from_lists([7], [[]], ["Public"])


def test_unknown_split(solution_csv: Path) -> None:
    with pytest.raises(ValueError, match=r"'test'.*public, private, all"):
        read_gldv2_solution(solution_csv).split("test")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,images\nq1,a\n", r"lacks column\(s\) \['Usage'\]"),
        ("id,images,Usage\nq1,a,Secret\n", r":2: Usage 'Secret'"),
        ("id,images,Usage\nq0,a,Public\nq1,None,Private\n", r":3: Private query 'q1' has no"),
        ("id,images,Usage\nq1,,Public\n", r":2: Public query 'q1' has no"),
        ("id,images,Usage\nq1,a,Public\nq1,b,Private\n", r":3: query id 'q1' repeats line 2"),
        ("id,images,Usage\nq1,a b a,Public\n", r"lists index id 'a' twice"),
        ("id,images,Usage\n,a,Public\n", r":2: empty query id"),
    ],
)
def test_malformed_solution(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path / "sol.csv", text)
    with pytest.raises(ValueError, match=match) as info:
        read_gldv2_solution(path)
    assert "sol.csv" in str(info.value)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="solution CSV not found"):
        read_gldv2_solution(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError):  # DataRootError is also a FileNotFoundError
        read_gldv2_ids(tmp_path / "index.csv")
    with pytest.raises(DataRootError, match=r"does not hold retrieval_solution_v2\.1\.csv"):
        load_gldv2(tmp_path)


def test_read_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "index.csv", "id,url\na,http://x\nb,http://y\n")
    assert read_gldv2_ids(path).tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="lacks an 'id' column"):
        read_gldv2_ids(write(tmp_path / "bad.csv", "image\na\n"))
    with pytest.raises(ValueError, match=r"repeats ids, e.g. \['a'\]"):
        read_gldv2_ids(write(tmp_path / "dup.csv", "id\na\nb\na\n"))


def test_load_folder_reads_and_checks_id_lists(tmp_path: Path, solution_csv: Path) -> None:
    write(tmp_path / "index.csv", "id\na\nb\nc\nd\n")
    write(tmp_path / "test.csv", "id\nq1\nq2\nq3\nq4\nqx\nqy\nq5\n")
    gt = load_gldv2(tmp_path)
    assert gt.index_ids is not None and gt.index_ids.tolist() == ["a", "b", "c", "d"]
    assert gt.test_ids is not None and len(gt.test_ids) == 7
    assert gt.split("public").index_ids is gt.index_ids
    # explicit arrays instead of files
    gt2 = load_gldv2(solution_csv, index_ids=np.array(["a", "b", "c", "d", "e"]))
    assert gt2.index_ids is not None and len(gt2.index_ids) == 5 and gt2.test_ids is None
    with pytest.raises(ValueError, match=r"1 positive index ids .* not in index_ids, e.g. \['d'\]"):
        load_gldv2(solution_csv, index_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"query ids .* not in test_ids"):
        load_gldv2(solution_csv, test_ids=["q1", "q2", "q3"])


# ---- end to end ---------------------------------------------------------------------------

INDEX_IDS = ["a", "b", "c", "d"]
INDEX_FEATS = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)


def test_evaluate_gldv2_by_hand() -> None:
    gt = GLDv2GroundTruth.from_lists(
        ["q1", "q2", "q3"], [["b", "d"], ["c"], ["a"]], ["Private", "Private", "Public"]
    )
    # rows in another order than the ground truth, plus a query that is not in it
    query_ids = ["q3", "zz", "q2", "q1"]
    query_feats = np.array([[-1, 0], [0.3, 0.3], [0, 2], [3, 0]], dtype=np.float32)
    # q1 = (1,0) ranks a,b,c,d → hits at 2 and 4: (1/2 + 2/4)/2 = 0.5
    # q2 = (0,1) ranks c,b,a,d (a, d tie at 0; lower index first) → 1.0
    # q3 = (-1,0) ranks d,c,b,a → hit at 4: 0.25
    out = evaluate_gldv2(query_feats, query_ids, INDEX_FEATS, INDEX_IDS, gt)
    assert out == pytest.approx({"map@100": 0.75, "num_queries": 2.0})
    assert evaluate_gldv2(query_feats, query_ids, INDEX_FEATS, INDEX_IDS, gt, split="public")[
        "map@100"
    ] == pytest.approx(0.25)
    assert evaluate_gldv2(query_feats, query_ids, INDEX_FEATS, INDEX_IDS, gt, split="all")[
        "map@100"
    ] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    # k = 2: q1 keeps only the hit at rank 2 → (1/2)/min(2, 2) = 0.25
    assert evaluate_gldv2(query_feats, query_ids, INDEX_FEATS, INDEX_IDS, gt, k=2)[
        "map@2"
    ] == pytest.approx((0.25 + 1.0) / 2)


def test_evaluate_gldv2_from_csv(solution_csv: Path) -> None:
    gt = load_gldv2(solution_csv)
    feats = {"q1": [1, 0], "q2": [0, 1], "q3": [-1, 0], "q4": [0.6, 0.8]}
    ids = list(feats)
    q = np.array([feats[i] for i in ids], dtype=np.float32)
    # q3 → a at rank 4: 0.25; q4 = (0.6, 0.8) ranks b(0.96), c(0.8), a(0.6), d → hits 2, 3:
    # (1/2 + 2/3)/2
    out = evaluate_gldv2(q, ids, INDEX_FEATS, INDEX_IDS, gt, split="public")
    assert out["map@100"] == pytest.approx((0.25 + (1 / 2 + 2 / 3) / 2) / 2)


def test_evaluate_gldv2_errors(solution_csv: Path) -> None:
    gt = read_gldv2_solution(solution_csv)
    q = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"2 of 2 private queries have no row"):
        evaluate_gldv2(q, ["q3", "q4"], INDEX_FEATS, INDEX_IDS, gt)
    with pytest.raises(ValueError, match=r"query_ids has shape \(3,\)"):
        evaluate_gldv2(q, ["q1", "q2", "q3"], INDEX_FEATS, INDEX_IDS, gt)
    with pytest.raises(ValueError, match="index_ids repeats ids"):
        evaluate_gldv2(q, ["q1", "q2"], INDEX_FEATS, ["a", "a", "c", "d"], gt)
    with pytest.raises(ValueError, match="dimension mismatch"):
        evaluate_gldv2(np.ones((2, 3), np.float32), ["q1", "q2"], INDEX_FEATS, INDEX_IDS, gt)
