"""The benchmark workloads every engine is measured on, built the same way for every engine.

Each workload is seeded (the same seed gives the same requests) and hands engines token-id lists,
never text: text prompts are tokenized here, once, so every engine sees identical ids and
tokenizer differences can never show up as engine differences.

Every workload has three sizes: "cuda" (a GPU benchmark: on one H100/H200 every engine, the naive
cycle 1 included, finishes it; common/benchmark/estimate.py), "cpu" (small enough that even cycle 1, which
reruns the whole sequence every step, finishes on 2 cores) and "quick" (a smoke test: seconds per
cycle). All sizes live in the SIZES table right below, the one place to tune them.
"""

import argparse
import dataclasses
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    num_requests: int
    prompt_len: tuple[int, int] = (0, 0)  # tokens of each request's own part, uniform in [lo, hi]
    output_len: tuple[int, int] = (0, 0)  # max_tokens, uniform in [lo, hi]
    prefix_len: int = 0                   # shared_prefix only: tokens of the shared system text


SIZES: dict[str, dict[str, Size]] = {
    # Random ids. The CUDA size is what cycle 1 can afford: `python -m common.benchmark.estimate` shows that
    # compare.py runs all engines on it in ~3 minutes on an H200 (nano-vllm's sizes would take cycle 1
    # over an hour; they are the nano_vllm_bench workload below).
    "throughput": {
        "cuda": Size(256, prompt_len=(32, 128), output_len=(32, 128)),
        "cpu": Size(16, prompt_len=(16, 64), output_len=(16, 64)),
        "quick": Size(4, prompt_len=(8, 16), output_len=(4, 8)),
    },
    # One long system text shared by all; prompt_len is the unique user question.
    "shared_prefix": {
        "cuda": Size(128, prompt_len=(16, 64), output_len=(32, 32), prefix_len=1024),
        "cpu": Size(16, prompt_len=(8, 24), output_len=(8, 8), prefix_len=256),
        "quick": Size(4, prompt_len=(4, 8), output_len=(4, 4), prefix_len=64),
    },
    # Real questions (prompt_len unused): the engine may stop early at EOS.
    "chat": {
        "cuda": Size(64, output_len=(64, 64)),
        "cpu": Size(8, output_len=(32, 32)),
        "quick": Size(2, output_len=(8, 8)),
    },
    # Prompts are capped so prompt + output fits the model's max_position_embeddings.
    "long_context": {
        "cuda": Size(16, prompt_len=(4096, 8192), output_len=(128, 128)),
        "cpu": Size(2, prompt_len=(1024, 2048), output_len=(16, 16)),
        "quick": Size(1, prompt_len=(256, 256), output_len=(4, 4)),
    },
    # Requests arriving over time (common/benchmark/online.py, where the rate and SLOs are set). Mixed output
    # lengths: a static batch waits for its slowest member, continuous batching does not.
    "online": {
        "cuda": Size(200, prompt_len=(64, 512), output_len=(32, 512)),
        "cpu": Size(32, prompt_len=(16, 64), output_len=(16, 128)),
        "quick": Size(4, prompt_len=(8, 16), output_len=(4, 12)),
    },
    # nano-vllm's bench.py: 256 requests, prompt and output lengths uniform in 100-1024, ignore_eos.
    # The same on every device (it is that benchmark or it is not); only cycles with a block pool
    # can run it (see UNSUPPORTED below).
    "nano_vllm_bench": {
        "cuda": Size(256, prompt_len=(100, 1024), output_len=(100, 1024)),
        "cpu": Size(256, prompt_len=(100, 1024), output_len=(100, 1024)),
        "quick": Size(4, prompt_len=(100, 128), output_len=(4, 8)),
    },
    # Chat prompts whose answer copies from them (repeat, quote, fix code): where n-gram speculative
    # decoding's drafts hit (chapter 12). Real text, the chat template, stop at EOS.
    "copy": {
        "cuda": Size(64, output_len=(128, 128)),
        "cpu": Size(8, output_len=(64, 64)),
        "quick": Size(2, output_len=(8, 8)),
    },
}

