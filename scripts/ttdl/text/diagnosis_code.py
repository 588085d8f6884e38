"""A one-hot code of the diagnosis: the control that separates the text encoder from the loss coupling.

The rules describer's text carries a diagnosis (what kind of error, where, for
which class) through a frozen text encoder. Training on a one-hot code of the
same diagnosis instead tells whether a result comes from the diagnostic
content or from the encoder's embedding of it. The code is computed by the
describer's own measurement (`analyse_request`), so text and code never
disagree about what is wrong; only the dominant error is coded.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ttdl.core.settings import DescriberSettings
from ttdl.text.describers.request import DescribeRequest
from ttdl.text.describers.rules import CELLS, SHIFT_CODES, WHOLE, Diagnosis, analyse_request, is_background

# What the rules analysis tells apart. "missed": the whole object (left as background);
# "confused": missed (wholly or partly) as another class; "incomplete": a part missing;
# "over": an over-extension past the outline; "hallucinated": a detached spurious region;
# "shifted": the prediction moved as a whole; "boundary": only a coarse, tight or loose outline.
DIAGNOSIS_KINDS: tuple[str, ...] = (
    "none", "missed", "confused", "incomplete", "over", "hallucinated", "shifted", "boundary",
)
# The 9 cells of the 3x3 grid, row-major, and "whole" for errors spread over it (a ring, everything, no error).
# On the object's box for errors on the object, on the image for full misses and hallucinations;
# for "shifted" the cell is the direction of the move (a shift to the right is "right").
LOCATIONS: tuple[str, ...] = (*CELLS, WHOLE)


def code_dim(num_classes: int) -> int:
    """Width of `code_embedding`: one-hot kind, one-hot location, one-hot class."""
    return len(DIAGNOSIS_KINDS) + len(LOCATIONS) + num_classes


def dominant_error(diag: Diagnosis) -> tuple[str, str]:
    """(kind, location) of the error that matters most: a full miss, else a shift, else the largest in pixels.

    A full miss and a shift explain every other error of the object, so they
    win outright; otherwise the error with the most pixels wins, ties going to
    the kind listed first in DIAGNOSIS_KINDS.
    """
    confused = diag.missed_as is not None and not is_background(diag.missed_as)
    if diag.fully_missed:
        return ("confused" if confused else "missed"), diag.missed_extents[0].code
    if diag.shift:
        return "shifted", SHIFT_CODES[diag.shift]
    candidates = [
        (diag.missed_area, "confused" if confused else "incomplete", diag.missed_extents),
        (diag.over_area, "over", diag.over_extents),
        (diag.halluc_area, "hallucinated", diag.halluc_extents),
        (diag.boundary_area, "boundary", [diag.boundary_extent] if diag.boundary_extent else []),
    ]
    area, kind, extents = max(candidates, key=lambda c: c[0])  # max keeps the first of equal areas
    if area <= 0 or not extents:
        return "none", WHOLE
    return kind, extents[0].code


def format_code(kind: str, location: str, class_index: int) -> str:
    return f"kind={kind}|loc={location}|cls={class_index}"


def parse_code(code: str) -> tuple[str, str, int]:
    """(kind, location, class) of a code string; ValueError when it is not one `format_code` writes."""
    try:
        fields = dict(part.split("=", 1) for part in code.split("|"))
        kind, location, cls = fields["kind"], fields["loc"], int(fields["cls"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a diagnosis code: {code!r}") from err
    if set(fields) != {"kind", "loc", "cls"} or kind not in DIAGNOSIS_KINDS or location not in LOCATIONS:
        raise ValueError(f"not a diagnosis code: {code!r}")
    return kind, location, cls


def diagnosis_code(request: DescribeRequest, cfg: DescriberSettings) -> str:
    """Canonical code of a request's dominant error, e.g. "kind=incomplete|loc=left|cls=3"."""
    diag = analyse_request(request, cfg.negligible_fraction, cfg.analysis_size)
    return format_code(*dominant_error(diag), request.class_index)


def code_embedding(codes: list[str], num_classes: int) -> Tensor:
    """[T, code_dim] float: one-hot(kind) ++ one-hot(location) ++ one-hot(class) per code.

    Each factor is its own one-hot block, so a row is never a unit vector
    (three ones); normalise downstream if the objective expects unit length.
    """
    out = torch.zeros(len(codes), code_dim(num_classes))
    n_kinds, n_locs = len(DIAGNOSIS_KINDS), len(LOCATIONS)
    for row, code in enumerate(codes):
        kind, location, cls = parse_code(code)
        if not 0 <= cls < num_classes:
            raise ValueError(f"class {cls} of {code!r} is outside 0..{num_classes - 1}")
        out[row, DIAGNOSIS_KINDS.index(kind)] = 1.0
        out[row, n_kinds + LOCATIONS.index(location)] = 1.0
        out[row, n_kinds + n_locs + cls] = 1.0
    return out
