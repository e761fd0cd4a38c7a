"""Write qlora_core/default_data/{train,eval}.jsonl: a seeded sample of short NiuTrans pairs as ADL-style instructions,
and tokenizer.model: a small SentencePiece BPE model trained on them, for the built-in demo model.

Run from anywhere: `python tools/make_default_data.py`. It reads ../shared/data/classical-modern/pairs.jsonl
(next to the repository) and writes the same files every time.
"""
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT.parent / "shared" / "data" / "classical-modern" / "pairs.jsonl"
OUT = ROOT / "qlora_core" / "default_data"
SEED = 3
N_TRAIN, N_EVAL = 600, 60
MAX_CLASSICAL, MAX_MODERN = 40, 60
VOCAB_SIZE = 3072

# Phrasings copied from the ADL HW3 instructions (their "下麵" included); {text} is the sentence to translate.
TO_CLASSICAL = [
    "翻譯成文言文：\n{text}",
    "翻譯成文言文：\n{text}\n答案：",
    "{text}\n翻譯成文言文：",
    "{text}\n幫我把這句話翻譯成文言文",
    "{text}\n把這句話翻譯成文言文：",
    "{text}\n翻譯成古文：",
    "{text}\n這句話在古代怎麼說：",
    "{text}\n這句話在中國古代怎麼說：",
    "將下麵句子翻譯成文言文：\n{text}",
]
TO_MODERN = [
    "文言文翻譯：\n{text}",
    "翻譯成現代文：\n{text}",
    "翻譯成現代文：\n{text}\n答案：",
    "{text}\n翻譯成現代文：",
    "{text}\n翻譯成白話文：",
    "{text}\n幫我把這句話翻譯成現代文",
    "{text}\n把這句話翻譯成現代文。",
    "將下麵句子翻譯成現代文：\n{text}",
]


def to_record(line: int, pair: dict, to_classical: bool, rng: random.Random) -> dict:
    """One instruction record; the id names the pair's line (from 0) in pairs.jsonl."""
    if to_classical:
        instruction, output = rng.choice(TO_CLASSICAL).format(text=pair["modern"]), pair["classical"]
    else:
        instruction, output = rng.choice(TO_MODERN).format(text=pair["classical"]), pair["modern"]
    return {"id": f"niutrans-{line:05d}", "instruction": instruction, "output": output}


def main() -> None:
    pairs = [json.loads(s) for s in PAIRS.read_text(encoding="utf-8").splitlines()]
    short = [i for i, p in enumerate(pairs) if len(p["classical"]) <= MAX_CLASSICAL and len(p["modern"]) <= MAX_MODERN]
    rng = random.Random(SEED)
    picked = rng.sample(short, N_TRAIN + N_EVAL)
    splits = {"train": picked[:N_TRAIN], "eval": picked[N_TRAIN:]}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        records = [to_record(line, pairs[line], k % 2 == 0, rng) for k, line in enumerate(lines)]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (OUT / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {len(records)} records, {len(text.encode())} bytes, from {len(short)} short pairs")
    write_tokenizer()


def write_tokenizer() -> None:
    """A Llama-2-style SentencePiece BPE model (byte fallback, identity normalizer) over the shipped records."""
    import sentencepiece as spm
    sys.path.insert(0, str(ROOT))
    from qlora_core.prompts import DEFAULT_TEMPLATE
    texts = [DEFAULT_TEMPLATE]
    for name in ("train", "eval"):
        for line in (OUT / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record["instruction"], record["output"]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(OUT / "tokenizer"), vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        num_threads=1, minloglevel=2)
    (OUT / "tokenizer.vocab").unlink()
    print(f"tokenizer.model: {VOCAB_SIZE} pieces")


if __name__ == "__main__":
    main()
