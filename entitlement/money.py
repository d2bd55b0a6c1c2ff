"""Money in integer euro cents, and exact splits between funders."""

from __future__ import annotations

from collections.abc import Mapping

BASIS_POINTS = 10_000


def split_cents(total_cents: int, shares_bp: Mapping[str, int]) -> dict[str, int]:
    """Split `total_cents` by basis-point shares so the parts add up exactly to the total.

    Largest-remainder method: each funder gets the floor of its exact share, then the cents left
    over go one by one to the largest remainders (ties broken by funder id, so the split is
    deterministic and can be recomputed by a funder).
    """
    if total_cents < 0:
        raise ValueError("total_cents must not be negative")
    if sum(shares_bp.values()) != BASIS_POINTS or any(v < 0 for v in shares_bp.values()):
        raise ValueError("shares must be non-negative and sum to 10000 basis points")
    floors: dict[str, int] = {}
    remainders: list[tuple[int, str]] = []
    for funder in sorted(shares_bp):
        exact = total_cents * shares_bp[funder]
        floors[funder], rest = divmod(exact, BASIS_POINTS)
        remainders.append((rest, funder))
    left = total_cents - sum(floors.values())
    for _, funder in sorted(remainders, key=lambda r: (-r[0], r[1]))[:left]:
        floors[funder] += 1
    return floors


def format_eur(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    euros, rest = divmod(abs(cents), 100)
    return f"{sign}{euros:,}.{rest:02d} EUR".replace(",", " ")
