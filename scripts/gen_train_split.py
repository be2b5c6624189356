#!/usr/bin/env python3
"""The train split that the `datasets` library picks from a repo's files (what ms-swift reads of a
dataset by hub id), for the layouts below: tests/fixtures/train_split.json.

Pinned: datasets==3.6.0

    python3 -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install datasets==3.6.0
    /tmp/dsvenv/bin/python scripts/gen_train_split.py

"train" is null where `datasets` finds splits but no train split.
"""
import json
import os
import tempfile

from datasets.data_files import DataFilesDict, get_data_patterns

LAYOUTS = [
    ["train.jsonl", "test.jsonl"],
    ["alpaca_gpt4_data_zh.json"],
    ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
     "data/test-00000-of-00001.parquet"],
    ["default/train/0000.parquet", "default/validation/0000.parquet"],
    ["train-v2/a.jsonl", "dev/b.jsonl"],
    ["test.jsonl"],
    ["mytrain.jsonl", "other.jsonl"],
    ["alpaca_train.json", "alpaca_dev.json"],
    ["training_data.csv", "eval_data.csv"],
    ["data/a.jsonl", "data/b.jsonl"],
    ["zh/train.jsonl", "en/train.jsonl", "zh/test.jsonl"],
    ["train1.jsonl", "val1.jsonl"],
    ["data/sub_train/a.jsonl", "data/x.jsonl"],
    ["trainset.jsonl", "test.jsonl"],
    ["train.jsonl", "data/extra.jsonl"],
    ["data/validation-00000-of-00001.parquet", "train.jsonl"],
    ["my-train.csv", "my-test.csv", "notes.csv"],
]

cases = []
for files in LAYOUTS:
    with tempfile.TemporaryDirectory() as root:
        for f in files:
            path = os.path.join(root, f)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as out:
                out.write("{}\n")
        resolved = DataFilesDict.from_patterns(get_data_patterns(root), base_path=root)
        train = resolved.get("train")
        cases.append({
            "files": files,
            "train": None if train is None else sorted(os.path.relpath(p, root) for p in train),
        })

target = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train_split.json")
with open(target, "w") as out:
    json.dump(cases, out, indent=1, ensure_ascii=False)
    out.write("\n")
