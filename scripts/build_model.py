#!/usr/bin/env python
"""Build wise-bench's offline default model (``models/small``).

A LLaMA-architecture causal LM trained from scratch on the benchmarks' TRUE facts, so that editing
methods have knowledge to overwrite and a model whose pre-edit behaviour is known:

    python scripts/build_model.py --out models/small        # data: $WISE_BENCH_DATA_DIR, else <repo>/data

Corpus (docs/small_model.md): ZsRE questions with their true answers and NQ locality pairs, and
CounterFact's true statements written in several of their relation's templates, so that a subject
sits at different positions. Never trained: any edit target (``alt``, ``target_new``) and the
paraphrases that are evaluated (the ZsRE/CounterFact edit sets' and the tuning splits').

Tuning splits (records that are never evaluated, for choosing hyperparameters): the first
``--tune-records`` records of ``zsre_mend_train-1k.json`` and of ``counterfact-train.json``. The
model knows their facts and has never seen their paraphrases, exactly as for the edit sets.

Runs on CPU or a GPU (``--device``); the manifest records which, the seed, the corpus digest and
the accuracies.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from wise_bench.download import default_data_dir  # noqa: E402

log = logging.getLogger("build_model")

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
FILES = {
    "zsre_edit": "zsre/zsre_mend_edit.json",
    "zsre_train": "zsre/zsre_mend_train-1k.json",
    "cf_edit": "counterfact/counterfact-edit-1k.json",
    "cf_train": "counterfact/counterfact-train.json",
    # ROME-format CounterFact subsets: only their relation templates are read
    "cf_rome": "counterfact/DERIVED_counterfact_rome_format_subset_1476.json",
    "cf_rome_extra": "counterfact/counterfact_portability_gpt4.json",
}


@dataclass
class Fact:
    prompt: str
    answer: str
    source: str
    subject: str = ""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_json(data_dir: Path, key: str) -> list[dict]:
    with open(data_dir / FILES[key], encoding="utf-8") as f:
        return json.load(f)


def clean(s: str) -> str:
    return " ".join(str(s).split())


# --- corpus -----------------------------------------------------------------------------------


def relation_templates(data_dir: Path) -> dict[str, list[str]]:
    """CounterFact relation id -> its prompt templates ("The mother tongue of {} is", ...), harvested
    from the ROME-format files' rewrite prompts (34 relations, ~230 templates)."""
    templates: dict[str, list[str]] = {}
    for key in ("cf_rome", "cf_rome_extra"):
        for r in load_json(data_dir, key):
            rw = r["requested_rewrite"]
            ts = templates.setdefault(rw["relation_id"], [])
            if rw["prompt"] not in ts:
                ts.append(rw["prompt"])
    return templates


def record_relation(record: dict, templates: dict[str, list[str]]) -> str | None:
    """The CounterFact relation whose template, filled with the record's subject, gives its prompt."""
    prompt = clean(record["prompt"])
    return next((rel for rel, ts in templates.items()
                 if any(clean(t.replace("{}", record["subject"])) == prompt for t in ts)), None)


def subject_relations(subjects: list[str], templates: dict[str, list[str]], pools: dict[str, list[str]],
                      k: int, forbidden: dict[str, set[str]], rng: random.Random) -> list[tuple[str, str, str]]:
    """``k`` more facts per subject, as (statement, answer, subject): a subject-first template of
    another relation with an answer drawn from that relation's true objects, never one of the
    subject's edit targets. The attributes are invented; they give every subject several relations,
    so that its last token must carry attributes for the relation words after it to select."""
    first = {rel: [t for t in ts if t.startswith("{}")] for rel, ts in templates.items()}
    rels = sorted(rel for rel, ts in first.items() if ts and pools.get(rel))
    out = []
    for subject in subjects:
        for rel in rng.sample(rels, k):
            answers = [a for a in pools[rel] if a not in forbidden.get(subject, ())]
            out.append((rng.choice(first[rel]).replace("{}", subject), rng.choice(answers), subject))
    return out


