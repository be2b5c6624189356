#!/usr/bin/env python3
"""Drives a running `swift-rs deploy` with the official `openai` Python client (pinned below), as
users' code talks to it: the model list, chat and text completions, streamed and whole, with
usage, stop strings, n, seeds and log probabilities, and the client's own error classes for a bad
key, an unknown model and a prompt past the context. Not run by CI (no Python there); run it by
hand after changing the server.

    pip install openai==3.57.0
    swift-rs deploy --model tests/fixtures/models/qwen2_chat --dtype f32 --device cpu \\
        --adapters lora=tests/fixtures/adapters/qwen2_rslora --api_key sk-check --max_model_len 120 &
    python scripts/openai_client_check.py --base-url http://127.0.0.1:8000/v1 --api-key sk-check

Prints one line a check and exits 1 at the first that fails.
"""

import argparse
import sys

import openai

PINNED = "3.57.0"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="sk-check")
    args = parser.parse_args()
    if openai.__version__ != PINNED:
        print(f"note: openai {openai.__version__}, checked with {PINNED}")
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)

    def check(name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            sys.exit(1)

    models = [m.id for m in client.models.list().data]
    check("models.list", len(models) >= 1, models)
    base = models[0]
    messages = [{"role": "user", "content": "Who are you?"}]

    whole = client.chat.completions.create(
        model=base, messages=messages, max_tokens=16, temperature=0
    )
    text = whole.choices[0].message.content
    check("chat whole", whole.choices[0].finish_reason in ("stop", "length"), repr(text))
    check("usage", whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0)

    stream = client.chat.completions.create(
        model=base,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    check("chat streamed equals whole", "".join(pieces) == text, repr("".join(pieces)))
    check("streamed usage", usage is not None and usage.completion_tokens == whole.usage.completion_tokens)
    check("streamed finish", finish == whole.choices[0].finish_reason, finish)

    for adapter in models[1:]:
        reply = client.chat.completions.create(
            model=adapter, messages=messages, max_tokens=16, temperature=0
        )
        check(f"adapter {adapter}", reply.model == adapter, repr(reply.choices[0].message.content))

    if len(text) > 4:
        stop = text[2:4]
        cut = client.chat.completions.create(
            model=base, messages=messages, max_tokens=16, temperature=0, stop=[stop]
        )
        check("stop string", cut.choices[0].message.content == text[: text.find(stop)]
              and cut.choices[0].finish_reason == "stop", repr(cut.choices[0].message.content))

    seeded = [
        client.chat.completions.create(
            model=base, messages=messages, max_tokens=8, temperature=1.0, n=2, seed=11
        )
        for _ in range(2)
    ]
    check("n and seed", [c.message.content for c in seeded[0].choices]
          == [c.message.content for c in seeded[1].choices] and len(seeded[0].choices) == 2)

    lp = client.chat.completions.create(
        model=base, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = lp.choices[0].logprobs.content
    check("logprobs", len(content) == lp.usage.completion_tokens
          and all(len(t.top_logprobs) == 2 for t in content))

    completion = client.completions.create(model=base, prompt="Hello", max_tokens=8, temperature=0)
    check("completions", completion.choices[0].finish_reason in ("stop", "length"),
          repr(completion.choices[0].text))

    try:
        openai.OpenAI(base_url=args.base_url, api_key="sk-wrong").models.list()
        check("bad key", False)
    except openai.AuthenticationError as e:
        check("bad key is AuthenticationError", e.status_code == 401)
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
        check("unknown model", False)
    except openai.NotFoundError as e:
        check("unknown model is NotFoundError", e.status_code == 404)
    try:
        client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4
        )
        check("long prompt", False)
    except openai.BadRequestError as e:
        check("long prompt is BadRequestError", "maximum context length" in str(e))
    print("all checks passed")


if __name__ == "__main__":
    main()
