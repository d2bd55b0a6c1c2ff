"""AIP-158 keyset pagination of ListActivations while activations keep being created."""

from __future__ import annotations

import datetime as dt
from collections import Counter

from support import Api

from entitlement.v1 import audit_pb2


def _names(api: Api, caller: str, **filters: object) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page = api.as_(caller).ListActivations(audit_pb2.ListActivationsRequest(page_size=500, page_token=token,
                                                                               **filters))
        names += [a.name for a in page.activations]
        token = page.next_page_token
        if not token:
            return names


def test_no_item_lost_or_repeated_while_activations_are_created_between_pages(api: Api) -> None:
    for _ in range(12):
        api.activate()
    filters = {"program": "programs/premium-job-seekers"}
    before = set(_names(api, "admin", **filters))
    seen: list[str] = []
    created: set[str] = set()
    token = ""
    while True:
        page = api.admin.ListActivations(audit_pb2.ListActivationsRequest(page_size=5, page_token=token, **filters))
        seen += [a.name for a in page.activations]
        # Two new activations land between every two pages; with the test clock fixed they share
        # create_time with the others, so the keyset's id tie-break is exercised too.
        created |= {api.activate().activation.name for _ in range(2)}
        token = page.next_page_token
        if not token:
            break
    repeated = [n for n, k in Counter(seen).items() if k > 1]
    assert not repeated
    assert before <= set(seen), f"lost: {sorted(before - set(seen))[:5]}"
    assert set(seen) <= before | created


def test_a_funder_pages_only_through_what_it_funds(api: Api) -> None:
    api.activate()
    mine = _names(api, "funder-ministry")
    everything = _names(api, "admin")
    assert mine and set(mine) <= set(everything)
    assert set(_names(api, "funder-idf")).isdisjoint(_names(api, "admin", program="programs/premium-job-seekers"))


def test_a_programs_listing_goes_on_across_midnight(api: Api) -> None:
    """ListPrograms without `as_of` shows today's parameters; its page token was bound to the day
    resolved, so the next page asked for after midnight was INVALID_ARGUMENT. The token now carries
    its listing's day: every page shows that day."""
    from entitlement.v1 import eligibility_pb2
    clock = api.h.clock
    first = api.advisor.ListPrograms(eligibility_pb2.ListProgramsRequest(page_size=1))
    assert first.next_page_token
    names = [p.name for p in first.programs]
    token = first.next_page_token
    before = clock.now()
    clock.advance(dt.timedelta(days=1))  # midnight passes between two pages
    try:
        while token:
            page = api.advisor.ListPrograms(eligibility_pb2.ListProgramsRequest(page_size=1, page_token=token))
            names += [p.name for p in page.programs]
            token = page.next_page_token
    finally:
        clock.advance(before - clock.now())
    everything = api.advisor.ListPrograms(eligibility_pb2.ListProgramsRequest(page_size=200))
    assert names == [p.name for p in everything.programs]
