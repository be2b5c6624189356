#!/usr/bin/env python3
"""`swift-rs deploy` under 1, 4 and 16 concurrent streaming clients, beside transformers'
`generate` on the same model at the same batch sizes (what ms-swift's `swift deploy
--infer_backend pt` runs: one static batch, no rows joining or leaving), in one run.

Pinned: torch==2.15.0 transformers==5.23.0 (as scripts/bench_vs_peft.py, whose model this uses:
the 30M Qwen2 shape with random weights, the fixture tokenizer and chat template, the stop tokens'
lm_head rows zeroed so that every reply runs its full length).

    cargo build --release
    python scripts/bench_serve.py                       # CPU, 2 threads, f32, 128 new tokens
    python scripts/bench_serve.py --device cuda --dtype bf16 --shape 1.5b --streams 1,4,16,64
    python scripts/bench_serve.py --adapters 3          # also: clients spread over base + 3 LoRAs

swift-rs: the release binary serves the model (`--max_batch_size` the largest stream count); each
client sends one chat request (its own prompt, greedy, `ignore_eos`, `max_tokens` N, streamed with
`include_usage`) and all start together. Three numbers a level:
- output tokens/s: all clients' completion tokens over the time from the first send to the last
  `[DONE]` (vLLM's "output token throughput": prefills included);
- decode tokens/s: the sum over clients of (tokens after the first) / (time after the first
  token), each stream's decode speed added up;
- time to first token: from a client's send to its first content chunk (the median client).
Each level runs once as a warm-up, then --repeat times; the medians count. The clients run on the
same machine as the server and take some of its CPU.

transformers: `generate` over the same prompts as one left-padded batch (greedy, `min_new_tokens`
= `max_new_tokens` = N, KV cache, SDPA); the first new token reaching a streamer marks the time to
first token, output tokens/s is batch x N over the whole call, and decode tokens/s batch x (N - 1)
over the time after the first token. Each side runs in a process of its own.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_vs_peft import PROMPT, make_model  # noqa: E402


def prompts(n: int) -> list[str]:
    return [f"{PROMPT} (Question {i + 1}.)" for i in range(n)]


# ---- swift-rs: clients of a running server ----

def client(port: int, model: str, prompt: str, new_tokens: int, start: threading.Barrier, out: list,
           i: int):
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start.wait()
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    first, tokens = None, None
    for line in response:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif first is None:
            first = time.perf_counter()
    out[i] = (sent, first, time.perf_counter(), tokens)
    conn.close()


def swift_level(port: int, streams: int, new_tokens: int, models: list[str]) -> tuple[float, float, float]:
    """(output tokens/s, decode tokens/s, median time to first token in s) of `streams` clients
    at once, client i on `models[i % len(models)]`."""
    out = [None] * streams
    barrier = threading.Barrier(streams)
    threads = [threading.Thread(target=client,
                                args=(port, models[i % len(models)], p, new_tokens, barrier, out, i))
               for i, p in enumerate(prompts(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o and o[3] == new_tokens for o in out), out
    begin = min(o[0] for o in out)
    end = max(o[2] for o in out)
    decode = sum((o[3] - 1) / (o[2] - o[1]) for o in out)
    return sum(o[3] for o in out) / (end - begin), decode, statistics.median(o[1] - o[0] for o in out)


def swift_side(args, model: Path, levels: list[int], adapters: list[Path], label: str) -> dict:
    """Clients spread over the base and `adapters` (served as lora0, lora1, ...)."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = [args.binary, "deploy", "--model", str(model), "--served_model_name", "model",
           "--device", args.device, "--dtype", args.dtype, "--port", "0",
           "--max_batch_size", str(max(levels)), "--max_model_len", "4096"]
    models = ["model"] + [f"lora{k}" for k in range(len(adapters))]
    if adapters:
        cmd += ["--adapters", *[f"lora{k}={a}" for k, a in enumerate(adapters)]]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in server.stderr:
            if " on http://" in line:
                port = int(line.split(" on http://")[1].split("/")[0].split(":")[1])
                break
        assert port, "the server did not start"
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        results = {}
        for streams in levels:
            swift_level(port, streams, args.new_tokens, models)  # warm-up
            runs = [swift_level(port, streams, args.new_tokens, models) for _ in range(args.repeat)]
            results[streams] = medians(runs)
            report(label, streams, results[streams], runs)
        return results
    finally:
        server.terminate()
        server.wait()


