"""What the user sees: a tqdm bar per expert (images/s, units done, failures) and the end summary."""

from __future__ import annotations

from typing import Any


class Progress:
    def __init__(self, label: str, *, total: int | None, units: int, enabled: bool = True):
        self.units_total, self.units_done, self.units_failed, self.failed = units, 0, 0, 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="img", dynamic_ncols=True, smoothing=0.1)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            bad = f" ({self.units_failed} not written)" if self.units_failed else ""
            self.bar.set_postfix_str(f"units {self.units_done}/{self.units_total}{bad}, failed images {self.failed}",
                                     refresh=False)

    def image(self, ok: bool) -> None:
        if not ok:
            self.failed += 1
        if self.bar is not None:
            if self.bar.n == 0:
                # Rate from the first result on: worker start-up (model load) is not throughput.
                self.bar.start_t = self.bar.last_print_t = self.bar._time()
            self.bar.update(1)
            if not ok:
                self._postfix()

    def unit(self, failed: bool) -> None:
        if failed:
            self.units_failed += 1
        else:
            self.units_done += 1
        self._postfix()
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_summary(report: dict[str, Any]) -> str:
    """The end-of-job summary: per expert, images ok / failed by reason, bytes, time, images/s."""
    lines = [f"astrea extract: dataset {report['dataset']!r} -> {report['store']} "
             f"({len(report['shards'])} unit(s), ray {report['ray']}, device {report['device']}, "
             f"{report['workers']} worker(s))"]
    for r in report["experts"]:
        rw = "  [RANDOM WEIGHTS: features are not meaningful]" if r["random_weights"] else ""
        lines.append(f"  {r['expert']}@{r.get('fingerprint', '?')} ({r['arch']}, weights {r['weights']}){rw}")
        skipped = len(r.get("units_skipped", []))
        if r["status"] == "nothing to do":
            lines.append(f"    nothing to do: all {skipped} selected unit(s) already committed")
            continue
        lines.append(f"    units: {len(r['units_committed'])} committed, {skipped} already done"
                     + (f", {len(r['units_failed'])} NOT written" if r.get("units_failed") else ""))
        for u, why in sorted(r.get("units_failed", {}).items()):
            lines.append(f"      {u}: {why}")
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["failures_by_reason"].items(), key=lambda kv: -kv[1]))
        lines.append(f"    images: {r['images_ok']} ok, {r['images_failed']} failed" + (f" ({reasons})" if reasons else ""))
        lines.append(f"    wrote {human_bytes(r['bytes_written'])} in {r['seconds']:.1f} s, {r['images_per_s']:.2f} images/s"
                     + ("" if r.get("preprocess_on") != "inference actor" else
                        "  (preprocessing ran in the inference actor: the expert's preprocess needs its model)"))
        if r.get("prerequisites_note"):
            lines.append(f"    note: {r['prerequisites_note']}")
        if r.get("temp_cleaned"):
            lines.append(f"    cleaned {r['temp_cleaned']} leftover temp item(s) of an interrupted run")
    lines.append(f"  total: {report['images_ok']} ok, {report['images_failed']} failed, "
                 f"{human_bytes(report['bytes_written'])}, {report['seconds']:.1f} s, "
                 f"{report['images_per_s']:.2f} images/s; status: {report['status']}")
    return "\n".join(lines)