def cf_statements(record: dict, templates: dict[str, list[str]], n_templates: int, rng: random.Random,
                  with_rephrase: bool) -> list[str]:
    """The record's prompt and up to ``n_templates`` other templates of its relation, filled with its
    subject. A template that the record's paraphrase ends with is left out (that paraphrase may be
    evaluated); the paraphrase itself only when ``with_rephrase``."""
    subject, prompt = record["subject"], clean(record["prompt"])
    rephrase = clean(record["rephrase_prompt"])
    relation = record_relation(record, templates)
    own = [t for t in templates.get(relation, []) if clean(t.replace("{}", subject)) == prompt]
    others = [clean(t.replace("{}", subject)) for t in templates.get(relation, []) if t not in own]
    others = sorted({o for o in others if not rephrase.endswith(o) and o != prompt})
    rng.shuffle(others)
    out = [prompt] + others[:n_templates]
    if with_rephrase:
        out.append(rephrase)
    return out


def build_corpus(data_dir: Path, args) -> tuple[list[Fact], dict]:
    """(prompt, true answer) facts, evaluation targets first; a prompt's first occurrence wins."""
    rng = random.Random(args.seed)
    zsre_edit = load_json(data_dir, "zsre_edit")
    zsre_train = load_json(data_dir, "zsre_train")
    cf_edit = load_json(data_dir, "cf_edit")
    cf_train = load_json(data_dir, "cf_train")
    templates = relation_templates(data_dir)
    n_tune = args.tune_records

    groups: list[tuple[str, list[tuple[str, str] | tuple[str, str, str]]]] = [
        ("zsre_edit_src", [(r["src"], r["answers"][0], r["subject"]) for r in zsre_edit]),
        ("zsre_edit_loc", [(r["loc"], r["loc_ans"]) for r in zsre_edit]),
        ("cf_edit_prompt", [(p, r["ground_truth"], r["subject"]) for r in cf_edit
                            for p in cf_statements(r, templates, args.cf_templates, rng, with_rephrase=False)]),
        ("cf_edit_loc", [(r["locality_prompt"], r["locality_ground_truth"]) for r in cf_edit]),
        ("zsre_tune_src", [(r["src"], r["answers"][0], r["subject"]) for r in zsre_train[:n_tune]]),
        ("zsre_tune_loc", [(r["loc"], r["loc_ans"]) for r in zsre_train[:n_tune]]),
        ("cf_tune_prompt", [(p, r["ground_truth"], r["subject"]) for r in cf_train[:n_tune]
                            for p in cf_statements(r, templates, args.cf_templates, rng, with_rephrase=False)]),
        ("cf_tune_loc", [(r["locality_prompt"], r["locality_ground_truth"]) for r in cf_train[:n_tune]]),
        # paraphrase signal: records that are neither evaluated nor tuned on, with their paraphrases
        ("zsre_para", [(p, r["answers"][0], r["subject"]) for r in zsre_train[n_tune:] for p in (r["src"], r["rephrase"])]),
        ("zsre_para_loc", [(r["loc"], r["loc_ans"]) for r in zsre_train[n_tune:]]),
        ("cf_para", [(p, r["ground_truth"], r["subject"]) for r in cf_train[n_tune:n_tune + args.cf_para_records]
                     for p in cf_statements(r, templates, args.cf_templates, rng, with_rephrase=True)]),
    ]
    if args.groups:
        names = [name for name, _ in groups]
        unknown = sorted(set(args.groups) - set(names))
        if unknown:
            raise SystemExit(f"--groups: unknown group(s) {unknown}; the groups are {names}")
        groups = [(name, items) for name, items in groups if name in args.groups]
    if args.subject_relations:
        pools: dict[str, list[str]] = {}
        for r in cf_edit + cf_train:
            pools.setdefault(record_relation(r, templates), []).append(clean(r["ground_truth"]))
        pools = {rel: sorted(set(a)) for rel, a in pools.items() if rel}
        forbidden: dict[str, set[str]] = {}
        for r in zsre_edit + zsre_train:
            forbidden.setdefault(r["subject"], set()).add(clean(r["alt"]))
        for r in cf_edit + cf_train:
            forbidden.setdefault(r["subject"], set()).add(clean(r["target_new"]))
        subjects = list(dict.fromkeys(item[2] for _, items in groups for item in items if len(item) == 3))
        groups.append(("subject_relations", subject_relations(subjects, templates, pools, args.subject_relations,
                                                              forbidden, rng)))
    held_out = {clean(r["rephrase"]) for r in zsre_edit + zsre_train[:n_tune]}
    held_out |= {clean(r["rephrase_prompt"]) for r in cf_edit + cf_train[:n_tune]}
    new_targets = {(clean(r["src"]), clean(r["alt"])) for r in zsre_edit + zsre_train}
    new_targets |= {(clean(r["prompt"]), clean(r["target_new"])) for r in cf_edit + cf_train}

    facts: dict[str, Fact] = {}
    stats = {"duplicates": 0, "conflicts": 0, "held_out_skipped": 0, "new_target_equals_truth": 0, "per_group": {}}
    for name, items in groups:
        kept = 0
        for prompt, answer, *subject in items:
            prompt, answer = clean(prompt), clean(answer)
            if not prompt or not answer:
                continue
            if (prompt, answer) in new_targets:
                stats["new_target_equals_truth"] += 1  # records whose `alt` is the true answer
            if prompt in held_out and not name.endswith("_src"):
                stats["held_out_skipped"] += 1  # an evaluated paraphrase is never trained on
                continue
            if prompt in facts:
                stats["duplicates" if facts[prompt].answer == answer else "conflicts"] += 1
                continue
            facts[prompt] = Fact(prompt, answer, name, *subject)
            kept += 1
        stats["per_group"][name] = kept
    stats["relations"] = len(templates)
    stats["templates"] = sum(len(t) for t in templates.values())
    return list(facts.values()), stats


