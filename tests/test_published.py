"""The packaged published numbers and their comparison with our summary table."""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest

from agcl.report.published import (
    COLUMNS,
    compare_with_published,
    dice_jaccard_consistency,
    load_published,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = "Semi-AGCL paper Table (LA)"


@pytest.fixture(scope="module")
def published():
    return load_published()


def one(table, **where):
    rows = table
    for key, value in where.items():
        rows = rows[rows[key] == value]
    assert len(rows) == 1, f"expected one row for {where}, got {len(rows)}"
    return rows.iloc[0]


def test_packaged_csv_loads_and_validates(published):
    assert (files("agcl.report") / "published.csv").is_file()
    assert list(published.columns) == COLUMNS
    # 15 LA + 13 ACDC + 1 ablation + 11 CRAG + 3 + 3 + 1 releases + 2 BCP (ACDC)
    # + 4 patch-similarity ablation rows (cosine, class confidence at 5 and 10 %)
    # + issue 18's baselines: 20 Semi-AGCL rows (SASSNet, DTC, URPC on LA/ACDC/CRAG, SS-Net on
    # CRAG), 1 SS-Net release (ACDC 7 labeled), 4 DTC README rows (LA 8 and 16 labeled)
    # + issue 26's: 2 UniMatch README rows (ACDC 3 and 7 cases), 4 AD-MT training-log rows
    assert len(published) == 84
    similarity = one(published, dataset="acdc", method="semi_agcl_cosine", ratio=0.1)
    assert (similarity["dice"], similarity["jaccard"], similarity["hd95"],
            similarity["asd"]) == (81.07, 70.35, 9.23, 6.77)
    assert set(published["dataset"]) == {"la", "acdc", "crag"}
    assert set(published["ratio"]) == {0.05, 0.1, 0.2, 1.0}
    counts = published.groupby("source").size()
    assert counts["MC-Net+ released results"] == 3
    assert counts["UA-MT paper"] == 1 and counts["Semi-AGCL paper Table (CRAG)"] == 19
    assert counts["DTC README"] == 4 and counts["SS-Net released results"] == 4
    assert counts["BCP paper (arXiv 2305.00673) Table (ACDC)"] == 2
    assert counts["UniMatch README (more-scenarios/medical)"] == 2
    admt = one(published, dataset="acdc", method="ad_mt", ratio=0.05)
    assert (admt["dice"], admt["jaccard"], admt["hd95"], admt["asd"]) == (88.85, 80.53, 2.40, 0.72)
    bcp = one(published, dataset="acdc", method="bcp", ratio=0.05)
    assert (bcp["dice"], bcp["jaccard"], bcp["hd95"], bcp["asd"]) == (87.59, 78.67, 1.90, 0.67)


def test_package_data_ships_the_csv():
    # text check: tomllib is not available on Python 3.10, which the project supports
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    agcl_data = [line for line in lines if line.replace(" ", "").startswith("agcl=[")]
    assert len(agcl_data) == 1 and '"report/*.csv"' in agcl_data[0]


def test_paper_semi_agcl_la_10(published):
    row = one(published, dataset="la", method="semi_agcl", ratio=0.1)
    assert (row["dice"], row["jaccard"], row["hd95"], row["asd"]) == (90.33, 82.53, 6.68, 1.78)
    assert row["source"] == PAPER and row["flag"] == ""


def test_acdc_10_two_flagged_rows(published):
    rows = published[(published["dataset"] == "acdc") & (published["method"] == "semi_agcl")
                     & (published["ratio"] == 0.1)].set_index("dice")
    assert sorted(rows.index) == [89.98, 91.98]
    assert rows.loc[91.98, ["jaccard", "hd95", "asd"]].tolist() == [82.96, 3.36, 1.16]
    assert rows.loc[89.98, ["jaccard", "hd95", "asd"]].tolist() == [80.96, 3.66, 0.86]
    assert rows.loc[91.98, "source"] == "Semi-AGCL paper Table (ACDC)"
    assert "ablation" in rows.loc[89.98, "source"]
    for dice in (89.98, 91.98):
        assert "inconsistency 1" in rows.loc[dice, "flag"]


def test_la_5_and_full_supervision_flags(published):
    la5 = one(published, dataset="la", method="semi_agcl", ratio=0.05)
    assert (la5["dice"], la5["jaccard"]) == (90.44, 79.05)
    assert "89.44" in la5["flag"] and "inconsistency 2" in la5["flag"]
    for dataset in ("la", "acdc"):
        full = one(published, dataset=dataset, method="supervised", ratio=1.0)
        assert (full["dice"], full["jaccard"]) == (91.44, 84.55)
        assert "inconsistency 4" in full["flag"]
    # the paper's five inconsistencies, and 10 further rows that only break the Jaccard bound
    assert (published["flag"] != "").sum() == 5 + 10


def test_release_rows_mapped_to_ratios(published):
    ss = one(published, dataset="acdc", method="ss_net", ratio=0.05,
             source="SS-Net released results")
    assert ss["dice"] == 65.82 and "3 labeled patients" in ss["note"]
    mc = one(published, dataset="la", method="mc_net", ratio=0.2)
    assert (mc["dice"], mc["jaccard"], mc["hd95"], mc["asd"]) == (91.07, 83.67, 5.84, 1.67)
    ua = one(published, dataset="la", method="ua_mt", ratio=0.2)
    assert ua["source"] == "UA-MT paper" and ua["dice"] == 88.88


def test_the_new_baselines_rows(published):
    dtc = one(published, dataset="la", method="dtc", ratio=0.05)
    assert (dtc["dice"], dtc["jaccard"], dtc["hd95"], dtc["asd"]) == (81.25, 69.33, 14.90, 3.99)
    urpc = one(published, dataset="acdc", method="urpc", ratio=0.1)
    assert (urpc["dice"], urpc["jaccard"], urpc["hd95"], urpc["asd"]) == (83.11, 72.41, 4.84, 1.55)
    assert "first value read as DTC" in urpc["note"]
    ss = one(published, dataset="acdc", method="ss_net", ratio=0.1, source="SS-Net released results")
    assert (ss["dice"], ss["jaccard"], ss["hd95"], ss["asd"]) == (86.78, 77.67, 6.07, 1.40)
    sass = one(published, dataset="la", method="sassnet", ratio=0.1, source="DTC README")
    assert (sass["dice"], sass["hd95"]) == (87.32, 9.62)  # README columns reordered: ASD after HD95
    # UniMatch's README prints Dice only: the other metrics are not published, not zero
    uni = one(published, dataset="acdc", method="unimatch", ratio=0.1)
    assert uni["dice"] == 89.90 and "val and test merged" in uni["note"]
    assert all(math.isnan(uni[m]) for m in ("jaccard", "hd95", "asd"))
    assert one(dice_jaccard_consistency(published), dataset="acdc", method="unimatch",
               ratio=0.05)["dice_jaccard_consistent"]


def test_dice_jaccard_consistency_bound(published):
    checked = dice_jaccard_consistency(published)
    la10 = one(checked, dataset="la", method="semi_agcl", ratio=0.1)
    assert la10["jaccard_min"] == pytest.approx(100 * 0.90325 / (2 - 0.90325))
    assert la10["dice_jaccard_consistent"]
    bad = checked[~checked["dice_jaccard_consistent"]]
    # LA 5% Semi-AGCL: 90.44 needs J >= ~82.5, printed 79.05 (docs/paper-notes.md, inconsistency 2)
    assert ((bad["dataset"] == "la") & (bad["method"] == "semi_agcl") & (bad["ratio"] == 0.05)).any()
    # no release row (MC-Net+, SS-Net, UA-MT) fails the bound
    assert bad["source"].str.startswith("Semi-AGCL").all()
    assert len(bad) == 13  # 12 + CRAG SS-Net 10 % (83.40 with Jaccard 70.25)


def test_every_row_that_breaks_the_bound_is_flagged_with_it(published):
    """Over the whole CSV: a row whose Jaccard is below D/(2-D) of its Dice says so in its flag
    (so the report's table marks it), and no consistent row claims the bound is broken."""
    checked = dice_jaccard_consistency(published)
    for _, row in checked.iterrows():
        says_so = "J = D/(2-D)" in row["flag"]
        assert says_so == (not row["dice_jaccard_consistent"]), (
            row["dataset"], row["method"], row["ratio"], row["flag"])


def hand_summary():
    cols = {"dataset": ["la", "la", "la"], "method": ["semi_agcl", "mean_teacher", "mc_net"],
            "ratio": [0.1, 0.1, 0.1], "n_seeds": [3, 3, 1],
            "dice_mean": [0.90, 0.85, 0.88], "dice_std": [0.01, 0.02, math.nan],
            "jaccard_mean": [0.82, 0.75, 0.79], "jaccard_std": [0.02, 0.02, math.nan],
            "hd95_mean": [7.0, 9.0, 8.0], "hd95_std": [0.5, 0.5, math.nan],
            "asd_mean": [2.0, 2.5, 2.0], "asd_std": [0.1, 0.1, math.nan]}
    return pd.DataFrame(cols)


def test_compare_with_published_hand_values(published):
    out = compare_with_published(hand_summary(), published)
    row = one(out, dataset="la", method="semi_agcl", ratio=0.1)
    assert row["present"] == "both" and row["source"] == PAPER and row["n_seeds"] == 3
    assert row["dice_ours"] == pytest.approx(90.0) and row["dice_ours_std"] == pytest.approx(1.0)
    assert row["dice_published"] == 90.33
    assert row["dice_diff"] == pytest.approx(-0.33)
    assert row["jaccard_diff"] == pytest.approx(82.0 - 82.53)
    assert row["hd95_diff"] == pytest.approx(7.0 - 6.68)  # distances: no unit conversion
    assert row["asd_diff"] == pytest.approx(0.22)
    # one summary row against two published sources
    mc = out[(out["method"] == "mc_net") & (out["ratio"] == 0.1) & (out["dataset"] == "la")]
    assert sorted(mc["dice_diff"].round(6)) == [round(88.0 - 88.96, 6), round(88.0 - 87.66, 6)]
    # ours only: Mean Teacher is in no table
    mt = one(out, method="mean_teacher")
    assert mt["present"] == "ours_only" and math.isnan(mt["dice_published"])
    assert mt["dice_ours"] == pytest.approx(85.0) and math.isnan(mt["dice_diff"])
    assert str(out["n_seeds"].dtype) == "Int64" and out["n_seeds"].isna().sum() == len(published) - 3
    # published only: kept with nan on our side
    arco = one(out, dataset="la", method="arco", ratio=0.05)
    assert arco["present"] == "published_only" and math.isnan(arco["dice_ours"])
    assert arco["dice_published"] == 86.90
    assert len(out) == len(published) + 1  # every published row, plus Mean Teacher


def test_compare_rejects_percent_and_missing_columns(published):
    percent = hand_summary().assign(dice_mean=[90.0, 85.0, 88.0])
    with pytest.raises(ValueError, match=r"dice_mean = 90.0 for la/semi_agcl/0.1.*fraction"):
        compare_with_published(percent, published)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['asd_mean'\]"):
        compare_with_published(hand_summary().drop(columns="asd_mean"), published)


def _corrupt(tmp_path, old, new):
    text = (files("agcl.report") / "published.csv").read_text()
    assert old in text
    path = tmp_path / "published.csv"
    path.write_text(text.replace(old, new, 1))
    return path


def test_corrupted_csv_names_the_row(tmp_path):
    path = _corrupt(tmp_path, "crag,ua_mt,0.05", "CRAG_x,ua_mt,0.05")
    with pytest.raises(ValueError, match=r"published.csv line 34 \(CRAG_x/ua_mt/0.05\): "
                                         r"field 'dataset'.*'CRAG_x'"):
        load_published(path)
    path = _corrupt(tmp_path, "90.33,82.53", "190.33,82.53")
    with pytest.raises(ValueError, match=r"line 16 \(la/semi_agcl/0.1\): field 'dice'.*'190.33'"):
        load_published(path)
    path = _corrupt(tmp_path, "acdc,unimatch,0.05,88.90,", "acdc,unimatch,0.05,,")
    with pytest.raises(ValueError, match=r"\(acdc/unimatch/0.05\): field 'dice'.*got ''"):
        load_published(path)  # Dice is required; only the others may be left unpublished
    path = _corrupt(tmp_path, "source,note,flag", "source,notes,flag")
    with pytest.raises(ValueError, match=r"missing \['note'\], unknown \['notes'\]"):
        load_published(path)