WORKLOADS = list(SIZES)

# Engines that cannot run a workload at all, by cycle number, and why: compare.py skips them and
# common.benchmark.bench refuses them. `python -m common.benchmark.estimate` prints the figures behind the reasons.
UNSUPPORTED = {
    "nano_vllm_bench": {
        1: "cycle 1 reruns every sequence in full at each of ~1,000 steps: by `python -m common.benchmark.estimate` "
           "over an hour on an H200, and a peak (a [256, 16, 2048, 2048] score tensor per layer) larger "
           "than any single GPU's memory",
    },
}

DESCRIPTIONS = {
    "throughput": "random token-id prompts, random lengths, ignore_eos: pure generation throughput",
    "shared_prefix": "one long system prompt shared by every request + short unique questions: prefix caching",
    "chat": "real English questions with the chat template, stop at EOS: what a user sees",
    "long_context": "a few prompts of thousands of random tokens: attention cost and KV cache size",
    "online": "random token-id prompts arriving over time (--request-rate, --burstiness): serving latency and goodput",
    "nano_vllm_bench": "nano-vllm's benchmark: 256 random prompts, lengths 100-1024 in and out, ignore_eos",
    "copy": "chat prompts whose answers copy from them (repeat, quote, fix code), stop at EOS: speculative decoding",
}

# The copy workload: an instruction, then the text its answer copies from.
COPY_TASKS = ["Repeat the following text exactly, word for word:", "Fix the typo and print the whole text again:",
              "Quote every sentence of this text that mentions the river:"]
COPY_TEXTS = [
    "The old mill stood by the river for two hundred years. Every spring the river rose and the wheel turned "
    "faster. The miller's daughter kept the books, and the books said the mill never lost a season.",
    "def mean(values):\n    total = 0\n    for v in values:\n        totl += v\n    return total / len(values)",
    "Trains leave the north station every ten minutes. The last train crosses the river at midnight, and the "
    "first one leaves again at five. Tickets are sold at the gate and on the train.",
    "Dear team, the meeting moves to Thursday at ten. Please bring the river survey, the budget sheet and the "
    "list of open questions. Lunch will be served after the meeting.",
]

# Random prompt ids come from here: above the first 100 ids (bytes and special tokens in most
# vocabularies) and below 10000 (ordinary subwords in every tokenizer we use).
SAFE_ID_RANGE = (100, 10000)

QUESTIONS = [
    "What is the capital of France, and why did it become the capital?",
    "Explain in simple terms how a rainbow forms.",
    "Write a short poem about the sea at night.",
    "What are three tips for getting better sleep?",
    "How does a bicycle stay upright when it is moving?",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why do cats purr?",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Suggest a name for a small bakery that sells bread and coffee.",
    "What is photosynthesis?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a black hole is to a ten-year-old.",
]

# The shared system text is built by cycling these rules until it reaches the wanted length.
_SYSTEM_RULES = [
    "Always greet the customer politely and use their name when you know it.",
    "Refunds are possible within thirty days of delivery if the item is unused.",
    "Orders ship from our warehouse within two working days of payment.",
    "Never share one customer's details with another customer.",
    "If a parcel is late by more than a week, offer a free replacement.",
    "Gift cards cannot be exchanged for cash.",
    "Explain delivery costs before the customer confirms an order.",
    "When unsure, say so and offer to pass the question to a human colleague.",
]

_TOPIC_WORDS = [
    "order", "refund", "parcel", "delivery", "invoice", "address", "gift", "card", "return",
    "size", "colour", "warranty", "discount", "account", "password", "shipping", "late",
    "broken", "missing", "exchange", "price", "payment", "receipt", "store",
]


