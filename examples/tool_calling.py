"""Offer a tool, run the call the model makes, and hand the result back for the final answer."""

import json

from llamacompat import init_llama

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]


def get_weather(city: str) -> dict:
    return {"city": city, "temperature_c": 18, "sky": "clear"}  # a real app would call a weather service


with init_llama({"model": "smollm2", "n_ctx": 2048}) as ctx:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # tool_choice "required" makes the grammar force a call; "auto" lets the model decide
    result = ctx.completion({"messages": messages, "tools": TOOLS, "tool_choice": "required",
                             "n_predict": 64, "temperature": 0})
    calls = result["tool_calls"]
    print("the model called:", [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    messages.append({"role": "assistant", "content": result.get("content", ""), "tool_calls": calls})
    for call in calls:
        answer = get_weather(**json.loads(call["function"]["arguments"]))
        messages.append({"role": "tool", "tool_call_id": call["id"] or "0", "content": json.dumps(answer)})
    final = ctx.completion({"messages": messages, "tools": TOOLS, "n_predict": 48, "temperature": 0})
    print("answer:", final.get("content", final["text"]))
