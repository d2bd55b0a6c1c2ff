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


def split_by_weights(total_cents: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Split `total_cents` in proportion to non-negative integer `weights` (not all zero), by the
    same largest-remainder rule as split_cents (ties by funder id). With `total_cents` at most the
    weights' sum, each part is at most its weight: closings split by what each funder has left
    never take more than that (entitlement/consumption.py `closing`)."""
    if total_cents < 0 or any(w < 0 for w in weights.values()):
        raise ValueError("total and weights must not be negative")
    whole = sum(weights.values())
    if whole == 0:
        raise ValueError("the weights must not all be zero")
    floors: dict[str, int] = {}
    remainders: list[tuple[int, str]] = []
    for funder in sorted(weights):
        floors[funder], rest = divmod(total_cents * weights[funder], whole)
        remainders.append((rest, funder))
    left = total_cents - sum(floors.values())
    for _, funder in sorted(remainders, key=lambda r: (-r[0], r[1]))[:left]:
        floors[funder] += 1
    return floors


def format_eur(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    euros, rest = divmod(abs(cents), 100)
    return f"{sign}{euros:,}.{rest:02d} EUR".replace(",", " ")
