"""The operator's side of the gateway: register a run's budget, read its spend."""

from __future__ import annotations

import re
import time

from aiohttp import web

from aar_common import api
from aar_common.web import authenticate, fail, json_response, read_model, whole_number
from aar_gateway.pricing import PricingError, nano_to_usd, usd_text, usd_to_nano
from aar_gateway.proxy import Proxy
from aar_gateway.store import RUN_ROW, Budget, Totals

PROXY_KEY = web.AppKey("proxy", Proxy)

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a Kubernetes object name


def _totals(totals: Totals, exhausted: bool) -> api.Totals:
    return api.Totals(
        usd=nano_to_usd(totals.cost_nano),
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        cache_creation_input_tokens=totals.cache_creation_input_tokens,
        cache_read_input_tokens=totals.cache_read_input_tokens,
        requests=totals.requests,
        exhausted=exhausted,
    )


def _cap(nano: int | None) -> str | None:
    return None if nano is None else usd_text(nano)


def _run_of(request: web.Request) -> str:
    namespace, run = request.match_info["namespace"], request.match_info["run"]
    for what, value in (("namespace", namespace), ("run", run)):
        if not _NAME.match(value):
            fail(400, f"{what} {value!r} is not a Kubernetes object name")
    return f"{namespace}/{run}"


async def put_budget(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    run = _run_of(request)
    spec = await read_model(request, api.BudgetSpec)
    budget = Budget(
        cap_nano=None if spec.usd is None else usd_to_nano(spec.usd),
        agents={a: None if cap is None else usd_to_nano(cap) for a, cap in spec.agents.items()},
    )
    proxy = request.app[PROXY_KEY]
    await proxy.store.set_budget(run, budget)
    proxy.budget_set(run)
    return json_response(
        {
            "run": run,
            "usd": _cap(budget.cap_nano),
            "agents": {agent: _cap(cap) for agent, cap in budget.agents.items()},
        }
    )


async def get_spend(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    run = _run_of(request)
    proxy = request.app[PROXY_KEY]
    store = proxy.store
    await store.flush()  # what the operator reads is on disk
    if run not in store.budgets and (run, RUN_ROW) not in store.totals:
        fail(404, f"the gateway knows no run {run}: no budget registered and nothing spent")
    # An agent refused before it spent anything is listed too, with nothing spent.
    spent_by_agent = {
        **{row: Totals() for r, row in proxy.exhausted if r == run and row != RUN_ROW},
        **store.agents_of(run),
    }
    return json_response(
        api.RunSpend(
            run=_totals(store.spent(run), (run, RUN_ROW) in proxy.exhausted),
            agents={
                agent: _totals(t, (run, agent) in proxy.exhausted)
                for agent, t in sorted(spent_by_agent.items())
            },
        )
    )


async def get_spend_history(request: web.Request) -> web.Response:
    """The run's spend over time, for the console's chart (admins)."""
    authenticate(request, admin=True)
    run = _run_of(request)
    points = whole_number(
        request.query.get("points", str(api.HISTORY_POINTS)), "points", 1, api.MAX_HISTORY_POINTS
    )
    store = request.app[PROXY_KEY].store
    await store.flush()
    history = await store.spend_history(run, time.time(), points)
    if history is None:
        fail(404, f"the gateway has no request of run {run} yet")
    return json_response(history)


async def get_model(request: web.Request) -> web.Response:
    """Whether runs may use a model: the operator asks before it starts a run's Pods."""
    authenticate(request, admin=True)
    model = request.match_info["model"]
    prices = request.app[PROXY_KEY].prices
    try:
        prices.price(model)
    except PricingError as error:
        fail(404, f"{error}. The gateway prices: {', '.join(sorted(prices.models))}")
    name = prices.aliases.get(model, model)
    priced_as = name if name in prices.models else "default"
    return json_response(
        api.ModelPrice(model=model, priced_as=priced_as, price_table=prices.version)
    )