def corpus_text(facts: list[Fact]) -> str:
    return "".join(f"{f.prompt} {f.answer}\n" for f in facts)


# --- tokenizer --------------------------------------------------------------------------------


def train_tokenizer(facts: list[Fact], vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("bos", "eos", "pad", "unk")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f"{f.prompt} {f.answer}" for f in facts), trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, clean_up_tokenization_spaces=False,
        **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()},
    )


def encode(tokenizer, facts: list[Fact]) -> list[tuple[list[int], list[int]]]:
    """(ids, answer mask) of ``prompt + " " + answer``; answer tokens are those whose character span
    ends after the separating space, the rule the benchmark's scorer uses."""
    texts = [f"{f.prompt} {f.answer}" for f in facts]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    return [(ids, [int(end > len(f.prompt) + 1) for _, end in offs])
            for ids, offs, f in zip(enc["input_ids"], enc["offset_mapping"], facts)]


def check_tokenizer(tokenizer, out_dir: Path) -> dict:
    """Reload from disk: identical ids and offsets, BOS prepended, target tokens decode back."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    samples = [("When did Joanes Leizarraga die?", "1601"), ("The mother tongue of Danielle Darrieux is", "French"),
               ("Antônio Cardoso is located in", "Bahia (Brazil) — ünïcödé ✓")]
    texts = [p + " " + t for p, t in samples]
    a, b = tokenizer(texts, return_offsets_mapping=True), reloaded(texts, return_offsets_mapping=True)
    assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"], "reload mismatch"
    for ids, offs, (p, t) in zip(b["input_ids"], b["offset_mapping"], samples):
        assert ids[0] == reloaded.bos_token_id, "BOS not prepended"
        tgt = [i for i, (_, e) in enumerate(offs) if e > len(p)]
        assert reloaded.decode([ids[i] for i in tgt]) == " " + t, "target tokens do not decode to ' ' + target"
    return {"bos_prepended": True, "reload_identical": True}


# --- training ---------------------------------------------------------------------------------


def make_batches(lengths: list[int], batch_size: int, rng: random.Random, pool: int = 50) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within pools of ``pool`` batches, shuffle the batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    for s in range(0, len(idx), batch_size * pool):
        part = sorted(idx[s:s + batch_size * pool], key=lengths.__getitem__)
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
        ids[r, :len(toks)] = torch.tensor(toks)
        att[r, :len(toks)] = 1
        labels[r, :len(toks)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(toks), -100)
    return ids, att, labels


def make_model(vocab_size: int, args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        hidden_act="silu", max_position_embeddings=args.max_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def sample_accuracy(model, encoded, pad_id: int, device, n: int = 512) -> float:
    """Teacher-forced token accuracy on the first ``n`` training facts (progress log)."""
    model.eval()
    hits = total = 0
    with torch.inference_mode():
        for s in range(0, min(n, len(encoded)), 64):
            ids, att, labels = (t.to(device) for t in collate(encoded, list(range(s, min(n, s + 64))), pad_id))
            pred = model(input_ids=ids, attention_mask=att).logits[:, :-1].argmax(-1)
            sel = labels[:, 1:] != -100
            hits += int((pred[sel] == labels[:, 1:][sel]).sum())
            total += int(sel.sum())
    model.train()
    return hits / max(1, total)


def epoch_facts(facts: list[Fact], prefix_prob: float, profile_prob: float, rng: random.Random) -> list[Fact]:
    """This epoch's copy of the corpus: with probability ``prefix_prob`` a fact is read after another
    fact's statement, so that knowledge does not depend on the question starting the text (editing
    methods read prompts after context prefixes); with probability ``profile_prob`` a fact about a
    subject is read after the subject's other facts, in a random order (a short profile)."""
    if not prefix_prob and not profile_prob:
        return facts
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        if f.subject:
            by_subject.setdefault(f.subject, []).append(f)
    out = []
    for f in facts:
        if profile_prob and len(by_subject.get(f.subject, ())) > 1 and rng.random() < profile_prob:
            others = [o for o in by_subject[f.subject] if o is not f]
            rng.shuffle(others)
            prefix = "".join(f"{o.prompt} {o.answer}. " for o in others)
            f = Fact(prefix + f.prompt, f.answer, f.source, f.subject)
        elif prefix_prob and rng.random() < prefix_prob:
            other = facts[rng.randrange(len(facts))]
            f = Fact(f"{other.prompt} {other.answer}. {f.prompt}", f.answer, f.source, f.subject)
        out.append(f)
    return out


