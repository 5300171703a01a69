"""Sub-token shift: line each video frame's content up with the reference's token grid before the joint attention.

Snapped correspondence (``correspondence.snap``) gathers reference tokens a whole number of tokens away. Content
displaced by a fraction of a token then sits at another place inside the video token than inside the gathered
reference token: shifted by half a token (4 px of an 8-px token), the detail the reference offers lands between two
tokens, and the trained decoders gain nothing from it (the shift probe in pixels, docs/architecture.md
"Correspondence"). The reference is shared by every frame, so it cannot be moved frame by frame without decoding it
once per frame; the video can. With ``correspondence.sub_token_shift`` each video frame's stage features are
moved by the part of the displacement that snapping dropped, in whole cells of the stage (a token of ``ph x pw``
cells moves by up to half of it; tokens of one cell never move), so they show, inside every token, what the
gathered reference token shows there; the joint attention runs on those, and its update to the video is moved back
onto the frame's own grid. Cells are copied, not interpolated; the skip path is never moved, so a remainder under
half a cell leaves the stage exactly as without.

Layouts: features ``B, C, T, H, W`` (stage cells), shifts ``B, 2, T, H, W`` float ``(dy, dx)`` in stage cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["remainder_in_cells", "shift_features"]


def remainder_in_cells(remainder: torch.Tensor, patch: tuple[int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """A token grid's sub-token remainders ``B, 2, T, h, w`` (tokens) as a whole-cell shift per stage cell
    ``B, 2, T, H, W``.

    Every cell of a token takes its token's value in cells (``dy * ph``, ``dx * pw``), rounded to whole cells, so
    each token's content moves as one piece, as its reference token was gathered, and is copied, not interpolated:
    a bilinear move by a fraction of a cell blurs the features (and the update coming back), which the trained
    decoder paid for in place, where the estimate's small sub-cell noise moved every frame. A stage whose tokens are
    one cell (``ph = pw = 1``) never moves. ``size`` is ``(H, W)``, the grid the tokens were made from (the last row
    and column of tokens may be partial).
    """
    _, ph, pw = patch
    cells = remainder * torch.tensor([ph, pw], device=remainder.device, dtype=remainder.dtype).reshape(1, 2, 1, 1, 1)
    cells = cells.round().repeat_interleave(ph, dim=3).repeat_interleave(pw, dim=4)
    return cells[..., : size[0], : size[1]]


def shift_features(x: torch.Tensor, shift: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` so that cell ``(y, x)`` of frame ``t`` shows what ``x`` has at ``(y, x) + shift[:, :, t, y, x]``.

    Args:
        x: ``B, C, T, H, W`` features.
        shift: ``B, 2, T, H, W`` ``(dy, dx)`` in cells; fractional values interpolate bilinearly (whole ones copy the
            cell there), positions beyond the grid take its border.
        mode: ``"bilinear"``, or ``"nearest"`` for whole-cell shifts (an exact copy, float rounding aside).

    Returns:
        ``B, C, T, H, W`` in ``x``'s dtype (a zero shift returns each cell to float rounding).
    """
    b, c, t, h, w = x.shape
    rows = torch.arange(h, device=x.device, dtype=torch.float32).reshape(1, 1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=torch.float32).reshape(1, 1, 1, w)
    shift = shift.float()
    # grid_sample's normalised coordinates (align_corners=False): cell i's centre is (2 i + 1) / size - 1.
    y = (2 * (rows + shift[:, 0]) + 1) / h - 1  # B, T, H, W
    xs = (2 * (cols + shift[:, 1]) + 1) / w - 1
    grid = torch.stack([xs, y], dim=-1).flatten(0, 1)  # B*T, H, W, 2 as (x, y)
    frames = x.transpose(1, 2).flatten(0, 1)  # B*T, C, H, W
    out = F.grid_sample(frames.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.to(x.dtype).reshape(b, t, c, h, w).transpose(1, 2)
