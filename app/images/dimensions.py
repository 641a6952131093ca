"""(size, resolution) -> pixel dimensions of the delivered image.

Each aspect ratio a:b is drawn at a*k x b*k pixels, k chosen so the long side
is as near as it gets to the tier's 1024, 2048 or 4096 pixels: the ratio is
exact and the tier is kept. `auto` leaves the aspect ratio to the backend; its
image is scaled so the long side matches the tier.
"""

from __future__ import annotations

LONG_SIDE = {"1k": 1024, "2k": 2048, "4k": 4096}


def dimensions(size: str, resolution: str) -> tuple[int, int]:
    """(width, height) for an aspect ratio such as "16:9" ("auto" is treated as 1:1 here)."""
    a, b = (1, 1) if size == "auto" else (int(part) for part in size.split(":"))
    k = round(LONG_SIDE[resolution] / max(a, b))
    return a * k, b * k


def table() -> list[tuple[str, str, int, int]]:
    from app.catalog import RESOLUTIONS, SIZES, SIZES_4K

    rows = []
    for size in SIZES[1:]:
        for res in RESOLUTIONS:
            if res == "4k" and size not in SIZES_4K:
                continue
            rows.append((size, res, *dimensions(size, res)))
    return rows


if __name__ == "__main__":  # prints the README's table
    print("| size | 1k | 2k | 4k |\n|---|---|---|---|")
    from app.catalog import SIZES, SIZES_4K

    for size in SIZES[1:]:
        cells = [f"{w}×{h}" for w, h in (dimensions(size, r) for r in ("1k", "2k"))]
        cells.append("{}×{}".format(*dimensions(size, "4k")) if size in SIZES_4K else "—")
        print(f"| {size} | " + " | ".join(cells) + " |")
