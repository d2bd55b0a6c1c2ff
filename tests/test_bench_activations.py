"""bench.activations' fill and its storage figures (`python -m bench.activations`), at a small size,
on both backends: the rows it says it wrote are there, and the sizes it reports are the ledger's."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from bench import activations
from entitlement.storage.db import normalize_url
from entitlement.storage.migrate import upgrade
from entitlement.storage.models import Activation, LedgerEntry, ReportMonth


def test_fill_writes_what_it_counts_and_sizes_the_ledger(
        backend: tuple[str, str], fresh_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activations, "N", 300)
    upgrade(fresh_url)
    name = backend[0]
    path = Path(fresh_url.removeprefix("sqlite:///")) if name == "sqlite" else None
    data = activations.fill(name, fresh_url, path)

    engine = create_engine(normalize_url(fresh_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Activation)).scalar_one() == data.activations == 300
            assert conn.execute(select(func.count()).select_from(LedgerEntry)).scalar_one() == data.ledger
            assert data.ledger > data.activations  # a commit per funder at least, consumptions besides
            assert conn.execute(select(func.count()).select_from(ReportMonth)).scalar_one() > 0  # rolled up
        sizes = data.sizes
        assert 0 < sizes["ledger_indexes"] < sizes["ledger"] < sizes["database"]
        assert activations.storage_sizes(name, fresh_url, path) == sizes  # nothing written since

        # The index figure is the ledger's indexes: one dropped, its pages leave that figure and the
        # ledger's, by as much.
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_ledger_activation"))
        after = activations.storage_sizes(name, fresh_url, path)
        freed = sizes["ledger_indexes"] - after["ledger_indexes"]
        assert freed > 0
        assert sizes["ledger"] - after["ledger"] == freed
    finally:
        engine.dispose()


def test_the_table_has_a_cell_for_every_column() -> None:
    run = activations.Run("sqlite", activations.Data(300, 900, 1.0, 0.5, 10, {
        "database": 5_000_000, "ledger": 2_000_000, "ledger_indexes": 1_000_000}))
    lines = activations.markdown([run]).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| backend |"))
    widths = {len(lines[i].strip("|").split("|")) for i in (header, header + 1, header + 2)}
    assert widths == {17}
    assert "| 5 | 2 | 1 |" in lines[header + 2]  # database, ledger and its indexes, in MB
