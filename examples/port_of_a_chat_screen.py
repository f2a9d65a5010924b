"""MIGRATION.md's worked port of a llama.rn chat screen, run on the packaged model."""

from llamacompat import ContextBusyError, init_llama

context = init_llama({"model": "smollm2", "n_ctx": 2048})  # or "file:///models/smollm2.gguf"
messages = [{"role": "system", "content": "You are brief."}]


def ask(question, on_token):
    messages.append({"role": "user", "content": question})
    try:
        result = context.completion(
            {"messages": messages, "n_predict": 128, "temperature": 0.7, "stop": ["</s>"]},
            lambda data: on_token(data["token"]),
        )
    except ContextBusyError:  # was: e.message === 'Context is busy'
        return None
    messages.append({"role": "assistant", "content": result.get("content", result["text"])})
    return result["timings"]["predicted_per_second"]


def stop():
    context.stop_completion()


def save():
    return context.save_session("/tmp/chat.session")


if __name__ == "__main__":
    speed = ask("Name the capital of France.", lambda token: print(token, end="", flush=True))
    print(f"\n{speed:.1f} tokens/s; saved {save()} tokens")
    context.release()
