"""Stream a chat answer token by token, then print the timings."""

from llamacompat import init_llama

with init_llama({"model": "smollm2", "n_ctx": 2048}) as ctx:
    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name the capital of France and one thing it is famous for."},
    ]
    result = ctx.completion({"messages": messages, "n_predict": 64, "temperature": 0},
                            lambda event: print(event["token"], end="", flush=True))
    print()
    timings = result["timings"]
    print(f"{result['tokens_predicted']} tokens at {timings['predicted_per_second']:.1f} tokens/s")
