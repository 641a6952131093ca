"""The catalog's LLM models as each family's own models list."""

from __future__ import annotations

from app.core.catalog import Model

# The catalog has no release dates; a fixed, plainly placeholder time keeps the lists stable.
EPOCH = 0
EPOCH_ISO = "1970-01-01T00:00:00Z"


def openai_model(model: Model) -> dict:
    return {"id": model.name, "object": "model", "created": EPOCH, "owned_by": model.provider.name}


def openai(models: list[Model]) -> dict:
    return {"object": "list", "data": [openai_model(m) for m in models]}


def anthropic_model(model: Model) -> dict:
    return {"type": "model", "id": model.name, "display_name": model.description or model.name,
            "created_at": EPOCH_ISO, "lifecycle": "active", "max_tokens": model.max_output_tokens}


def gemini_model(model: Model) -> dict:
    return {"name": f"models/{model.name}", "baseModelId": model.name, "version": "001", "displayName": model.name,
            "description": model.description, "outputTokenLimit": model.max_output_tokens,
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent"]}


def anthropic(models: list[Model], *, limit: int = 20, after_id: str | None = None,
              before_id: str | None = None) -> dict:
    """Anthropic's paged list (`data`, `has_more`, `first_id`, `last_id`)."""
    ids = [m.name for m in models]
    start, end = 0, len(models)
    if after_id in ids:
        start = ids.index(after_id) + 1
    if before_id in ids:
        end = ids.index(before_id)
        start = max(start, end - limit) if after_id is None else start
    page = models[start:min(end, start + limit)]
    data = [anthropic_model(m) for m in page]
    more = start + len(page) < end if before_id is None else start > 0
    return {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def gemini(models: list[Model], *, page_size: int = 50, start: int = 0) -> dict:
    """Gemini's list (`models`, `nextPageToken`); `start` is the page token: the index to start at."""
    page = models[start:start + page_size]
    body: dict = {"models": [gemini_model(m) for m in page]}
    if start + page_size < len(models):
        body["nextPageToken"] = str(start + page_size)
    return body
