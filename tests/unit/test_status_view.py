"""`tensoryard status` rich view: renders at 80 columns, figures whole, missing ones as "-"."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from services.status.report import build_report
from services.status.view import render
from tests.unit.status_samples import EMBEDDER, LLM, round_of, router_page, worker, worker_page

ROUTER = "http://127.0.0.1:8002/metrics"
A, B = worker("aaaaaaaa0001", EMBEDDER, 5000), worker("bbbbbbbb0002", EMBEDDER, 5010)
G = worker("cccccccc0003", LLM, 5020)


def rendered(report, width: int = 80) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render(report))
    return out.getvalue()


def busy_report():
    before = round_of({A: worker_page(EMBEDDER, 0, latency=(0,) * 7), B: worker_page(EMBEDDER, 0),
                       G: worker_page(LLM, 0, e2e=(0,) * 7, ttft=(0,) * 7, tokens=0)},
                      0.0, routers={ROUTER: router_page((EMBEDDER, "1", 0, 0))})
    after = round_of({A: worker_page(EMBEDDER, 2468, latency=(2000, 2400, 2468, 2468, 2468, 2468, 2468)),
                      B: None,
                      G: worker_page(LLM, 12, failures=1, e2e=(0, 0, 0, 0, 6, 13, 13), ttft=(0, 0, 6, 13, 13, 13, 13),
                                     tokens=777, waiting=12, kv=0.375)},
                     2.0, routers={ROUTER: router_page((EMBEDDER, "1", 2468, 3))})
    return build_report("127.0.0.1:7070", before, after)


@pytest.mark.parametrize("width", [80, 100, 60])
def test_renders_within_the_width_without_errors(width):
    text = rendered(busy_report(), width)
    assert all(len(line) <= width for line in text.splitlines())


def test_figures_render_whole_at_80_columns():
    text = rendered(busy_report())
    for header in ("req/s", "err/s", "latency", "ttft", "tok/s", "queue", "kv"):
        assert header in text
    assert "1234" in text  # the embedder's req/s
    assert "388" in text  # the LLM's tokens/s: 777 over 2 s
    assert "38%" in text  # its KV use
    assert "536/991ms" in text and "54/99ms" in text and "3.1/35ms" in text  # p50/p99 cells
    assert f"{LLM} v1" in text  # the longest name fits on its line
    assert "unreachable" in text  # replica B
    assert "aaaaaaaa" in text and "127.0.0.1:5000" in text


def test_missing_figures_show_as_a_dash():
    page = worker_page(EMBEDDER, 0, serving=None, phase=None)
    text = rendered(build_report("127.0.0.1:7070", round_of({A: page}, 0.0), round_of({A: page}, 1.0)))
    row = next(line for line in text.splitlines() if EMBEDDER in line)
    assert row.split()[-7:] == ["0", "0", "-", "-", "-", "-", "-"]
    assert "-/1" in row


def test_renders_with_nothing_to_show():
    report = build_report("127.0.0.1:7070", None, round_of({}, 0.0, routers={ROUTER: None},
                                                             discovery_error="registry 127.0.0.1:7070: UNAVAILABLE"))
    text = rendered(report)
    assert "UNAVAILABLE" in text and "no models" in text and "unreachable" in text
    assert "sampling" in text  # no window before the second round
