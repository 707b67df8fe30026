"""The bench scripts' plots: matplotlib with no display, each saved to a PNG the same way."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a GPU box or in CI
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def save(fig, out) -> None:
    """Write fig to out (creating its folder) and free it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
