"""Test support for the report plots: draw one as a user's run would and inspect the figure."""

from __future__ import annotations

import warnings


def drawn(plot, *args, **kwargs):
    """Calls `plot(*args, **kwargs)` with warnings as errors (a tight_layout that gives up
    warns) and returns its figure, kept open and drawn so that extents are final."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    close = plt.close
    plt.close = lambda *a, **k: None        # the plot closes its figure once saved
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plot(*args, **kwargs)
    finally:
        plt.close = close
    fig = plt.gcf()
    fig.canvas.draw()
    return fig


def inside(inner, outer, tol=1.0):
    """Whether bounding box `inner` lies within `outer` (display units, `tol` of slack)."""
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol
            and inner.x1 <= outer.x1 + tol and inner.y1 <= outer.y1 + tol)


def overlap(a, b):
    """Whether bounding boxes `a` and `b` overlap."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
