"""The BENCHMARKS.md text of `slim-ray bench scale` from a results dict (no stage runs)."""

from slim_ray.scale.report import checks, other_run, training_ratio


def _stage(wall_s, rss, **more):
    return dict(rc=0, wall_s=wall_s, cpu_s=wall_s, driver_rss_mib=rss, tree_rss_mib=2 * rss, tree_pss_mib=rss,
                spill_mib=0.0, output_bytes=1, output_files=1, **more)


def _results(items_big: int, step_big: float):
    def size(n, items, step):
        return {"prepare": _stage(0.01 * n, 400, rows=n, items=items),
                "train": _stage(100, 400, rows=n, steps=100, s_per_step=step, examples_per_s=256 / step,
                                loss="full_softmax", workers=2, run="sasrec-id-s0", worker_rss_mib=1000)}
    return {"machine": {"date": "2026-12-03 16:00 UTC"}, "sets": ["rec.mode=id"],
            "sizes": {"100000": size(100000, 10000, 0.5), "1000000": size(1000000, items_big, step_big)}}


def test_training_ratio_compares_equal_catalogues_only():
    assert "seconds per step 1.20×" in training_ratio(_results(10000, 0.6))[1]
    assert "goal within 1.3×: met" in training_ratio(_results(10000, 0.6))[1]
    assert "**not met**" in training_ratio(_results(10000, 0.7))[1]  # 1.4x slower per step
    assert "the catalogues differ (10,000 vs 20,000 items)" in training_ratio(_results(20000, 0.7))[1]


def test_another_invocation_gets_its_own_section():
    text = "\n".join(other_run(_results(10000, 0.6)))
    assert text.startswith("## Also measured: `--set rec.mode=id`")
    assert "| train | 1,000,000 | 100.0 |" in text and "run `sasrec-id-s0`" in text
    # prepare's seconds per user stay flat; train's (fixed steps) fall by 10x
    assert "| prepare | 1.00× | 1.00× | 400 MiB | yes |" in "\n".join(checks(_results(10000, 0.6)))
