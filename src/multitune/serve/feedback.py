"""``POST /v1/feedback``: ground truth for an answer the server gave, by the answer's ``id``.

Every ``/v1/classify`` row and every completion or chat answer carries an ``id`` (a completion's OpenAI id is
reused) and is recorded in the server's :class:`~multitune.health.store.FeedbackStore` with its prediction.
A client later sends what the answer should have been:

- classification: ``{"id": ..., "label": ...}``, one of the task's labels (else 400 listing them);
- generation: ``{"id": ..., "rating": 0..1, "correction": "..."}``, either or both (a bad rating is a 400
  naming the field).

An id the store does not hold (never served, or past ``--request-retention``) is a 404. Feedback for an id that
already has some replaces it: the later wins, and the answer is counted once in the task's live accuracy. The
200 comes after the feedback is committed, so a restart loses nothing acknowledged. The API key guards this
route as every ``/v1`` route (:class:`~multitune.serve.guard.Guard`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from multitune.health.store import FeedbackError
from multitune.serve.decode import RequestError
from multitune.serve.openai import check_body, error_response

router = APIRouter()


class FeedbackRequest(BaseModel):
    """The body of ``POST /v1/feedback``; values are checked by the store, against the answer's own kind."""

    model_config = ConfigDict(extra="ignore")  # as every body: clients may send fields of their own

    id: str = Field(min_length=1, description="the id of the answer (a /v1/classify row's, a completion's)")
    label: Any = Field(None, description="classification: the right label, one of the task's")
    rating: Any = Field(None, description="generation: how good the answer was, from 0 (bad) to 1 (good)")
    correction: Any = Field(None, description="generation: the answer it should have been")


@router.post("/v1/feedback", summary="Record the right answer for a served answer, by its id")
async def feedback(body: FeedbackRequest, request: Request) -> Response:
    served = request.app.state.served
    store = getattr(served, "store", None)
    if store is None:
        raise RequestError(
            404, "this server keeps no feedback store (it was started without one); feedback is not recorded"
        )
    check_body(body, served.max_input_chars)
    try:  # the commit blocks: off the event loop
        answer = await asyncio.to_thread(store.feedback, body.id, body.label, body.rating, body.correction)
    except FeedbackError as error:
        return error_response(error.status, " ".join(str(error).split()), error.field)
    info = request.scope.get("multitune")
    if info is not None:  # the metrics middleware counts the request under its task
        info["task"] = answer["task"]
    return JSONResponse({"object": "feedback", "id": body.id, "model": answer["task"], "recorded": True})
