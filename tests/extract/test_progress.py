"""The extraction bar and summary: counts from the actors, stale replies, the bottleneck hint."""

from __future__ import annotations

from astrea.extract.progress import Progress, format_summary


def test_bar_counts_finished_and_live_units_once():
    bar = Progress("x", total=10, units=2)
    bar.start()
    bar.set_live({"00000": [3, 0], "00001": [1, 1]})
    assert bar.bar.n == 5 and bar.failed == 1
    bar.unit(failed=False, ok=4, failed_images=1, unit_name="00000")
    # A progress reply sent before 00000 ended arrives after it: 00000 must not count twice.
    bar.set_live({"00000": [3, 0], "00001": [2, 1]})
    assert bar.bar.n == 8 and bar.failed == 2  # 00000: 5 done (4 ok, 1 failed); 00001: 3 live
    bar.unit(failed=False, ok=4, failed_images=1, unit_name="00001")
    assert bar.bar.n == 10 and bar.units_done == 2
    bar.close()


def _report(acc: dict) -> dict:
    expert = {"expert": "siglip", "fingerprint": "f", "arch": "a", "weights": "random", "random_weights": True,
              "status": "done", "units_skipped": [], "units_committed": ["00000"], "failures_by_reason": {},
              "images_ok": 10, "images_failed": 0, "bytes_written": 10, "seconds": 1.0, "images_per_s": 10.0,
              "images_per_s_after_load": 20.0, "seconds_to_ready": 0.5, "actor_seconds": acc}
    return {"dataset": "d", "store": "s", "shards": ["00000"], "ray": "local", "device": "cpu", "workers": 1,
            "experts": [expert], "images_ok": 10, "images_failed": 0, "bytes_written": 10, "seconds": 1.0,
            "images_per_s": 10.0, "status": "done"}


def test_summary_shows_the_storage_round_trip_error():
    rep = _report({"forward": 1.0})
    rep["experts"][0].update(dtype="float16", storage_error={"max_abs": 0.00123, "max_rel": 0.00049, "nonfinite": 0})
    assert "fp32 -> float16 error: max abs 0.00123, max rel 0.00049" in format_summary(rep)
    assert "error: max abs" not in format_summary(_report({"forward": 1.0}))


def test_summary_names_the_bottleneck_only_on_enough_work():
    text = format_summary(_report({"forward": 10.0, "wait_decode": 6.0, "wait_write": 0.1}))
    assert "20.00 images/s once the models were loaded" in text and "decode-bound" in text
    assert "write-bound" in format_summary(_report({"forward": 10.0, "wait_decode": 0.1, "wait_write": 3.0}))
    assert "read-bound" in format_summary(_report({"wait_read": 4.0, "forward": 10.0, "wait_decode": 0.1, "wait_write": 0.1}))
    assert "bound" not in format_summary(_report({"forward": 0.1, "wait_decode": 0.5, "wait_write": 0.0}))
    assert "bound" not in format_summary(_report({"forward": 10.0, "wait_decode": 1.0, "wait_write": 1.0}))
