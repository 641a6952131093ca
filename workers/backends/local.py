"""The local development backend: draws a picture of the prompt with Pillow.

No upstream account is needed, and the same prompt always gives the same image.
It is for development and tests, not a real image model.
"""

from __future__ import annotations

import hashlib
import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

from workers.backends.base import ImageJob


class LocalBackend:
    def generate(self, job: ImageJob) -> list[bytes]:
        digest = hashlib.sha256(job.prompt.encode("utf-8")).digest()
        top, bottom = tuple(digest[0:3]), tuple(digest[3:6])
        width, height = job.width, job.height
        # A vertical gradient between two colours taken from the prompt's hash.
        column = Image.new("RGB", (1, 256))
        for row in range(256):
            t = row / 255
            column.putpixel((0, row), tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
        image = column.resize((width, height), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        for i in range(8):  # a few shapes, placed by the hash
            x, y = digest[8 + i] / 255 * width, digest[16 + i] / 255 * height
            r = (digest[24 + i] / 255 * 0.2 + 0.03) * min(width, height)
            draw.ellipse((x - r, y - r, x + r, y + r), outline=tuple(digest[i:i + 3]), width=max(2, width // 256))
        font = ImageFont.load_default(size=max(12, min(width, height) // 24))
        text = "\n".join(textwrap.wrap(job.prompt[:300], width=40))
        draw.multiline_text((width * 0.05, height * 0.05), text, fill=(255, 255, 255), font=font,
                            stroke_width=2, stroke_fill=(0, 0, 0))
        out = io.BytesIO()
        image.save(out, "PNG")
        return [out.getvalue()]
