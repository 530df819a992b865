"""Whether chunks keep to their token budget in their own encoding, across tokenizer shapes.

    python benchmarks/chunk_budget.py [--data DIR] [--docs 600] [--budgets 24,64,200]
                                      [--chunker HEAD|COMMIT]

The chunker counts each candidate chunk from one encoding of its document (tokenise once);
where a slice of that encoding is not the chunk's own encoding (byte-level BPE; a
sentencepiece that marks no first word; a cut inside a word), the chunk is encoded from its
text, and may hold more tokens than its slice. This splits --docs SciFact abstracts (title and
text, sampled with a fixed seed from DATA/corpus.jsonl, default ../shared/datasets/scifact)
with five tokenizers: the bundled MiniLM's WordPiece, and four trained here on those
abstracts (no download; 2,000 tokens each): byte-level BPE without and with a prefix space,
and sentencepiece-shaped BPE (Metaspace) marking the first word always and never. The
"model" encodes a chunk's text truncated at budget + its special tokens, as LocalEmbedder's
does. For each tokenizer and budget (overlap budget / 8):
  chunks         chunks made
  encoded        chunk texts the encoder encoded (the rest are slices); above `chunks` when
                 chunks over the budget were split again
  over_budget    chunks whose own encoding holds more than the budget (what the model
                 truncates when the budget is its limit)
  ids_not_own    chunks whose input ids differ from their text's own encoding
  seconds        the splitting's wall seconds
--chunker COMMIT runs tasks/chunking.py as it was at COMMIT (git show) instead of the working
tree's, to compare; it imports the working tree's tasks/token_splitter.py, so a commit whose
chunker needs an older splitter (before 8aa8fac) gives a mix of the two, not that commit's
chunks. Also counted: `nested`, chunks that lie wholly inside a neighbour (their text would
be embedded twice). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 2000


def trained(texts: list[str], shape: str) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    if shape.startswith("bytelevel"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=shape.endswith("prefix"))
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<s>", "</s>"],
        )
        ids = (0, 1)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Replace("\n", " ")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=shape.split("_")[1])
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
        ids = (1, 2)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", ids[0]), ("</s>", ids[1])]
    )
    return tok


def chunker_class(commit: str | None) -> Any:
    if commit is None:
        from tasks.chunking import Chunker

        return Chunker
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:tasks/chunking.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("chunking_at_" + commit)
    sys.modules[module.__name__] = module
    exec(compile(source, f"{commit}:tasks/chunking.py", "exec"), module.__dict__)  # noqa: S102
    return module.Chunker


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/scifact")
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--budgets", default="24,64,200")
    ap.add_argument("--chunker", default=None, help="a commit whose tasks/chunking.py to run")
    args = ap.parse_args()
    corpus = args.data / "corpus.jsonl"
    if not corpus.is_file():
        ap.error(f"{corpus} not found: --data must be a BEIR SciFact folder")

    from tokenizers import Tokenizer

    from tasks.embedders.local import load_tokenizer, resolve_model_dir
    from tasks.parsing import record_document
    from tasks.settings import DEFAULT_MODEL
    from tasks.token_splitter import input_template

    rows = [json.loads(line) for line in corpus.open(encoding="utf-8")]
    rows = random.Random(1).sample(rows, min(args.docs, len(rows)))
    texts = [r.get("title", "") + "\n\n" + r["text"] for r in rows]
    docs = [record_document(r["_id"], r.get("title", ""), r["text"]) for r in rows]
    tokenizers = {"wordpiece_minilm": load_tokenizer(resolve_model_dir(DEFAULT_MODEL))}
    for shape in ("bytelevel", "bytelevel_prefix", "sentencepiece_always", "sentencepiece_never"):
        tokenizers[shape] = trained(texts, shape)
    chunker_cls = chunker_class(args.chunker)
    out: dict[str, Any] = {"docs": len(docs), "chunker": args.chunker or "working tree"}
    for name, tok in tokenizers.items():
        for budget in (int(b) for b in args.budgets.split(",")):
            specials = len(tok.encode("", add_special_tokens=True).ids)
            model = Tokenizer.from_str(tok.to_str())
            model.enable_truncation(budget + specials)
            encoded = [0]

            def encoder(batch: list[str], model: Any = model, encoded: list[int] = encoded) -> Any:
                encoded[0] += len(batch)
                return [e.ids for e in model.encode_batch(batch)]

            chunker = chunker_cls(
                tok,
                budget,
                budget // 8,
                encoder=encoder,
                template=input_template(tok, budget + specials),
            )
            chunks = over = mismatched = 0
            clock = time.perf_counter()
            spans = [s for d in docs for s in chunker.split(d)]
            seconds = time.perf_counter() - clock
            nested = sum(
                b.char_start >= a.char_start
                and b.char_end <= a.char_end
                or a.char_start >= b.char_start
                and a.char_end <= b.char_end
                for a, b in zip(spans, spans[1:], strict=False)
                if a.doc_id == b.doc_id
            )
            for s in spans:
                chunks += 1
                own = tok.encode(s.text).ids
                over += len(own) > budget + specials
                mismatched += list(s.token_ids) != own
            out[f"{name}/{budget}"] = {
                "chunks": chunks,
                "encoded": encoded[0],
                "over_budget": over,
                "ids_not_own": mismatched,
                "nested": nested,
                "seconds": round(seconds, 2),
            }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