@dataclass
class Request:
    prompt: str | list[int]              # the text before tokenizing, or the ids themselves
    max_tokens: int
    ignore_eos: bool
    prompt_token_ids: list[int] | None   # what engines are given; always filled by make_workload


@dataclass
class Workload:
    name: str
    description: str
    requests: list[Request]
    device_size: str                     # "cuda", "cpu" or "quick": which row of SIZES was used


def unsupported_reason(engine: str, workload: str) -> str | None:
    """Why `engine` (a package name such as cycle1_naive) cannot run `workload`; None if it can."""
    prefix = engine.partition("_")[0].removeprefix("cycle")
    return UNSUPPORTED.get(workload, {}).get(int(prefix)) if prefix.isdigit() else None


def check_supported(engine: str, workload: str) -> None:
    reason = unsupported_reason(engine, workload)
    if reason:
        raise ValueError(f"{engine} cannot run the {workload} workload: {reason}")


def size_key(device: str, quick: bool) -> str:
    if quick:
        return "quick"
    return "cuda" if str(device).startswith("cuda") else "cpu"


def safe_token_ids(tokenizer) -> list[int]:
    """Ids that decode to ordinary text: inside SAFE_ID_RANGE and not a special or added token.
    A tiny test vocabulary (a few hundred ids) has no room to skip the first 100: it keeps them."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    lo = SAFE_ID_RANGE[0] if len(tokenizer) > 2 * SAFE_ID_RANGE[0] else 0
    hi = min(len(tokenizer), SAFE_ID_RANGE[1])
    ids = [i for i in range(lo, hi) if i not in special]
    if not ids:
        raise ValueError(f"tokenizer has no ordinary token ids below {hi}")
    return ids


def chat_token_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat, ready for the assistant's answer.

    Rendering to text and then encoding without special tokens keeps the template's own special
    tokens exactly once. enable_thinking=False stops Qwen3 from spending the short max_tokens on a
    <think> block; templates that don't know the variable ignore it.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    # A base model without a template: plain text, with whatever special tokens it adds itself.
    text = "\n\n".join(m["content"] for m in messages) + "\n"
    return tokenizer(text).input_ids


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def system_text(tokenizer, num_tokens: int) -> str:
    """A deterministic system prompt of at least num_tokens tokens (numbered rules, cycled)."""
    lines = ["You are the support assistant of an online shop. Follow these rules."]
    rule = 0
    while _num_tokens(tokenizer, "\n".join(lines)) < num_tokens:
        lines.append(f"Rule {rule + 1}: {_SYSTEM_RULES[rule % len(_SYSTEM_RULES)]}")
        rule += 1
    return "\n".join(lines)


def _question_text(tokenizer, rng: random.Random, ticket: int, num_tokens: int) -> str:
    """A unique user message of about num_tokens tokens; the ticket number makes it unique."""
    words = [f"Ticket {ticket}:"]
    while _num_tokens(tokenizer, " ".join(words)) < num_tokens:
        words.append(rng.choice(_TOPIC_WORDS))
    return " ".join(words) + "?"


def _uniform(rng: random.Random, bounds: tuple[int, int]) -> int:
    return rng.randint(bounds[0], bounds[1])


def _random_id_requests(tokenizer, size: Size, rng: random.Random, max_model_len: int | None) -> list[Request]:
    ids = safe_token_ids(tokenizer)
    requests = []
    for _ in range(size.num_requests):
        prompt_len = _uniform(rng, size.prompt_len)
        max_tokens = _uniform(rng, size.output_len)
        if max_model_len is not None:
            prompt_len = max(1, min(prompt_len, max_model_len - max_tokens))
        prompt = [rng.choice(ids) for _ in range(prompt_len)]
        requests.append(Request(prompt, max_tokens, ignore_eos=True, prompt_token_ids=prompt))
    return requests


def _shared_prefix_requests(tokenizer, size: Size, rng: random.Random) -> list[Request]:
    system = system_text(tokenizer, size.prefix_len)
    requests = []
    for i in range(size.num_requests):
        question = _question_text(tokenizer, rng, ticket=1000 + i, num_tokens=_uniform(rng, size.prompt_len))
        ids = chat_token_ids(tokenizer, question, system=system)
        requests.append(Request(question, _uniform(rng, size.output_len), ignore_eos=True, prompt_token_ids=ids))
    return requests


def _chat_requests(tokenizer, size: Size, rng: random.Random) -> list[Request]:
    # A seeded shuffle, then cycling, so a small size still sees varied questions.
    order = rng.sample(QUESTIONS, len(QUESTIONS))
    requests = []
    for i in range(size.num_requests):
        question = order[i % len(order)]
        requests.append(Request(question, _uniform(rng, size.output_len), ignore_eos=False,
                                prompt_token_ids=chat_token_ids(tokenizer, question)))
    return requests


def _copy_requests(tokenizer, size: Size, rng: random.Random) -> list[Request]:
    requests = []
    for i in range(size.num_requests):
        prompt = f"{COPY_TASKS[i % len(COPY_TASKS)]}\n\n{rng.choice(COPY_TEXTS)}"
        requests.append(Request(prompt, _uniform(rng, size.output_len), ignore_eos=False,
                                prompt_token_ids=chat_token_ids(tokenizer, prompt)))
    return requests


def make_workload(name: str, tokenizer, device: str, quick: bool = False, seed: int = 0,
                  max_model_len: int | None = None, num_requests: int | None = None,
                  prompt_len: int | None = None, output_len: tuple[int, int] | None = None) -> Workload:
    """Build a workload's requests. max_model_len (the model's max_position_embeddings) caps
    random prompts so prompt + max_tokens always fits; num_requests overrides the size's count,
    prompt_len fixes every prompt's own length and output_len (lo, hi) the range of max_tokens (all
    keep the rest of the size)."""
    if name not in SIZES:
        raise ValueError(f"unknown workload {name!r}: choose one of {', '.join(WORKLOADS)}")
    key = size_key(device, quick)
    size = SIZES[name][key]
    if num_requests is not None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        size = dataclasses.replace(size, num_requests=num_requests)
    if prompt_len is not None:
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        size = dataclasses.replace(size, prompt_len=(prompt_len, prompt_len))
    if output_len is not None:
        if not 1 <= output_len[0] <= output_len[1]:
            raise ValueError(f"output_len must be (lo, hi) with 1 <= lo <= hi, got {output_len}")
        size = dataclasses.replace(size, output_len=tuple(output_len))
    rng = random.Random(seed)
    if name in ("throughput", "long_context", "online", "nano_vllm_bench"):
        requests = _random_id_requests(tokenizer, size, rng, max_model_len)
    elif name == "shared_prefix":
        requests = _shared_prefix_requests(tokenizer, size, rng)
    elif name == "copy":
        requests = _copy_requests(tokenizer, size, rng)
    else:
        requests = _chat_requests(tokenizer, size, rng)
    return Workload(name, DESCRIPTIONS[name], requests, key)


def parse_length_range(text: str) -> tuple[int, int]:
    """A command line's token count: "32" (exactly) or "16-48" (uniform in that range)."""
    lo, dash, hi = text.partition("-")
    try:
        bounds = (int(lo), int(hi if dash else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return bounds


def warmup_request(tokenizer, num_tokens: int = 8) -> Request:
    """A short request outside every workload: warms kernels and allocators without putting any
    workload prefix into a prefix cache (which would flatter cycle 5)."""
    ids = safe_token_ids(tokenizer)
    rng = random.Random(-1)
    prompt = [rng.choice(ids) for _ in range(num_tokens)]
    return Request(prompt, max_tokens=4, ignore_eos=True, prompt_token_ids=prompt)
