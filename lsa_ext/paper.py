"""The paper's reported numbers (Khalooei et al., arXiv 2202.02626), for side-by-side reports:
FGSM accuracy (%) per ε of the paper's grid (``presets.PAPER_GRID``), per training run.
"""

from __future__ import annotations

# The paper's FGSM accuracies per ε (arXiv 2202.02626, Table 2: Model A on two-moons; Table 3:
# Model B on MNIST — compared with mnist5k, and with the digits stand-in), for side-by-side
# reports.
PAPER: dict[str, dict[str, list[float]]] = {
    "moons": {
        "Normal": [97.07, 93.63, 82.5, 76.83, 63.79, 52.35],
        "AT-FGSM": [95.86, 91.98, 87.88, 81.33, 70.54, 58.69],
        "AT-PGD": [86.5, 83.89, 80.87, 76.61, 72.57, 60.02],
        "AT-TRADES": [96.17, 93.06, 85.78, 74.2, 68.62, 59.68],
        "AT-FAST": [94.32, 89.72, 84.91, 78.35, 70.18, 61.65],
        "AT-FGSM-LR-L2": [93.98, 93.01, 89.12, 84.01, 75.15, 63.25],
        "AT-PGD-LR-L2": [88.78, 86.93, 81.25, 77.01, 72.81, 66.58],
        "AT-FAST-LR-L2": [92.91, 90.31, 86.26, 81.53, 75.09, 67.65],
        "AT-TRADES-LR-L2": [96.67, 93.2, 86.56, 81.25, 79.5, 68.65],
    },
    "mnist5k": {  # MNIST in the paper (60000 training images)
        "Normal": [98.82, 82.1, 47.2, 17.87, 6.96, 4.25],
        "AT-APGD": [99.36, 98.54, 97.67, 96.97, 71.72, 33.73],
        "AT-APGD-LR-L0": [98.97, 98.11, 97.36, 97.17, 94.6, 55.52],
    },
}
PAPER["digits"] = PAPER["mnist5k"]  # the 8×8 stand-in is compared with MNIST's numbers too

# where the paper's numbers of each protocol come from (arXiv 2202.02626)
PAPER_TABLE = {"moons": "Table 2, two-moons", "mnist5k": "Table 3, MNIST",
                "digits": "Table 3, MNIST"}