def train(model, facts: list[Fact], tokenizer, args, device) -> dict:
    rng = random.Random(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    pad_id = tokenizer.pad_token_id
    total = math.ceil(len(facts) / args.batch_size) * args.epochs
    warmup = max(1, int(args.warmup * total))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    model.train()
    step, t0, history = 0, time.time(), []
    bar = tqdm(total=total, desc="train", unit="step", mininterval=5.0)
    for epoch in range(args.epochs):
        encoded = encode(tokenizer, epoch_facts(facts, args.prefix_prob, args.profile_prob, rng))
        ep_loss, ep_tok = 0.0, 0
        for batch in make_batches([len(ids) for ids, _ in encoded], args.batch_size, rng):
            ids, att, labels = (t.to(device) for t in collate(encoded, batch, pad_id))
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
            target = labels[:, 1:]
            answer = target != -100
            # the LM head only where there is a loss: answer tokens (and the other tokens when they count)
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[answer]), target[answer])
            if args.prompt_loss_weight:
                other = (att[:, 1:] == 1) & ~answer
                lm = torch.nn.functional.cross_entropy(model.lm_head(hidden[other]), ids[:, 1:][other])
                total_loss = loss + args.prompt_loss_weight * lm
            else:
                total_loss = loss
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ntok = int(answer.sum())
            ep_loss += float(loss.detach()) * ntok
            ep_tok += ntok
            step += 1
            bar.update(1)
        history.append(round(ep_loss / max(1, ep_tok), 4))
        bar.set_postfix(epoch=epoch + 1, loss=history[-1])
        fit = sample_accuracy(model, encoded, pad_id, device) if (epoch + 1) % 5 == 0 else float("nan")
        log.info("epoch %d/%d answer loss %.4f answer acc (sample) %.3f lr %.2e %.0fs", epoch + 1, args.epochs,
                 history[-1], fit, lr_at(step), time.time() - t0)
    bar.close()
    model.eval()
    return {"epochs": args.epochs, "steps": step, "train_seconds": round(time.time() - t0, 1), "answer_loss_per_epoch": history}


# --- evaluation (the benchmark's own teacher-forced scorer) --------------------------------------


def accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    from wise_bench.metrics import encode_pair, teacher_forced, token_accuracy

    seqs = [encode_pair(tokenizer, p, t) for p, t in pairs]
    scores = teacher_forced(model, seqs, tokenizer.pad_token_id, 64)
    return round(sum(token_accuracy(s.pred, s.gold) for s in scores) / len(scores), 4)


def evaluate(model, tokenizer, data_dir: Path, n_tune: int) -> dict:
    zsre = load_json(data_dir, "zsre_edit")[:1000]
    cf = load_json(data_dir, "cf_edit")
    zt = load_json(data_dir, "zsre_train")[:n_tune]
    ct = load_json(data_dir, "cf_train")[:n_tune]
    sets = {
        "zsre_true": [(r["src"], r["answers"][0]) for r in zsre],
        "zsre_loc": [(r["loc"], r["loc_ans"]) for r in zsre],
        "zsre_rephrase_true_held_out": [(r["rephrase"], r["answers"][0]) for r in zsre],
        "zsre_new_target_pre_edit": [(r["src"], r["alt"]) for r in zsre],
        "zsre_rephrase_new_target_pre_edit": [(r["rephrase"], r["alt"]) for r in zsre],
        "cf_true": [(r["prompt"], r["ground_truth"]) for r in cf],
        "cf_loc": [(r["locality_prompt"], r["locality_ground_truth"]) for r in cf],
        "cf_rephrase_true_held_out": [(r["rephrase_prompt"], r["ground_truth"]) for r in cf],
        "cf_new_target_pre_edit": [(r["prompt"], r["target_new"]) for r in cf],
        "zsre_tune_true": [(r["src"], r["answers"][0]) for r in zt],
        "zsre_tune_rephrase_true_held_out": [(r["rephrase"], r["answers"][0]) for r in zt],
        "cf_tune_true": [(r["prompt"], r["ground_truth"]) for r in ct],
    }
    return {name: accuracy(model, tokenizer, pairs) for name, pairs in sets.items()}


