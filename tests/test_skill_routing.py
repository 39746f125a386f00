"""What Claude Code shows the model of this plugin, and that a user's question finds one page in it.

Claude Code lists every skill, and every command that does not set ``disable-model-invocation``, to the model as one
line ``- curry-train:NAME: DESCRIPTION`` (``when_to_use`` appended as `` - WHEN``), the lines joined by newlines,
inside a budget shared by every plugin, the user's own skills and the bundled ones: 1% of the context window at 4
characters per token, 8,000 characters for a 200k-token model. Over budget it cuts descriptions, down to the bare
name. Our whole listing stays within half of that, 4,000 characters, and no entry over 200.

Routing: each entry *owns* a few terms, the words a user types for the one thing that page answers. An owned term
appears in its entry's description and in no other entry's. Each row of ``ROUTES`` is a realistic question; it must
contain an owned term of the entry meant to answer it and no owned term of any other entry, so a router reading the
listing alone lands on one page. Contested questions (a loss spike, resuming, an activation OOM, which parallelism
first, a slow step) are decided here, and the pages that do not own them point to the owner in their bodies.
"""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "curry-train"
PAGES = sorted((ROOT / "skills").glob("*/SKILL.md"))
COMMANDS = sorted((ROOT / "commands").glob("*.md"))
BUDGET, ENTRY_MAX = 4000, 200


def _frontmatter(path: Path) -> dict:
    _, fm, _ = path.read_text().split("---\n", 2)
    return yaml.safe_load(fm)


def entries() -> dict[str, str]:
    """``{name: description}`` of every listed skill and command, as Claude Code builds the listing."""
    out = {}
    for path in [*PAGES, *COMMANDS]:
        fm = _frontmatter(path)
        if fm.get("disable-model-invocation"):
            continue
        name = fm.get("name") or (path.parent.name if path.name == "SKILL.md" else path.stem)
        desc = fm["description"] + (f" - {fm['when_to_use']}" if fm.get("when_to_use") else "")
        out[name] = desc
    return out


def listing() -> str:
    return "\n".join(f"- {PLUGIN}:{name}: {desc}" for name, desc in entries().items())


def test_listing_fits_half_the_default_budget():
    text = listing()
    assert len(text) <= BUDGET, f"the listing takes {len(text)} characters, over {BUDGET}"
    long = {line[:60]: len(line) for line in text.splitlines() if len(line) > ENTRY_MAX}
    assert not long, f"entries over {ENTRY_MAX} characters: {long}"


def test_no_name_is_both_a_skill_and_a_command():
    skills = {p.parent.name for p in PAGES}
    commands = {p.stem for p in COMMANDS}
    assert not skills & commands, skills & commands


def test_descriptions_leave_the_api_and_numbers_to_the_body():
    for name, desc in entries().items():
        assert "curry_train" not in desc and "python -m" not in desc, f"{name}: the API goes in the body"
        assert not re.search(r"\d(\.\d+)?\s?(%|x|ms|s|GB|MB)\b", desc), f"{name}: measured numbers go in the body"


OWNED = {
    "bench": ["training step slow", "mfu", "tokens/s"],
    "primitive-context-parallel": ["long context", "ring attention", "context parallel"],
    "primitive-dcp": ["resume", "preemption", "reshard", "damaged checkpoint"],
    "primitive-distributed-optimizer": ["optimizer state", "optimizer step", "zero-1", "deepspeed", "fsdp"],
    "primitive-gradient-accumulation": ["gradient accumulation", "bigger batch", "effective batch size", "micro-batch"],
    "primitive-moe": ["mixture of experts", "moe", "expert", "router", "dropped tokens"],
    "primitive-parallel-state": ["process group", "device mesh", "world size", "hsdp"],
    "primitive-pipeline-schedule": ["pipeline", "1f1b", "bubble", "dualpipev", "gpipe"],
    "primitive-recompute": ["out of memory", "activation checkpointing", "gradient checkpointing", "selective"],
    "primitive-tp-linear": ["tensor parallel", "megatron", "matmuls", "sequence and loss parallel"],
    "stage1-preflight-asserts": ["sanity-check", "overfit one batch", "causal mask", "no grad"],
    "stage2-grad-flow-viz": ["vanishing", "exploding gradients", "isn't learning", "gradient-flow"],
    "stage3-kill-criterion": ["kill this run", "seed noise", "worse than the baseline"],
    "stage3-lr-range-test": ["learning rate", "lr finder", "range test"],
    "stage3-small-scale-ablation": ["real or noise", "how many seeds", "a/b"],
    "stage3-surrogate-task": ["toy task", "associative recall", "memory mechanism"],
    "stage4-capacity-planning": ["will my model fit", "how many gpus", "per-gpu memory"],
    "stage4-parallel-primitive-intro": ["which parallelism", "stopped scaling", "outgrew one gpu"],
    "stage5-checkpoint-cadence": ["how often should i checkpoint", "mtbf", "checkpoint size"],
    "stage5-loss-spike-rollback": ["loss spiked", "diverged", "roll back"],
    "stage6-ablation-matrix": ["which of my changes", "leave-one-out", "ablation table"],
    "stage0-train-on-my-data": ["my own data", "tokenizer", "hugging face", "tensorboard", "validation loss"],
    "add-primitive": ["existing repo"],
    "bench-run": ["run the benchmark"],
    "plan": ["capacity planner"],
    "scaffold": ["new llm training repo"],
}