# ---- transformers: generate at the same batch sizes (a process of its own) ----

def torch_side(model: str, levels: str, new_tokens: str, threads: str, device: str, dtype: str,
               repeat: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer
    torch.set_num_threads(int(threads))
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dt, attn_implementation="sdpa",
                                              device_map=device).eval()
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    n = int(new_tokens)

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the prompt comes first, then each new token
                if device == "cuda":
                    torch.cuda.synchronize()
                self.first = time.perf_counter()

        def end(self):
            pass

    def level(streams: int) -> tuple[float, float, float]:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in prompts(streams)]
        batch = tok(texts, return_tensors="pt", padding=True).to(lm.device)
        streamer = FirstToken()
        start = time.perf_counter()
        with torch.no_grad():
            out = lm.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, streamer=streamer)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        assert out.shape[1] - batch["input_ids"].shape[1] == n
        first = streamer.first - start
        return streams * n / elapsed, streams * (n - 1) / (elapsed - first), first

    results = {}
    for streams in map(int, levels.split(",")):
        level(streams)  # warm-up
        runs = [level(streams) for _ in range(int(repeat))]
        results[streams] = medians(runs)
        report("transformers", streams, results[streams], runs, file=sys.stderr)
    print(json.dumps(results))


def make_adapters(model: Path, n: int, tmp: Path) -> list[Path]:
    """`n` PEFT adapters on `model`: r 16 on every linear layer, A and B random (B not zero, so
    each one changes the replies)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out = []
    for k in range(n):
        torch.manual_seed(100 + k)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(tmp / f"lora{k}")
        out.append(tmp / f"lora{k}")
    return out


def medians(runs: list[tuple]) -> tuple:
    return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))


def report(side: str, streams: int, result: tuple, runs: list[tuple], file=sys.stdout) -> None:
    print(f"  {side} {streams:>3} streams: output {result[0]:7.1f} tokens/s, decode {result[1]:7.1f} "
          f"tokens/s, first token {result[2] * 1e3:7.1f} ms (output rounds "
          f"{', '.join(f'{r[0]:.1f}' for r in runs)})", file=file, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/release/swift-rs"))
    ap.add_argument("--shape", default="30m")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=0,
                    help="also run swift-rs with the clients spread over the base and N random "
                         "adapters (r 16, all-linear) in one batch")
    ap.add_argument("--torch-side", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_side:
        torch_side(*args.torch_side)
        return
    levels = [int(s) for s in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.shape, args.vocab, Path(tmp))
        print(f"{args.device}, {args.threads} threads, {args.dtype}, {args.new_tokens} new tokens a stream")
        swift = swift_side(args, model, levels, [], "swift-rs")
        mixed = None
        if args.adapters:
            adapters = make_adapters(model, args.adapters, Path(tmp))
            mixed = swift_side(args, model, levels, adapters, f"swift-rs, {args.adapters} adapters")
        torch_out = subprocess.run(
            [sys.executable, __file__, "--torch-side", str(model), args.streams, str(args.new_tokens),
             str(args.threads), args.device, args.dtype, str(args.repeat)],
            check=True, stdout=subprocess.PIPE, text=True).stdout
        torch = {int(k): v for k, v in json.loads(torch_out).items()}
    table(levels, torch, swift, "transformers / swift-rs")
    for s in levels[1:]:
        print(f"swift-rs at {s} streams against {levels[0]}: output {swift[s][0] / swift[levels[0]][0]:.2f}x, "
              f"decode {swift[s][1] / swift[levels[0]][1]:.2f}x")
    if mixed:
        table(levels, swift, mixed, f"swift-rs base only / base + {args.adapters} adapters")


def table(levels: list[int], before: dict, after: dict, sides: str) -> None:
    """A markdown row a level: output and decode tokens/s and first token, before / after, with
    after's ratio to before."""
    print(f"\n| streams | output tokens/s<br>{sides} | ratio | decode tokens/s<br>{sides} | ratio | "
          f"first token<br>{sides} |")
    print("|---|---|---|---|---|---|")
    for s in levels:
        b, a = before[s], after[s]
        print(f"| {s} | {b[0]:.1f} / {a[0]:.1f} | {a[0] / b[0]:.2f}x | {b[1]:.1f} / {a[1]:.1f} | "
              f"{a[1] / b[1]:.2f}x | {b[2] * 1e3:.0f} / {a[2] * 1e3:.0f} ms |")

if __name__ == "__main__":
    main()