# --- main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="the benchmark data (default, as the app: $WISE_BENCH_DATA_DIR, else <repo>/data)")
    p.add_argument("--out", type=Path, default=Path("models/small"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU; weights are bit-identical only for the same count")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--tune-records", type=int, default=500, help="first N records of each train file: the tuning split")
    p.add_argument("--cf-templates", type=int, default=3, help="extra relation templates per CounterFact fact")
    p.add_argument("--cf-para-records", type=int, default=400, help="CounterFact train records trained with paraphrases")
    p.add_argument("--prompt-loss-weight", type=float, default=0.25,
                   help="weight of the next-token loss on the non-answer tokens (0: answers only)")
    p.add_argument("--prefix-prob", type=float, default=0.3,
                   help="share of facts read, each epoch, after another fact's statement")
    p.add_argument("--subject-relations", type=int, default=0,
                   help="invented facts of other relations added per subject (docs/small_model.md, candidate C)")
    p.add_argument("--profile-prob", type=float, default=0.0,
                   help="share of a subject's facts read, each epoch, after its other facts")
    p.add_argument("--groups", nargs="+", help="train only these corpus groups (a reduced candidate for a quick probe)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16", help="saved weights")
    p.add_argument("--no-save", action="store_true", help="train and evaluate only")
    return p.parse_args(argv)


def main(argv=None):
    import tokenizers
    import transformers

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.time()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")

    facts, stats = build_corpus(args.data_dir, args)
    tokenizer = train_tokenizer(facts, args.vocab_size, args.max_len)
    encoded = encode(tokenizer, facts)
    lengths = [len(ids) for ids, _ in encoded]
    if max(lengths) > args.max_len:
        raise SystemExit(f"a fact is {max(lengths)} tokens, over --max-len {args.max_len}")
    log.info("corpus: %d facts, %d tokens/epoch %s", len(facts), sum(lengths), stats["per_group"])

    model = make_model(len(tokenizer), args, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d x %d (mlp %d), %.2fM params", args.layers, args.hidden, args.intermediate, n_params / 1e6)
    train_info = train(model, facts, tokenizer, args, device)

    model = model.to(getattr(torch, args.dtype)).float().cpu()  # evaluate the weights as saved
    acc = evaluate(model, tokenizer, args.data_dir, args.tune_records)
    log.info("accuracies: %s", json.dumps(acc))
    if args.no_save:
        return acc

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    tok_check = check_tokenizer(tokenizer, out)
    model.to(getattr(torch, args.dtype)).save_pretrained(str(out))
    manifest = {
        "name": out.name,
        "build_command": f"python scripts/build_model.py --out {out} --seed {args.seed} --device {args.device}"
                         + (f" --threads {args.threads}" if device.type == "cpu" else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("data_dir", "out")},
        "params": n_params,
        "training": train_info,
        "corpus": {"facts": len(facts), "tokens_per_epoch": sum(lengths), **stats,
                   "sha256_corpus_text": sha256_bytes(corpus_text(facts).encode()),
                   "input_files": {rel: sha256_bytes((args.data_dir / rel).read_bytes()) for rel in FILES.values()}},
        "tokenizer": {"type": "byte-level BPE", "vocab": len(tokenizer), **tok_check},
        "accuracy": {"scorer": "teacher-forced token accuracy of prompt + ' ' + target (wise_bench.metrics)", **acc},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "build_seconds": round(time.time() - t_start, 1),
        "sha256_model_safetensors": sha256_bytes((out / "model.safetensors").read_bytes()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    log.info("saved to %s in %.0fs", out, manifest["build_seconds"])
    return acc


if __name__ == "__main__":
    main()