ROUTES = [
    # the contested questions: one owner each
    ("My loss spiked at step 40k and stayed up, what do I do?", "stage5-loss-spike-rollback"),
    ("The run diverged overnight; can it go back on its own?", "stage5-loss-spike-rollback"),
    ("How do I roll back to the last good checkpoint and skip the bad batches?", "stage5-loss-spike-rollback"),
    ("How do I resume training after the job crashed?", "primitive-dcp"),
    ("The cluster sends a preemption notice; how do I not lose the run?", "primitive-dcp"),
    ("I'm out of memory on activations during backward", "primitive-recompute"),
    ("13B on 16 GPUs: which parallelism do I add first?", "stage4-parallel-primitive-intro"),
    ("Training stopped scaling when I went from 8 to 32 GPUs", "stage4-parallel-primitive-intro"),
    ("Is my training step slow compared to what the GPU can do?", "bench"),
    ("Should I kill this run?", "stage3-kill-criterion"),
    # one or more per page
    ("What is my MFU on this H100, and is 40% MFU good for a 1B model?", "bench"),
    ("How many tokens/s does my model train at?", "bench"),
    ("I want 128k long context but one device cannot hold it", "primitive-context-parallel"),
    ("How do I set up ring attention across 4 GPUs?", "primitive-context-parallel"),
    ("Can I reshard checkpoint files from 8 GPUs onto 4?", "primitive-dcp"),
    ("Is a damaged checkpoint detected before I train on it?", "primitive-dcp"),
    ("Should I use FSDP1 vs FSDP2 for my 1B model?", "primitive-distributed-optimizer"),
    ("Which DeepSpeed stage equivalent should I use in plain PyTorch?", "primitive-distributed-optimizer"),
    ("How do I shard optimizer state across data-parallel ranks?", "primitive-distributed-optimizer"),
    ("How do I do gradient accumulation without breaking the loss?", "primitive-gradient-accumulation"),
    ("What effective batch size do I get with 4 micro-batches on 8 GPUs?", "primitive-gradient-accumulation"),
    ("I need a bigger batch than my GPU holds", "primitive-gradient-accumulation"),
    ("How do I add a Mixtral-style MoE layer to my transformer?", "primitive-moe"),
    ("Why are there dropped tokens in my mixture of experts?", "primitive-moe"),
    ("What does the router z-loss do?", "primitive-moe"),
    ("How should I lay out my device mesh for dp x tp x cp?", "primitive-parallel-state"),
    ("Which ranks end up in the same process group?", "primitive-parallel-state"),
    ("I get 'parallel.dp * pp * cp * tp != world size', what's wrong?", "primitive-parallel-state"),
    ("How do I run HSDP across two nodes?", "primitive-parallel-state"),
    ("1F1B or interleaved, which pipeline schedule should I pick?", "primitive-pipeline-schedule"),
    ("How big is the bubble with 8 microbatches?", "primitive-pipeline-schedule"),
    ("Does DualPipeV help my setup?", "primitive-pipeline-schedule"),
    ("How do I turn on gradient checkpointing in my GPT?", "primitive-recompute"),
    ("What is selective activation checkpointing and how much does it save?", "primitive-recompute"),
    ("How do I write a column-wise tensor parallel linear layer?", "primitive-tp-linear"),
    ("How do I split the matmuls across GPUs Megatron-style?", "primitive-tp-linear"),
    ("Can you sanity-check my model before I launch the run?", "stage1-preflight-asserts"),
    ("Is my causal mask leaking future tokens?", "stage1-preflight-asserts"),
    ("Can my model overfit one batch?", "stage1-preflight-asserts"),
    ("I think I have vanishing gradients in the deep layers", "stage2-grad-flow-viz"),
    ("Which layer isn't learning?", "stage2-grad-flow-viz"),
    ("How much seed noise is normal in a loss curve?", "stage3-kill-criterion"),
    ("Is my run worse than the baseline at this point?", "stage3-kill-criterion"),
    ("Is there an LR finder like lr_find in fastai?", "stage3-lr-range-test"),
    ("What peak learning rate should I use?", "stage3-lr-range-test"),
    ("Is this improvement real or noise?", "stage3-small-scale-ablation"),
    ("How many seeds do I need to compare two configs?", "stage3-small-scale-ablation"),
    ("Can I check my idea on a toy task before training on real text?", "stage3-surrogate-task"),
    ("Can my linear attention do associative recall?", "stage3-surrogate-task"),
    ("Does my new memory mechanism work at all?", "stage3-surrogate-task"),
    ("Will my model fit on 8 A100s with 80 GB each?", "stage4-capacity-planning"),
    ("How many GPUs do I need for a 13B model at 4k context?", "stage4-capacity-planning"),
    ("I outgrew one GPU, what now?", "stage4-parallel-primitive-intro"),
    ("How often should I checkpoint a week-long run?", "stage5-checkpoint-cadence"),
    ("Given the MTBF of my cluster, what checkpoint interval is optimal?", "stage5-checkpoint-cadence"),
    ("What checkpoint size does a 7B model with Adam have?", "stage5-checkpoint-cadence"),
    ("I made five changes at once; which of my changes mattered?", "stage6-ablation-matrix"),
    ("How do I run a leave-one-out study over my tricks?", "stage6-ablation-matrix"),
    ("How do I train on my own data instead of the stdlib corpus?", "stage0-train-on-my-data"),
    ("Can I train a BPE tokenizer for my corpus?", "stage0-train-on-my-data"),
    ("How do I export my checkpoint to Hugging Face transformers?", "stage0-train-on-my-data"),
    ("Where do I see the validation loss, in TensorBoard?", "stage0-train-on-my-data"),
    ("Copy the recompute code into my existing repo", "add-primitive"),
    ("Run the benchmark on my model now", "bench-run"),
    ("Run the capacity planner for 70B on 256 GPUs", "plan"),
    ("Start a new LLM training repo for me", "scaffold"),
]


