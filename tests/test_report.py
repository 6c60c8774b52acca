"""dit_jax.report: the rule-of-thumb verdicts, the markdown table and the ToMe search section."""

from __future__ import annotations

import numpy as np

from dit_jax import report


def _row(name, speedup, adherence, fd_clf, fd_eff=None) -> report.Row:
    return report.Row(name, "", "", 10, speedup, None, None, None, None, adherence, fd_clf, (0.0, 0.0),
                        fd_eff, None if fd_eff is None else (0.0, 0.0))


def _context(**extra) -> dict:
    return {"command": "python -m dit_jax.evaluate", "date": "today", "machine": "cpu", "model": "m", "steps": 2,
            "cfg_scale": 4.0, "num_samples": 10, "batch_size": 10, "seed": 0, "repeats": 1, "reference_size": 20,
            "classifier_accuracy": 0.92, "efflite_size": 224, "png_name": "q.png", "tome_searches": {}, **extra}


def test_keeps_quality_rule_and_report():
    base, real = _row("baseline", 1.0, 0.95, 50.0, 50.0), _row("test images", None, 0.94, 10.0, 30.0)
    assert report.keeps_quality(_row("a", 1.3, 0.93, 60.0, 55.0), base, real)  # within 3 points, FDs within slack
    assert not report.keeps_quality(_row("b", 1.3, 0.91, 40.0, 40.0), base, real)  # adherence
    assert not report.keeps_quality(_row("c", 1.3, 0.95, 71.0, 50.0), base, real)  # FD-classifier > 50 + 20
    assert not report.keeps_quality(_row("d", 1.3, 0.95, 50.0, 61.0), base, real)  # FD-EffLite0 > 50 + 10
    assert report.keeps_quality(_row("e", 1.3, 0.95, 62.0), _row("baseline", 1.0, 0.95, 50.0), None)  # 25% without floor
    rows = [base, _row("fast", 2.0, 0.5, 300.0, 300.0), _row("ok", 1.2, 0.95, 50.0, 50.0), real]
    text = report.markdown_report(rows, _context())
    assert "Keep quality, fastest first (speed-up, adherence): ok (1.20x, 95%)." in text
    assert "Lose quality: fast (2.00x, 50%)." in text
    assert "| ok | 1.20x |" in text and text.count("| yes |") == 1


def test_tome_search_section_and_figure():
    rows = [_row("baseline", 1.0, 0.95, 50.0), _row("sdtm", 1.6, 0.9, 60.0), _row("tome-matched", 1.4, 0.93, 55.0)]
    probes = [{"ratio": 0.5, "speedup": 1.3}, {"ratio": 0.75, "speedup": 1.4}]
    missed = {"ratio": 0.75, "reached": False, "target": 1.6, "tolerance": 0.05, "calls_per_probe": 3, "probes": probes}
    text = report.markdown_report(rows, _context(tome_searches={"sdtm": missed}))
    assert "## ToMe ratio search: sdtm" in text
    assert "- 0.5000: 1.300x" in text and "median of 3 timed calls" in text
    assert "chosen ratio 0.7500 (closest; no probe came within 5%" in text
    reached = dict(missed, ratio=0.5, reached=True, tolerance=0.1)
    assert "chosen ratio 0.5000." in report.markdown_report(rows, _context(tome_searches={"sdtm": reached}))
    images = np.zeros((10, 32, 32, 1), np.uint8)
    figure = report.quality_figure(rows, [("baseline", images), ("sdtm", images)])
    assert figure.width == 2 * 460 and figure.height > 340 + 2 * 64  # two panels (no FD-EffLite0), two strips
