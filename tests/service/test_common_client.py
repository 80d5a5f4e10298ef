"""aar's one service client over real HTTP on a loopback port: the credential it sends, the
bodies it sends and parses, and every failure as one ServiceError with the status and the
service's own message."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import BaseModel

from aar_common.api import RunRegistration
from aar_common.client import ServiceClient, ServiceError
from aar_common.web import fail, json_errors_app, json_response, read_model

TIMEOUT = aiohttp.ClientTimeout(total=5)


class Echo(BaseModel):
    credential: str
    body: RunRegistration


async def echo(request: web.Request) -> web.Response:
    body = await read_model(request, RunRegistration)
    return json_response(Echo(credential=request.headers["Authorization"], body=body))


async def empty_task(_: web.Request) -> web.Response:
    return json_response({"task": ""})


async def quota_spent(_: web.Request) -> web.Response:
    fail(429, "agent a-0's quota is spent", headers={"retry-after": "30"})


async def proxy_failure(_: web.Request) -> web.Response:
    # Something between the client and the service answered, not in aar's shape.
    return web.Response(status=502, text="Bad Gateway from the ingress")


async def not_json(_: web.Request) -> web.Response:
    return web.Response(text="<html>a login page</html>", content_type="text/html")


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = json_errors_app()
    app.router.add_put("/echo", echo)
    app.router.add_get("/empty-task", empty_task)
    app.router.add_post("/quota", quota_spent)
    app.router.add_get("/proxy", proxy_failure)
    app.router.add_get("/page", not_json)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/"))


async def test_a_pydantic_body_goes_as_json_with_a_fresh_bearer_credential_each_call(
    base_url: str,
) -> None:
    counter = itertools.count()
    async with ServiceClient(
        "scorer", base_url, lambda: f"cred-{next(counter)}", timeout=TIMEOUT
    ) as scorer:
        body = RunRegistration(task="toy", review_required=False)
        first = await scorer.request("PUT", "/echo", json_body=body)
        second = await scorer.request("PUT", "/echo", json_body={"task": "toy"})
    assert first == {"credential": "Bearer cred-0", "body": body.model_dump()}
    assert second == {
        "credential": "Bearer cred-1",
        "body": RunRegistration(task="toy").model_dump(),
    }


async def test_an_error_answer_is_one_service_error_with_status_and_the_services_message(
    base_url: str,
) -> None:
    async with ServiceClient("scorer", base_url, "cred", timeout=TIMEOUT) as scorer:
        with pytest.raises(ServiceError) as refused:
            await scorer.request("POST", "/quota", json_body={})
        with pytest.raises(ServiceError) as invalid:
            await scorer.request("PUT", "/echo", json_body={"task": "toy", "extra": 1})
        with pytest.raises(ServiceError) as missing:
            await scorer.request("GET", "/nowhere")
    assert refused.value.status == 429
    assert refused.value.message == "agent a-0's quota is spent"
    assert str(refused.value) == "scorer answered 429 to POST /quota: agent a-0's quota is spent"
    assert invalid.value.status == 400
    assert invalid.value.message.startswith("invalid request body: extra: ")
    assert missing.value.status == 404  # aiohttp's own 404, in aar's shape by the middleware
    assert missing.value.message == "Not Found"


async def test_an_error_not_in_aars_shape_keeps_its_body_as_the_message(base_url: str) -> None:
    async with ServiceClient("gateway", base_url, "cred", timeout=TIMEOUT) as gateway:
        with pytest.raises(ServiceError) as failed:
            await gateway.request("GET", "/proxy")
    assert (failed.value.status, failed.value.message) == (502, "Bad Gateway from the ingress")


async def test_an_answer_that_is_not_the_expected_body_is_a_service_error(base_url: str) -> None:
    async with ServiceClient("scorer", base_url, "cred", timeout=TIMEOUT) as scorer:
        with pytest.raises(ServiceError) as page:
            await scorer.request("GET", "/page")
        with pytest.raises(ServiceError) as shape:
            await scorer.get("/empty-task", RunRegistration)
    assert page.value.status is None
    assert "not JSON" in str(page.value)
    assert shape.value.status is None
    assert "not a RunRegistration: task: String should have at least 1 character" in str(
        shape.value
    )


async def test_no_answer_or_no_url_is_a_service_error_without_a_status(
    unused_tcp_port: int,
) -> None:
    # Nothing listens on the port: the connection is refused.
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with ServiceClient("forum", url, "cred", timeout=TIMEOUT) as forum:
        with pytest.raises(ServiceError) as unreachable:
            await forum.request("GET", "/api/v1/posts")
    assert unreachable.value.status is None
    assert str(unreachable.value).startswith(f"could not reach the forum at {url}/api/v1/posts: ")
    unconfigured = ServiceClient(
        "forum", None, "cred", timeout=TIMEOUT, unconfigured="set AAR_FORUM_URL"
    )
    with pytest.raises(ServiceError) as no_url:
        await unconfigured.request("GET", "/api/v1/posts")
    assert (str(no_url.value), no_url.value.status) == ("set AAR_FORUM_URL", None)


async def test_a_borrowed_session_stays_open_for_its_owner(base_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        borrowing = ServiceClient("scorer", base_url, "cred", timeout=TIMEOUT, session=http)
        await borrowing.request("PUT", "/echo", json_body={"task": "toy"})
        await borrowing.close()
        assert not http.closed
        assert await borrowing.request("PUT", "/echo", json_body={"task": "toy"})
