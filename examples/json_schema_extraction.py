"""Extract structured data: the JSON schema becomes a grammar, so the output always parses and validates."""

import json

from llamacompat import init_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,  # without it the grammar lets the model add fields
}

with init_llama({"model": "smollm2", "n_ctx": 2048}) as ctx:
    text = "Maria is 34 years old and lives in Lisbon, where she teaches music."
    result = ctx.completion({
        "messages": [{"role": "user", "content": f"Extract the person as JSON: {text}"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        "n_predict": 96, "temperature": 0,
    })
    person = json.loads(result["text"])
    print(person)
    assert set(person) == {"name", "age", "city"} and isinstance(person["age"], int)
