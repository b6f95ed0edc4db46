"""What the user sees: a tqdm bar per expert (images/s, units done, failures; fed by the actors' counts)
and the end summary."""

from __future__ import annotations

from typing import Any


class Progress:
    """Images done = images of committed units + what the actors report for the units in progress."""

    def __init__(self, label: str, *, total: int | None, units: int, enabled: bool = True):
        self.units_total, self.units_done, self.units_failed = units, 0, 0
        self.done_ok = self.done_failed = 0  # images of units finished
        self.live: dict[str, list[int]] = {}  # unit -> [ok, failed] of units in progress
        self.finished: set[str] = set()  # a progress reply sent before a unit ended must not count it twice
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="img", dynamic_ncols=True, smoothing=0.1)
            self._postfix()

    @property
    def failed(self) -> int:
        return self.done_failed + sum(c[1] for c in self.live.values())

    def _postfix(self) -> None:
        if self.bar is not None:
            bad = f" ({self.units_failed} not written)" if self.units_failed else ""
            self.bar.set_postfix_str(f"units {self.units_done}/{self.units_total}{bad}, failed images {self.failed}",
                                     refresh=False)

    def _update(self) -> None:
        if self.bar is None:
            return
        n = self.done_ok + self.done_failed + sum(c[0] + c[1] for c in self.live.values())
        if n > self.bar.n:  # a retried unit's counts restart from 0: the bar never goes back
            self._postfix()
            self.bar.update(n - self.bar.n)

    def start(self) -> None:
        """The models are loaded: the rate counts from now (start-up is not throughput)."""
        if self.bar is not None:
            self.bar.start_t = self.bar.last_print_t = self.bar._time()

    def set_live(self, counts: dict[str, list[int]]) -> None:
        self.live = {u: c for u, c in counts.items() if u not in self.finished}
        self._update()

    def unit(self, failed: bool, *, ok: int = 0, failed_images: int = 0, unit_name: str | None = None) -> None:
        if failed:
            self.units_failed += 1
        else:
            self.units_done += 1
            self.done_ok += ok
            self.done_failed += failed_images
        if unit_name is not None:
            self.live.pop(unit_name, None)
            self.finished.add(unit_name)
        self._postfix()
        self._update()
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


HINT_MIN_S = 5.0


def _bottleneck(acc: dict[str, float]) -> str:
    """A hint when the device waited on the CPU side for more than a fifth of its forward time."""
    fwd = acc.get("forward", 0.0)
    if fwd <= 0 or fwd + sum(v for k, v in acc.items() if k.startswith("wait_")) < HINT_MIN_S:
        return ""  # a few seconds of work say nothing about a bottleneck
    if acc.get("wait_read", 0.0) > 0.2 * fwd:
        return " (read-bound: the source shards, or the stored prompts, are read too slowly: a faster filesystem)"
    if acc.get("wait_decode", 0.0) > 0.2 * fwd:
        return " (decode-bound: give the job more CPUs, or --cpus-per-task less)"
    if acc.get("wait_write", 0.0) > 0.2 * fwd:
        return " (write-bound: a faster disk for the store, or --format wds, which does not compress)"
    return ""


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
        for err in r.get("store_errors", []):
            lines.append(f"    STORE ERROR: {err}")
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["failures_by_reason"].items(), key=lambda kv: -kv[1]))
        lines.append(f"    images: {r['images_ok']} ok, {r['images_failed']} failed" + (f" ({reasons})" if reasons else ""))
        lines.append(f"    wrote {human_bytes(r['bytes_written'])} in {r['seconds']:.1f} s, {r['images_per_s']:.2f} images/s"
                     + ("" if r.get("preprocess_on") != "inference actor" else
                        "  (preprocessing ran in the inference actor: the expert's preprocess needs its model)"))
        if r.get("images_per_s_after_load"):
            lines.append(f"    {r['images_per_s_after_load']:.2f} images/s once the models were loaded "
                         f"({r.get('seconds_to_ready', 0):.1f} s to start)")
        se = r.get("storage_error") or {}
        if "max_abs" in se:
            lines.append(f"    fp32 -> {r.get('dtype', 'storage dtype')} error: max abs {se['max_abs']:.3g}, "
                         f"max rel {se.get('max_rel', 0.0):.3g} (first image of every window; every image is "
                         "checked for overflow)")
        acc = r.get("actor_seconds")
        if acc:
            lines.append(f"    actors: forward {acc.get('forward', 0):.1f} s, waiting for reading {acc.get('wait_read', 0):.1f} s, "
                         f"for decoding {acc.get('wait_decode', 0):.1f} s, for the writer {acc.get('wait_write', 0):.1f} s"
                         + _bottleneck(acc))
        if r.get("prerequisites_note"):
            lines.append(f"    note: {r['prerequisites_note']}")
        if r.get("temp_cleaned"):
            lines.append(f"    cleaned {r['temp_cleaned']} leftover temp item(s) of an interrupted run")
    lines.append(f"  total: {report['images_ok']} ok, {report['images_failed']} failed, "
                 f"{human_bytes(report['bytes_written'])}, {report['seconds']:.1f} s, "
                 f"{report['images_per_s']:.2f} images/s; status: {report['status']}")
    return "\n".join(lines)
