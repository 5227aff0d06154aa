#!/usr/bin/env python
"""Build wise-bench's offline default model ``tiny``.

``tiny`` is a small LLaMA-architecture causal LM trained from scratch, on CPU, so that it *knows*
the true facts of the benchmark data (ZsRE edit/train sets, their NQ locality pairs and,
optionally, CounterFact).  The build is offline and deterministic for a given data dir, seed and
thread count:

    python scripts/build_tiny_model.py --data-dir ../shared/data --out models/tiny [--seed 0] [--threads N]

Steps: (1) fact corpus (prompt, answer) pairs from the data's TRUE answers, deduplicated; the ZsRE
edit set's ``rephrase`` paraphrases are never trained on (they measure generalisation);
(2) byte-level BPE tokenizer (``tokenizers``) that prepends ``<s>``; (3) LlamaForCausalLM trained
with a loss on the answer tokens only; (4) teacher-forced token accuracies; (5) save in Hugging
Face format with ``manifest.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

log = logging.getLogger("build_tiny_model")

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
N_EVAL = 1000  # the WISE protocol uses the first 1000 ZsRE edit records

INPUT_FILES = {
    "zsre_edit": "zsre/zsre_mend_edit.json",
    "zsre_train": "zsre/zsre_mend_train-1k.json",
    "counterfact": "counterfact/counterfact-edit-1k.json",
}


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------
@dataclass
class Fact:
    prompt: str
    answer: str
    source: str  # which group it came from
    subject: str | None = None  # kept for the word-dropout augmentation
    weight: int = 1  # times per epoch


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_json(data_dir: Path, rel: str) -> list[dict]:
    with open(data_dir / rel, encoding="utf-8") as f:
        return json.load(f)


def clean(s: str) -> str:
    return " ".join(str(s).split())


def build_corpus(data_dir: Path, corpus: str, target_weight: int) -> tuple[list[Fact], dict]:
    """Collect (prompt, answer) facts.  First occurrence of a prompt wins (groups are added in
    priority order, evaluation targets first); conflicting duplicates are dropped and counted."""
    edit = load_json(data_dir, INPUT_FILES["zsre_edit"])
    train = load_json(data_dir, INPUT_FILES["zsre_train"])
    groups: list[tuple[str, list[tuple[str, str, str | None]]]] = [
        ("zsre_edit_src", [(r["src"], r["answers"][0], r["subject"]) for r in edit]),
        ("zsre_edit_loc", [(r["loc"], r["loc_ans"], None) for r in edit]),
        ("zsre_train_src", [(r["src"], r["answers"][0], r["subject"]) for r in train]),
        ("zsre_train_rephrase", [(r["rephrase"], r["answers"][0], r["subject"]) for r in train]),
        ("zsre_train_loc", [(r["loc"], r["loc_ans"], None) for r in train]),
    ]
    files_used = ["zsre_edit", "zsre_train"]
    if corpus == "targets":
        groups, files_used = groups[:2], ["zsre_edit"]
    elif corpus == "zsre":
        groups = groups[:4]
    if corpus == "all":
        cf = load_json(data_dir, INPUT_FILES["counterfact"])
        groups += [
            ("cf_prompt", [(r["prompt"], r["ground_truth"], r["subject"]) for r in cf]),
            ("cf_loc", [(r["locality_prompt"], r["locality_ground_truth"], None) for r in cf]),
        ]
        files_used.append("counterfact")
    held_out = {clean(r["rephrase"]) for r in edit}

    facts: dict[str, Fact] = {}
    stats = {"duplicates": 0, "conflicts": 0, "held_out_skipped": 0, "per_group": {}}
    for name, items in groups:
        kept = 0
        for prompt, answer, subject in items:
            prompt, answer = clean(prompt), clean(answer)
            if not prompt or not answer:
                continue
            if prompt in held_out and name != "zsre_edit_src":
                # an edit-set paraphrase must not be trained on; an edit *prompt* that happens to
                # equal another record's paraphrase is still trained (it is an edit prompt)
                stats["held_out_skipped"] += 1
                continue
            if prompt in facts:
                if facts[prompt].answer == answer:
                    stats["duplicates"] += 1
                else:
                    stats["conflicts"] += 1
                continue
            weight = target_weight if name in ("zsre_edit_src", "zsre_edit_loc") else 1
            facts[prompt] = Fact(prompt, answer, name, subject, weight)
            kept += 1
        stats["per_group"][name] = kept
    stats["files_used"] = files_used
    stats["rephrase_equals_trained_prompt"] = sum(1 for r in edit[:N_EVAL] if clean(r["rephrase"]) in facts)
    return list(facts.values()), stats


def corpus_text(facts: list[Fact]) -> str:
    return "".join(f"{f.prompt} {f.answer}\n" for f in facts)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def train_tokenizer(facts: list[Fact], vocab_size: int, max_len: int, min_frequency: int = 1):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("bos", "eos", "pad", "unk")]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f"{f.prompt} {f.answer}" for f in facts), trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )


def encode_with_targets(tokenizer, prompts: list[str], targets: list[str]) -> list[tuple[list[int], list[int]]]:
    """Training targets of ``prompt + " " + target``: tokens whose char span ends after len(prompt).

    Unlike the benchmark scorer (wise_bench.metrics.encode_pair) this also supervises a lone
    separating-space token (4 of the 3954 default facts); kept so that rebuilds stay bit-identical
    to the committed weights. Returns (ids, target_mask)."""
    texts = [p + " " + t for p, t in zip(prompts, targets)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    out = []
    for ids, offs, p in zip(enc["input_ids"], enc["offset_mapping"], prompts):
        mask = [1 if end > len(p) else 0 for (_, end) in offs]
        out.append((ids, mask))
    return out


def check_tokenizer(tokenizer, out_dir: Path) -> dict:
    """Reload from disk and check that ids and offsets are identical and BOS is prepended."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    assert reloaded.is_fast, "reloaded tokenizer is not fast"
    samples = [
        ("When did Joanes Leizarraga die?", "1601"),
        ("nq question: who wrote shes always a woman to me", "Joel"),
        ("Which lady Fakhr-un-Nissa was born to?", "Aisha Sultan Begum"),
        ("Antônio Cardoso is located in", "Bahia (Brazil) — ünïcödé ✓"),
    ]
    texts = [p + " " + t for p, t in samples]
    a = tokenizer(texts, return_offsets_mapping=True)
    b = reloaded(texts, return_offsets_mapping=True)
    assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"], "reload mismatch"
    for ids, offs, (p, t), text in zip(b["input_ids"], b["offset_mapping"], samples, texts):
        assert ids[0] == reloaded.bos_token_id and offs[0] == (0, 0), "BOS not prepended"
        tgt = [i for i, (_, e) in enumerate(offs) if e > len(p)]
        first = offs[tgt[0]]
        assert first[0] == len(p) and text[first[0]] == " ", "first target token should start at the space"
        assert reloaded.decode([ids[i] for i in tgt]) == " " + t, "target tokens do not decode to ' '+target"
        assert reloaded.decode(ids, skip_special_tokens=True) == text, "round trip failed"
    return {"bos_prepended": True, "reload_identical": True, "first_target_token_offset": "starts at the space"}


