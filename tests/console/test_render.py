"""The console's shared pieces on plain values: units, times, errors as sentences, SVG charts."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from aiohttp import web

from sendense_nbd.errors import Conflict, UnknownPolicy
from sendense_nbd.hub.api import _ERRORS
from sendense_nbd.hub.console import charts, render


def test_units_and_durations_read_as_words() -> None:
    assert render.human_bytes(0) == "0 B"
    assert render.human_bytes(1536) == "1.5 KiB"
    assert render.human_bytes(3 << 30) == "3.0 GiB"
    assert render.human_bytes(None) == render.human_bytes(float("nan")) == render.human_bytes(True) == "-"
    assert render.human_rate(100 << 20) == "100.0 MiB/s"
    assert render.human_duration(4.25) == "4.2 s"
    assert render.human_duration(200) == "3 min 20 s"
    assert render.human_duration(7500) == "2 h 05 min"
    assert render.human_duration(90000) == "1 d 1 h"
    assert render.human_duration(-1) == "-"
    assert render.human_age(1000.0, 1060.0) == "1 min 00 s ago"


def test_a_time_is_an_escaped_time_element_in_utc() -> None:
    html = str(render.time_element(1_772_438_400.0))
    assert html == '<time datetime="2026-03-02T08:00:00Z">2026-03-02 08:00:00 UTC</time>'
    assert str(render.time_element("<b>")) == "-"


def test_errors_read_as_the_hubs_sentences_with_the_apis_statuses() -> None:
    exc = Conflict("policy nightly has a backup run open (r1); wait for it to end", "run_open")
    assert render.message_for(exc) == "policy nightly has a backup run open (r1); wait for it to end"
    assert render.status_for(exc, _ERRORS) == 409
    assert render.status_for(UnknownPolicy("no policy 'x'"), _ERRORS) == 404
    assert render.status_for(RuntimeError("boom"), _ERRORS) == 500
    assert render.status_for(web.HTTPForbidden(reason="no"), _ERRORS) == 403


def test_a_chart_is_valid_svg_with_its_text_escaped() -> None:
    svg = str(
        charts.line_chart(
            [(0.0, 0.0), (10.0, 50.0), (20.0, 100.0)],
            element_id="plot",
            title="<script>x</script>",
            y_label=lambda v: f"{v:.0f} <u>",
            x_labels=("start & go", "end"),
        )
    )
    root = ET.fromstring(svg)  # well-formed XML
    assert root.get("id") == "plot" and root.get("role") == "img"
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "start &amp; go" in svg
    line = root.find("polyline")
    assert line is not None
    points = [tuple(map(float, pair.split(","))) for pair in line.get("points", "").split()]
    assert len(points) == 3 and points[0][0] < points[1][0] < points[2][0]
    assert points[0][1] > points[1][1] > points[2][1]  # higher values are drawn higher


def test_a_chart_without_two_points_says_so() -> None:
    svg = str(charts.line_chart([(1.0, 2.0)], element_id="p", title="t", y_label=str, x_labels=("a", "b")))
    assert "no data yet" in svg and not re.search(r"<polyline", svg)


def test_rates_are_the_slope_between_samples_never_negative() -> None:
    samples = [(0.0, 0.0), (2.0, 200.0), (2.0, 300.0), (4.0, 100.0), (5.0, 600.0)]
    assert charts.rates(samples) == [(2.0, 100.0), (4.0, 0.0), (5.0, 500.0)]
