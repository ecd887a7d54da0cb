"""The report's results table labels and orders the protocol and per-step variants."""

from __future__ import annotations

from slim_ray.report import results_table


def _entry(ndcg: float) -> dict:
    m = {"ndcg@10": ndcg, "hr@10": 2 * ndcg, "hr@20": 3 * ndcg}
    return {"mean": {"full": m}, "std": {"full": {k: 0.0 for k in m}}, "seeds": [0, 1]}


def test_leaky_and_step_variants_sit_under_their_variant_with_gain_and_p():
    results = {"sasrec": {v: _entry(x) for v, x in [
        ("slim:student@leaky", 0.09), ("slim:student-step3", 0.07), ("id", 0.10), ("slim:student", 0.11),
        ("id_text", 0.08), ("slim:student+full", 0.12)]}}
    sig = {"sasrec": {"slim:student@leaky": {"full": {"p_ttest": 0.004}}}}
    rows = [r for r in results_table({"results": results, "significance": sig}, "full").splitlines()[2:]]
    labels = [r.split(" | ")[0].lstrip("| ") for r in rows]
    assert labels == ["SASRec", "SASRec+ (item text)", "SLIM (student rationales)",
                      "SLIM (student rationales), evaluated with the full-prefix rationale",
                      "SLIM (student rationales) [leaky protocol]", "SLIM (student rationales), Step 3 only"]
    leaky = rows[4]
    assert "-10.0% vs SASRec" in leaky and leaky.rstrip(" |").endswith("0.004")
    assert "+10.0% vs SASRec" in rows[2] and "+20.0% vs SASRec" in rows[3] and "-30.0% vs SASRec" in rows[5]


def test_honest_paragraph_reads_both_protocols_from_the_numbers():
    from slim_ray.report import honest_paragraph

    results = {"gru4rec": {v: _entry(x) for v, x in [("id", 0.10), ("id_text", 0.08), ("slim:student", 0.09),
                                                     ("slim:student@leaky", 0.07), ("slim:student+full", 0.11)]}}
    sig = {"gru4rec": {"slim:student": {"full": {"p_ttest": 0.2}}, "slim:student+full": {"full": {"p_ttest": 0.03}}}}
    text = honest_paragraph({"results": results, "significance": sig, "protocols": ["full"]}, {}, {}, {})
    assert "With GRU4Rec, SLIM does not beat the better baseline (GRU4Rec) on full NDCG@10: 9.00 vs 10.00" in text
    assert "not significant, paired t-test p = 0.2" in text and "the same SLIM scores 7.00" in text
    assert ("written from the whole training prefix score 11.00 (against GRU4Rec: paired t-test p = 0.03)"
            in text)
