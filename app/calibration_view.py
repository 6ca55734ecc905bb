"""The calibration facts shown under the figures: the chosen tree size and the measured curve."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ppd_core.engine import Engine


def calibration_summary(engine: Engine) -> str:
    report = getattr(engine, "calibration", None)
    if not report:
        return "Tree: built-in (not calibrated for this machine in this run)."
    from ppd_core.calibrate import curve_table

    how = "cached" if report.get("cached") else "measured now"
    plain = ("\n\nOn this machine no tree paid for its extra rows, so PPD on decodes plain steps (only guesses copied "
             "from the context still join in): plain decoding is the fastest lossless choice here."
             if report.get("b_star") == 0 else "")
    return (f"Tree chosen for this machine: **B\\* = {report.get('b_star')}** ({how}; "
            f"fingerprint `{report.get('fingerprint', '?')}`){plain}\n\n{curve_table(report)}")


def calibration_plot(engine: Engine) -> str | None:
    """PNG of the calibration curve (a temp file), or None without a calibration or matplotlib."""
    report = getattr(engine, "calibration", None)
    if not report or not report.get("curve"):
        return None
    try:
        from ppd_core.calibrate import plot_curve

        path = Path(tempfile.mkdtemp(prefix="ppd-chat-")) / "calibration.png"
        plot_curve(report, path)
        return str(path)
    except Exception:  # the plot is a nicety; the table above says the same
        return None
