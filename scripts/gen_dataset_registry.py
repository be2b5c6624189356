#!/usr/bin/env python3
"""ms-swift's registered datasets, as data: src/data/ms_swift_datasets.jsonl.

Read from ms-swift's source (pinned: the commit below, ms-swift 4.6.0.dev0): its
swift/dataset/data/dataset_info.json, and the register_dataset(...) calls of
swift/dataset/dataset/llm.py and mllm.py. One line a dataset:

    {"ms": ModelScope id or null, "hf": Hugging Face id or null,
     "columns": {their name: ms-swift's} or null, "subsets": [...] or null,
     "split": [...] or null, "preprocessor": class name or null, "multimodal": bool}

swift-rs decides from these what it makes of each id (src/data/registry.rs).

    git clone https://github.com/modelscope/ms-swift /tmp/ms-swift
    git -C /tmp/ms-swift checkout 3602360a562313afbf2ef6065fdf61f271a2c5b9
    python3 scripts/gen_dataset_registry.py /tmp/ms-swift
"""
import json
import os
import re
import sys

COMMIT = "3602360a562313afbf2ef6065fdf61f271a2c5b9"
MEDIA = {"images", "videos", "audios"}

root = sys.argv[1]
entries = []
with open(os.path.join(root, "swift/dataset/data/dataset_info.json")) as f:
    for e in json.load(f):
        columns = e.get("columns")
        entries.append({
            "ms": e.get("ms_dataset_id"),
            "hf": e.get("hf_dataset_id"),
            "columns": columns,
            # Names only: a subset may also be {"subset": name, "columns": ...}.
            "subsets": e.get("subsets") and [
                s if isinstance(s, str) else s["subset"] for s in e["subsets"]
            ],
            "split": e.get("split"),
            "preprocessor": None,
            "multimodal": "multi-modal" in e.get("tags", []) or bool(MEDIA & set((columns or {}).values())),
        })

for name, multimodal in [("llm.py", False), ("mllm.py", True)]:
    with open(os.path.join(root, "swift/dataset/dataset", name)) as f:
        text = f.read()
    for block in text.split("register_dataset(")[1:]:
        block = block.split("\nclass ")[0].split("\ndef ")[0]
        ids = {key: re.search(key + r"_dataset_id='([^']+)'", block) for key in ("ms", "hf")}
        if not (ids["ms"] or ids["hf"]):
            continue
        pre = re.search(r"preprocess_func=(\w+)", block)
        entries.append({
            "ms": ids["ms"] and ids["ms"].group(1),
            "hf": ids["hf"] and ids["hf"].group(1),
            "columns": None,
            "subsets": [] if "subsets=" in block else None,
            "split": [] if "split=" in block else None,
            "preprocessor": pre and pre.group(1),
            "multimodal": multimodal,
        })

target = os.path.join(os.path.dirname(__file__), "..", "src", "data", "ms_swift_datasets.jsonl")
with open(target, "w") as out:
    for e in entries:
        out.write(json.dumps(e, ensure_ascii=False) + "\n")
print(f"{len(entries)} datasets from ms-swift {COMMIT[:10]}", file=sys.stderr)
