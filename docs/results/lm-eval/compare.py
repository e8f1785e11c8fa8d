"""Per-sample comparison of the two lm-eval runs stored here (hf/ and server/).

Run from this folder: python compare.py
"""

import glob
import json


def load(kind: str, task: str) -> dict:
    path = glob.glob(f"{kind}/*/samples_{task}_*.jsonl")[0]
    return {json.loads(line)["doc_id"]: json.loads(line) for line in open(path)}


def main() -> None:
    hf, ours = load("hf", "vllm_learn_mc"), load("server", "vllm_learn_mc")
    diffs, greedy_same = [], 0
    for doc in hf:
        for a, b in zip(hf[doc]["resps"], ours[doc]["resps"]):
            diffs.append(abs(float(a[0][0]) - float(b[0][0])))
            greedy_same += a[0][1] == b[0][1]
    print(f"vllm_learn_mc: {len(diffs)} (question, choice) loglikelihoods, max |hf - server| = {max(diffs):.3g}, "
          f"is_greedy equal in {greedy_same}/{len(diffs)}")
    hf, ours = load("hf", "vllm_learn_gen"), load("server", "vllm_learn_gen")
    same = sum(hf[doc]["resps"] == ours[doc]["resps"] for doc in hf)
    print(f"vllm_learn_gen: identical generations {same}/{len(hf)}")


if __name__ == "__main__":
    main()