def test_every_entry_owns_terms_and_every_route_names_a_listed_entry():
    assert set(OWNED) == set(entries()), set(OWNED) ^ set(entries())
    assert {name for _, name in ROUTES} == set(entries()), "every entry is the answer to at least one question"
    assert len({q for q, _ in ROUTES}) == len(ROUTES), "duplicate question"


@pytest.mark.parametrize("name", sorted(OWNED))
def test_owned_terms_appear_in_their_entry_only(name):
    descriptions = {n: d.lower() for n, d in entries().items()}
    for term in OWNED[name]:
        assert term in descriptions[name], f"{name}: description lacks its owned term {term!r}"
        others = sorted(n for n, d in descriptions.items() if n != name and term in d)
        assert not others, f"{name}'s term {term!r} also appears in {others}"


@pytest.mark.parametrize("question,name", ROUTES, ids=[f"{n}:{q[:40]}" for q, n in ROUTES])
def test_question_routes_to_exactly_one_entry(question, name):
    q = question.lower()
    hits = sorted(n for n, terms in OWNED.items() if any(t in q for t in terms))
    assert hits == [name], f"{question!r} hits {hits}, meant for {name}"


LINK_RE = re.compile(r"skills/([a-z0-9][a-z0-9-]*)|`((?:primitive-|stage\d)[a-z0-9-]*|bench)`")


def _links(text: str) -> set[str]:
    return {a or b for a, b in LINK_RE.findall(text)}


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.parent.name)
def test_cross_links_resolve(path):
    folders = {p.parent.name for p in PAGES}
    broken = sorted(_links(path.read_text()) - folders)
    assert not broken, f"{path.parent.name} links to missing skills: {broken}"


def test_link_pattern_sees_links():
    assert _links("see `primitive-dcp`, skills/bench/SKILL.md and `stage3-lr-range-test`") == {
        "primitive-dcp", "bench", "stage3-lr-range-test"}