# --------------------------------------------------------------------------------------------
# training data
# --------------------------------------------------------------------------------------------
def drop_words(prompt: str, subject: str | None, p: float, rng: random.Random) -> str:
    """Word-dropout augmentation: drop non-subject words with probability p (never all of them).
    Makes the model key on the subject and the remaining relation words, which helps on unseen
    paraphrases of the same question."""
    if subject and subject in prompt:
        i = prompt.index(subject)
        pre, post = prompt[:i].split(), prompt[i + len(subject):].split()
        words = [(w, False) for w in pre] + [(subject, True)] + [(w, False) for w in post]
    else:
        words = [(w, False) for w in prompt.split()]
    kept = [w for w, keep in words if keep or rng.random() >= p]
    if not kept:
        kept = [words[-1][0]]
    return " ".join(kept)


def epoch_examples(facts: list[Fact], aug_prob: float, drop_p: float, rng: random.Random) -> tuple[list[str], list[str]]:
    prompts, answers = [], []
    for f in facts:
        for _ in range(f.weight):
            prompt = f.prompt
            if f.subject and aug_prob > 0 and rng.random() < aug_prob:
                prompt = drop_words(prompt, f.subject, drop_p, rng)
            prompts.append(prompt)
            answers.append(f.answer)
    return prompts, answers


