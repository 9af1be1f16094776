"""Draw the README's before/after picture from the bundled sample (needs matplotlib).

python benchmarks/figure.py [OUTPUT.png]
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import microdecon as md  # noqa: E402


def main(path: str) -> None:
    sample = md.data.sample()
    observed = sample.image.astype(np.float32) - sample.background
    iterations = []  # the default stops by itself: say where
    restored = md.richardson_lucy(
        sample.image,
        sample.psf,
        background=sample.background,
        device="cpu",
        callback=lambda i, estimate: iterations.append(i),
    )
    panels = [
        ("observed", observed),
        (f"microdecon RL (default: {len(iterations)} iterations)", restored),
        ("ground truth", sample.truth),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(10.5, 5.6), gridspec_kw={"height_ratios": [128, 80]})
    for column, (title, volume) in enumerate(panels):
        top = volume.max(axis=0)
        side = np.repeat(volume.max(axis=1), 2, axis=0)  # z voxels are twice as deep as wide
        for row, image in enumerate((top, side)):
            ax = axes[row, column]
            ax.imshow(image, cmap="magma", vmin=0, vmax=np.percentile(image, 99.8))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, column].set_title(
            f"{title}\nPSNR {md.metrics.psnr(sample.truth, volume):.1f} dB" if column < 2 else title
        )
    axes[0, 0].set_ylabel("max projection, z")
    axes[1, 0].set_ylabel("max projection, y")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


if __name__ == "__main__":
    main(
        sys.argv[1]
        if len(sys.argv) > 1
        else str(Path(__file__).resolve().parent.parent / "docs" / "sample_before_after.png")
    )
