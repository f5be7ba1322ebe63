"""What the plot scripts share: a mean curve over seeds with a band of one standard deviation, a legend on
every panel that says so, and saving a figure into docs/. Files only, no screen."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402, F401  (the plot scripts take plt from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def band(ax, x, values, label, alpha=0.2, seeds=True):
    """Plot the mean over seeds of `values` [seeds x points] against x, shaded +- one standard deviation."""
    mean, sd = values.mean(0), values.std(0)
    ax.plot(x, mean, lw=2, label=f"{label} ({len(values)} seeds)" if seeds else label)
    ax.fill_between(x, mean - sd, mean + sd, alpha=alpha)


def legend(ax, **kwargs):
    """The panel's legend, titled with what its curves and bands are."""
    ax.legend(title="mean over seeds, band: one standard deviation", title_fontsize=7, fontsize=7, **kwargs)


def save(fig, name):
    """docs/<name>, laid out tight."""
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", name), dpi=110)
    print(f"wrote docs/{name}")
