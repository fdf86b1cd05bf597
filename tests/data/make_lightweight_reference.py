"""Make the lightweight reranker's test data once, in the transformers 4.46 environment:

    benchmarks/envs/make_lightweight_env.sh            # creates ~/.cache/bgert/venv-lightweight
    ~/.cache/bgert/venv-lightweight/bin/python tests/data/make_lightweight_reference.py

It builds the tiny random CostWiseGemma checkpoint deterministically (tests/tiny_models.py,
build_lightweight), exports it with bgert into tests/data/lightweight_artifact/ (one graph per
combination below; the export's own parity gate runs against LightWeightFlagLLMReranker), and
stores LightWeightFlagLLMReranker's scores (fp32, CPU) for every case in
tests/data/lightweight_reference.json. The CI test (tests/test_lightweight.py) then checks the
runtime on the stored artifact against the stored scores: CI has no transformers 4.46.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (tiny_models)

import tiny_models  # noqa: E402
from test_rerankers import PAIRS  # noqa: E402

COMBINATIONS = [{"cutoff_layers": [4]}, {"cutoff_layers": [2, 4]}, {"cutoff_layers": [3]},
                {"cutoff_layers": [3], "compress_ratio": 2, "compress_layers": [1, 2]},
                {"cutoff_layers": [2, 4], "compress_ratio": 4, "compress_layers": [1, 3]}]
#: call options checked for every combination (truncation boundaries inside the pairs, sigmoid, prompt)
CALLS = [{}, {"max_length": 24, "query_max_length": 6}, {"normalize": True},
         {"prompt": "Is B relevant to A?"}]


def main() -> None:
    from FlagEmbedding import LightWeightFlagLLMReranker

    from bgert.export import export

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_models.build_lightweight(tmp)
        export(ckpt, os.path.join(HERE, "lightweight_artifact"), kind="lightweight_reranker", force=True,
               progress=False, combinations=COMBINATIONS)
        ref = LightWeightFlagLLMReranker(ckpt, use_fp16=False, devices="cpu")
        cases = []
        for combo in COMBINATIONS:
            for call in CALLS:
                kw = {**combo, **call}
                kw.setdefault("compress_ratio", 1)
                kw.setdefault("compress_layers", [0])
                cases.append({"kwargs": kw, "scores": ref.compute_score([list(p) for p in PAIRS], **kw)})
    data = {"generated_by": "tests/data/make_lightweight_reference.py",
            "versions": {k: version(k) for k in ("torch", "transformers", "flagembedding", "onnxruntime")},
            "reference": "LightWeightFlagLLMReranker(use_fp16=False, devices='cpu')",
            "pairs": [list(p) for p in PAIRS], "cases": cases}
    with open(os.path.join(HERE, "lightweight_reference.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
