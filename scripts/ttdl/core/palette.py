"""The VOC colour map: label PNGs and qualitative panels share it."""
from __future__ import annotations


def voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved), 256 entries flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette
