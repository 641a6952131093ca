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


def markdown_table() -> str:
    """The README's table of delivered pixel sizes (`python -m app.images.dimensions` prints it)."""
    from app.core.catalog import SIZES, SIZES_4K

    lines = ["| size | 1k | 2k | 4k |", "|---|---|---|---|"]
    for size in SIZES[1:]:
        cells = ["{}×{}".format(*dimensions(size, res)) for res in ("1k", "2k")]
        cells.append("{}×{}".format(*dimensions(size, "4k")) if size in SIZES_4K else "—")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