def make_batches(encoded, batch_size: int, rng: random.Random, pool: int = 50):
    """Length-bucketed batches: shuffle, sort within pools of `pool` batches, shuffle batches."""
    idx = list(range(len(encoded)))
    rng.shuffle(idx)
    batches = []
    chunk = batch_size * pool
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: len(encoded[i][0]))
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded, batch: list[int], pad_id: int):
    n = max(len(encoded[i][0]) for i in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for r, i in enumerate(batch):
        toks, mask = encoded[i]
        L = len(toks)
        ids[r, :L] = torch.tensor(toks)
        att[r, :L] = 1
        m = torch.tensor(mask, dtype=torch.bool)
        labels[r, :L] = torch.where(m, torch.tensor(toks), torch.tensor(-100))
    return ids, att, labels


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def make_model(vocab_size: int, args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    return model


def train(model, facts, tokenizer, args) -> dict:
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=args.weight_decay
    )
    n_examples = sum(f.weight for f in facts)
    steps_per_epoch = math.ceil(n_examples / args.batch_size)  # upper bound (bucketing may add a few)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup * total))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    model.train()
    step, t0 = 0, time.time()
    history = []
    bar = tqdm(total=total, desc="train", unit="step", mininterval=2.0)
    for epoch in range(args.epochs):
        prompts, answers = epoch_examples(facts, args.aug_prob, args.drop_p, rng)
        encoded = encode_with_targets(tokenizer, prompts, answers)
        ep_loss, ep_tok = 0.0, 0
        for batch in make_batches(encoded, args.batch_size, rng):
            ids, att, labels = collate(encoded, batch, tokenizer.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            # run the LM head only where there is a loss (answer tokens): same loss, less compute
            hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
            shift_labels = labels[:, 1:]
            sel = shift_labels != -100
            logits = model.lm_head(hidden[:, :-1][sel])
            loss = torch.nn.functional.cross_entropy(logits, shift_labels[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ntok = int(sel.sum())
            ep_loss += float(loss.detach()) * ntok
            ep_tok += ntok
            step += 1
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{ep_loss / max(1, ep_tok):.3f}")
        history.append(round(ep_loss / max(1, ep_tok), 4))
        if args.log_every and (epoch + 1) % args.log_every == 0:
            log.info("epoch %d/%d step %d loss %.4f lr %.2e %.0fs", epoch + 1, args.epochs, step,
                     history[-1], lr_at(step), time.time() - t0)
    bar.close()
    model.eval()
    return {"epochs": args.epochs, "steps": step, "train_seconds": round(time.time() - t0, 1),
            "loss_per_epoch": history}


# --------------------------------------------------------------------------------------------
# evaluation (teacher-forced token accuracy, left padding + explicit position ids)
# --------------------------------------------------------------------------------------------
def teacher_forced_accuracy(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64) -> float:
    """The benchmark's own scorer (wise_bench.metrics), so the manifest reports what runs will see."""
    from wise_bench.metrics import encode_pair, teacher_forced, token_accuracy

    seqs = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    scores = teacher_forced(model, seqs, tokenizer.pad_token_id, batch_size)
    return sum(token_accuracy(s.pred, s.gold) for s in scores) / len(scores)


def evaluate(model, tokenizer, data_dir: Path, facts: list[Fact]) -> dict:
    edit = load_json(data_dir, INPUT_FILES["zsre_edit"])[:N_EVAL]
    trained = {f.prompt for f in facts}
    strict = [r for r in edit if clean(r["rephrase"]) not in trained]
    acc = {
        "zsre_edit_src_true": teacher_forced_accuracy(model, tokenizer, [r["src"] for r in edit], [r["answers"][0] for r in edit]),
        "zsre_edit_loc": teacher_forced_accuracy(model, tokenizer, [r["loc"] for r in edit], [r["loc_ans"] for r in edit]),
        "zsre_edit_rephrase_true": teacher_forced_accuracy(model, tokenizer, [r["rephrase"] for r in edit], [r["answers"][0] for r in edit]),
        "zsre_edit_rephrase_true_strict": teacher_forced_accuracy(model, tokenizer, [r["rephrase"] for r in strict], [r["answers"][0] for r in strict]),
        "zsre_edit_src_new_target_pre_edit": teacher_forced_accuracy(model, tokenizer, [r["src"] for r in edit], [r["alt"] for r in edit]),
        "zsre_edit_rephrase_new_target_pre_edit": teacher_forced_accuracy(model, tokenizer, [r["rephrase"] for r in edit], [r["alt"] for r in edit]),
    }
    by_source: dict[str, list[Fact]] = {}
    for f in facts:
        by_source.setdefault(f.source, []).append(f)
    for name in ("zsre_train_src", "zsre_train_loc", "cf_prompt", "cf_loc"):
        if name in by_source:
            fs = by_source[name]
            acc[f"trained_{name}"] = teacher_forced_accuracy(model, tokenizer, [f.prompt for f in fs], [f.answer for f in fs])
    acc = {k: round(v, 4) for k, v in acc.items()}
    acc["n_requests"] = len(edit)
    acc["n_rephrase_strict"] = len(strict)
    return acc


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("models/tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0 = all cores).  Weights are bit-identical only for the same "
                        "thread count; on a busy 2-core machine 2 threads can be much slower than 1.")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=1, help="BPE merge min. pair frequency")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--target-weight", type=int, default=1, help="copies per epoch of the ZsRE edit src/loc facts")
    p.add_argument("--aug-prob", type=float, default=0.0, help="prob. of word-dropout on a subject prompt")
    p.add_argument("--drop-p", type=float, default=0.3, help="word-dropout rate when augmenting")
    p.add_argument("--corpus", choices=["targets", "zsre", "zsre_full", "all"], default="zsre",
                   help="targets: ZsRE edit src+loc; zsre: + ZsRE train src/rephrase; zsre_full: + ZsRE train "
                        "loc; all: + CounterFact 1k (prompt, locality).  Larger corpora need more epochs/time.")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--no-save", action="store_true", help="experiments: train and evaluate only")
    return p.parse_args(argv)


def versions() -> dict:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t_start = time.time()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    facts, stats = build_corpus(args.data_dir, args.corpus, args.target_weight)
    text = corpus_text(facts)
    log.info("corpus: %d facts %s", len(facts), stats["per_group"])

    tokenizer = train_tokenizer(facts, args.vocab_size, args.max_len, args.min_frequency)
    vocab = len(tokenizer)
    lens = [len(ids) for ids, _ in encode_with_targets(tokenizer, [f.prompt for f in facts], [f.answer for f in facts])]
    long_facts = sum(1 for n in lens if n > args.max_len)
    if long_facts:
        raise SystemExit(f"{long_facts} facts exceed --max-len {args.max_len}")
    log.info("tokenizer: vocab %d, %d tokens/epoch (mean %.1f, max %d)", vocab, sum(lens), sum(lens) / len(lens), max(lens))

    model = make_model(vocab, args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d layers, hidden %d, mlp %d, %.2fM params", args.layers, args.hidden, args.intermediate, n_params / 1e6)

    train_info = train(model, facts, tokenizer, args)

    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype)).float()  # evaluate what is saved
    acc = evaluate(model, tokenizer, args.data_dir, facts)
    log.info("accuracies: %s", json.dumps(acc))
    if args.no_save:
        return acc

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    tok_check = check_tokenizer(tokenizer, out)
    model.config.use_cache = True
    model.to(getattr(torch, args.dtype)).save_pretrained(str(out), safe_serialization=True)
    model.generation_config.save_pretrained(str(out))

    manifest = {
        "name": "tiny",
        "description": "wise-bench offline default model: small LLaMA trained from scratch on the "
                       "benchmark's true facts (ZsRE edit/train sets + NQ locality pairs"
                       + f"; corpus option '{args.corpus}').",
        "build_command": "python scripts/build_tiny_model.py --data-dir <data> --out <out> "
                         f"--seed {args.seed} --threads {threads}",
        "seed": args.seed,
        "threads": threads,
        "model": {"architecture": "LlamaForCausalLM", "params": n_params, "layers": args.layers,
                  "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                  "vocab": vocab, "max_position_embeddings": args.max_len, "tie_word_embeddings": True,
                  "dtype": args.dtype},
        "training": {**train_info, "batch_size": args.batch_size, "lr": args.lr, "schedule": "cosine",
                     "warmup": args.warmup, "min_lr_ratio": args.min_lr_ratio, "optimizer": "AdamW",
                     "weight_decay": args.weight_decay, "target_weight": args.target_weight,
                     "aug_prob": args.aug_prob, "drop_p": args.drop_p,
                     "loss": "cross-entropy on the answer tokens of prompt + ' ' + answer only"},
        "corpus": {"facts": len(facts), "tokens_per_epoch": sum(lens), **stats,
                   "sha256_corpus_text": sha256_bytes(text.encode("utf-8")),
                   "input_files": {INPUT_FILES[k]: sha256_bytes((args.data_dir / INPUT_FILES[k]).read_bytes())
                                   for k in stats["files_used"]},
                   "excluded": "zsre_mend_edit.json `rephrase` (held out for generalisation)"},
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab": vocab, **tok_check},
        "accuracy": {"scorer": "teacher-forced token accuracy, text = prompt + ' ' + target, "
                               "first 1000 ZsRE edit records", **acc},
        "versions": versions(),
        "build_seconds": round(time.time() - t_start, 1),
    }
    weights = out / "model.safetensors"
    if weights.exists():
        manifest["sha256_model_safetensors"] = sha256_bytes(weights.read_bytes())
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    log.info("saved to %s in %.0fs", out, manifest["build_seconds"])
    return acc


if __name__ == "__main__":
    main()
