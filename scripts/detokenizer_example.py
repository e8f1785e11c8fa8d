"""The worked example of docs/CYCLE_GUIDE.md, chapter 9: an emoji split across tokens, streamed.

    python scripts/detokenizer_example.py > docs/results/detokenizer-emoji.txt

Tokenizes a short text with SmolLM2-135M-Instruct's byte-level tokenizer, then feeds the tokens one
by one to common/engine/detokenizer.py's IncrementalDetokenizer, as the engine does after each
step, and prints what each token decodes to alone and the delta the stream shows.
"""

from common.engine.detokenizer import IncrementalDetokenizer
from common.engine.model_source import load_tokenizer, resolve_model

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "Say hi with an emoji:"
TEXT = " Hi 👋!"


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes a byte-level token stands for (GPT-2's byte-to-symbol map, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    return bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(token_id))


def main() -> None:
    tokenizer = load_tokenizer(resolve_model(MODEL))
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    print(f"model: {MODEL} (tokenizer only)")
    print(f"text: {TEXT!r} ({len(TEXT.encode())} UTF-8 bytes) -> {len(ids)} tokens {ids}")
    print(f"prompt (context for the first tokens): {PROMPT!r} -> {prompt_ids}")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    print(f"{'step':>4}  {'token id':>8}  {'bytes':<9}  {'decoded alone':<14}  {'delta shown':<12}  text so far")
    for step, token in enumerate(ids, 1):
        alone = tokenizer.decode([token])
        delta = detok.update(token, finishing=step == len(ids))
        hex_bytes = token_bytes(tokenizer, token).hex(" ")
        print(f"{step:>4}  {token:>8}  {hex_bytes:<9}  {alone!r:<14}  {delta!r:<12}  {detok.text!r}")
    assert detok.text == TEXT, (detok.text, TEXT)
    print(f"each token decoded alone, joined: {''.join(tokenizer.decode([t]) for t in ids)!r}")
    print(f"streamed text == decode(all tokens): {detok.text == tokenizer.decode(ids)}")


if __name__ == "__main__":
    main()
