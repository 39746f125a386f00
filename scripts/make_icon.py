"""Draws .claude-plugin/icon.png (512x512): a GPipe pipeline timeline (forwards, then backwards), curry-coloured. Run once; the PNG is committed."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

p, m = 4, 6
fig = plt.figure(figsize=(5.12, 5.12), dpi=100)
ax = fig.add_axes([0, 0, 1, 1])
ax.set_facecolor("#2b1d0e")
for rank in range(p):
    t = rank
    for mb in range(m):  # forward blocks then backward blocks, offset per rank
        ax.add_patch(plt.Rectangle((t + mb, p - rank - 1 + 0.12), 0.9, 0.76, color="#f2a51a"))
        ax.add_patch(plt.Rectangle((t + m + p - 1 - 2 * rank + mb * 1.0 + rank, p - rank - 1 + 0.12), 0.9, 0.76,
                                   color="#c2410c", alpha=0.95))
ax.set_xlim(-0.5, m * 2 + p + 0.5)
ax.set_ylim(-0.6, p + 0.6)
ax.axis("off")
out = Path(__file__).resolve().parents[1] / ".claude-plugin" / "icon.png"
fig.savefig(out, facecolor="#2b1d0e")
print(out)
