"""JSON schemas of the request bodies, built from the settings registry and the protocol's own
request fields: what the server's OpenAPI document publishes (and fuzzers generate from)."""

from __future__ import annotations

from typing import Any

from aigc_cli.core.settings import REGISTRY, Decoding, Setting
from aigc_cli.protocol.completions import FIELDS


def setting_schema(setting: Setting) -> dict[str, Any]:
    """A generation setting as JSON schema: its type, bounds, default (the API's) and help."""
    kind = setting.kind
    schema: dict[str, Any]
    if kind in ("int", "float"):
        schema = {"type": ["integer" if kind == "int" else "number", "null"]}
        if setting.low is not None:
            schema["exclusiveMinimum" if setting.low_open else "minimum"] = setting.low
        if setting.high is not None:
            schema["exclusiveMaximum" if setting.high_open else "maximum"] = setting.high
    elif kind == "bool":
        schema = {"type": ["boolean", "null"]}
    elif kind == "choice":
        schema = {"type": ["string", "null"], "enum": [d.value for d in Decoding] + [None]}
    elif kind == "texts":
        item: dict[str, Any] = {"type": "string", "minLength": 1}
        if setting.max_chars:
            item["maxLength"] = setting.max_chars
        array: dict[str, Any] = {"type": "array", "items": item}
        if setting.max_items:
            array["maxItems"] = setting.max_items
        schema = {"anyOf": [item, array, {"type": "null"}]}
    else:  # ids
        schema = {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}
        if setting.max_items:
            schema["maxItems"] = setting.max_items
    default = setting.default_for("api")
    if default is not None and kind not in ("texts", "ids"):
        schema["default"] = default.value if isinstance(default, Decoding) else default
    schema["description"] = setting.help
    return schema


def completion_schema() -> dict[str, Any]:
    """The /v1/completions request body."""
    properties: dict[str, Any] = {f.name: {**f.schema, "description": f.help} for f in FIELDS}
    for setting in REGISTRY:
        if setting.param:
            properties[setting.param] = setting_schema(setting)
    if "max_tokens" in properties:  # 0 is allowed with echo (the prompt's log-probabilities only)
        properties["max_tokens"]["minimum"] = 0
    return {"type": "object", "properties": properties, "required": ["model", "prompt"], "additionalProperties": False}


def chat_schema() -> dict[str, Any]:
    """The /v1/chat/completions request body (with the server's --chat-template)."""
    body = completion_schema()
    properties = {k: v for k, v in body["properties"].items() if k not in ("prompt", "echo", "logprobs", "suffix", "best_of")}
    properties["messages"] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            "required": ["role", "content"],
        },
        "description": "The conversation, rendered into a prompt by the server's chat template.",
    }
    properties["max_completion_tokens"] = {"type": ["integer", "null"], "minimum": 1, "description": "As max_tokens."}
    properties["logprobs"] = {"type": ["boolean", "null"], "enum": [False, None], "description": "Not supported (use /v1/completions)."}
    properties["parallel_tool_calls"] = {"type": ["boolean", "null"], "description": "Accepted; there are no tools."}
    for name in ("top_logprobs", "tools", "tool_choice", "response_format"):
        properties[name] = {"type": "null", "description": "Not supported."}
    return {"type": "object", "properties": properties, "required": ["model", "messages"], "additionalProperties": False}


def tokenize_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "add_special_tokens": {"type": "boolean"},
            "return_token_strs": {"type": "boolean"},
        },
        "required": ["prompt"],
        "additionalProperties": False,
    }


def detokenize_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
        "required": ["tokens"],
        "additionalProperties": False,
    }


def body(schema_name: str) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON request body, by component name."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
        }
    }


COMPONENTS = {
    "CompletionRequest": completion_schema,
    "ChatCompletionRequest": chat_schema,
    "TokenizeRequest": tokenize_schema,
    "DetokenizeRequest": detokenize_schema,
}
