"""Routing: a realistic user question must reach exactly one skill.

Each row is (question, distinctive phrase taken from the question, skill that must answer it). The phrase must appear
(case-insensitive) in that skill's ``description`` and in no other skill's description, so an agent matching the
user's words against descriptions lands on one page. A second test checks that every cross-link between pages
(``skills/<name>`` or a backticked ``primitive-*`` / ``stage*-*`` / ``bench``) names an existing skill folder.
"""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "skills").glob("*/SKILL.md"))


def _description(path: Path) -> str:
    _, fm, _ = path.read_text().split("---\n", 2)
    return yaml.safe_load(fm)["description"]


DESCRIPTIONS = {p.parent.name: _description(p).lower() for p in PAGES}

ROUTES = [
    # (question, distinctive phrase, skill)
    ("What is my MFU on this H100 with the reference GPT?", "what is my MFU", "bench"),
    ("How many tokens per second does my model train at?", "tokens per second", "bench"),
    ("Is my training step slow compared to what the GPU can do?", "is my training step slow", "bench"),
    ("I want to train with 128k context but attention runs out of memory", "128k context", "primitive-context-parallel"),
    ("How do I set up ring attention across 4 GPUs?", "ring attention", "primitive-context-parallel"),
    ("My sequence too long to fit on one device, what now?", "sequence too long", "primitive-context-parallel"),
    ("How do I resume training after the job got preempted?", "resume training", "primitive-dcp"),
    ("I have a corrupt checkpoint after a crash, how do I recover?", "corrupt checkpoint", "primitive-dcp"),
    ("Can I reshard checkpoint files from 8 GPUs onto 4?", "reshard checkpoint", "primitive-dcp"),
    ("Should I use FSDP1 vs FSDP2 for my 1B model?", "FSDP1 vs FSDP2", "primitive-distributed-optimizer"),
    ("Which DeepSpeed stage equivalent should I use in plain PyTorch?", "DeepSpeed stage", "primitive-distributed-optimizer"),
    ("How do I shard optimizer state across data-parallel ranks?", "shard optimizer state", "primitive-distributed-optimizer"),
    ("How do I accumulate gradients without breaking the loss?", "accumulate gradients", "primitive-gradient-accumulation"),
    ("What effective batch size do I get with 4 micro-batches on 8 GPUs?", "effective batch size", "primitive-gradient-accumulation"),
    ("Should I wrap the early micro-batches in no_sync?", "no_sync", "primitive-gradient-accumulation"),
    ("How do I add a Mixtral-style MoE layer to my transformer?", "Mixtral-style MoE", "primitive-moe"),
    ("Why do tokens get dropped in my MoE layer?", "why do tokens get dropped", "primitive-moe"),
    ("What does the router z-loss do?", "router z-loss", "primitive-moe"),
    ("How do I use DeepSeek aux-loss-free balancing?", "aux-loss-free", "primitive-moe"),
    ("How should I lay out my device mesh for dp x tp x pp?", "device mesh", "primitive-parallel-state"),
    ("Which ranks end up in the same process groups?", "process groups", "primitive-parallel-state"),
    ("I get 'parallel.dp * pp * cp * tp != world size', what's wrong?", "!= world size", "primitive-parallel-state"),
    ("1F1B or interleaved, which pipeline schedule should I pick?", "which pipeline schedule", "primitive-pipeline-schedule"),
    ("How big is the pipeline bubble with 8 microbatches?", "pipeline bubble", "primitive-pipeline-schedule"),
    ("Does DualPipeV help my setup?", "DualPipeV", "primitive-pipeline-schedule"),
    ("How do I turn on gradient checkpointing in my GPT?", "gradient checkpointing", "primitive-recompute"),
    ("I'm out of memory on activations during backward", "out of memory on activations", "primitive-recompute"),
    ("What is selective checkpointing and how much does it save?", "selective checkpointing", "primitive-recompute"),
    ("How do I write a column parallel linear layer?", "column parallel linear", "primitive-tp-linear"),
    ("How do I split matmul across GPUs Megatron-style?", "split matmul across GPUs", "primitive-tp-linear"),
    ("What is loss parallel and when do I use it?", "loss parallel", "primitive-tp-linear"),
    ("Can you sanity check my model before I launch the run?", "sanity check my model", "stage1-preflight-asserts"),
    ("Is my causal mask leaking future tokens?", "causal mask leaking", "stage1-preflight-asserts"),
    ("Can my model overfit a single batch?", "overfit a single batch", "stage1-preflight-asserts"),
    ("I think I have vanishing gradients in the deep layers", "vanishing gradients", "stage2-grad-flow-viz"),
    ("Plot per-layer gradient norms for me", "per-layer gradient norms", "stage2-grad-flow-viz"),
    ("Which layer is not learning?", "which layer is not learning", "stage2-grad-flow-viz"),
    ("Should I stop a bad run early or let it go?", "stop a bad run early", "stage3-kill-criterion"),
    ("How much seed noise is normal in a loss curve?", "seed noise", "stage3-kill-criterion"),
    ("Is my run worse than the baseline at this point?", "worse than the baseline", "stage3-kill-criterion"),
    ("Is there a learning rate finder like lr_find in fastai?", "learning rate finder", "stage3-lr-range-test"),
    ("My loss explodes when I raise the LR, what peak LR should I use?", "loss explodes when I raise the LR", "stage3-lr-range-test"),
    ("Can you run an LR range test on my model?", "LR range test", "stage3-lr-range-test"),
    ("Is this improvement real or just noise?", "real or just noise", "stage3-small-scale-ablation"),
    ("How many seeds do I need to compare two configs?", "how many seeds do I need", "stage3-small-scale-ablation"),
    ("Should I scale this up or not?", "should I scale this up", "stage3-small-scale-ablation"),
    ("My model no longer fits on one GPU, which parallelism do I need?", "which parallelism do I need", "stage4-parallel-primitive-intro"),
    ("Training got slower when I added GPUs, why?", "slower when I added GPUs", "stage4-parallel-primitive-intro"),
    ("How do I scale past one node?", "scale past one node", "stage4-parallel-primitive-intro"),
    ("How often to checkpoint a week-long run?", "how often to checkpoint", "stage5-checkpoint-cadence"),
    ("Given the MTBF of my cluster, what checkpoint interval is optimal?", "checkpoint interval", "stage5-checkpoint-cadence"),
    ("How big is a checkpoint for a 7B model with Adam?", "how big is a checkpoint", "stage5-checkpoint-cadence"),
    ("My loss spiked at step 40k and stayed up, what do I do?", "my loss spiked", "stage5-loss-spike-rollback"),
    ("Can the run recover automatically from a loss spike while I sleep?", "recover automatically from a loss spike",
     "stage5-loss-spike-rollback"),
    ("How do I roll back to the last good checkpoint and skip the bad batches?",
     "roll back to the last good checkpoint", "stage5-loss-spike-rollback"),
    ("Will my model fit on 8 A100s with FSDP?", "will my model fit", "stage4-capacity-planning"),
    ("How many GPUs do I need for a 13B model at 4k context?", "how many GPUs do I need", "stage4-capacity-planning"),
    ("Help me set up an ablation study for my paper", "ablation study", "stage6-ablation-matrix"),
    ("I made five changes at once; which changes matter?", "which changes matter", "stage6-ablation-matrix"),
    ("How do I run a leave-one-out ablation over my tricks?", "leave-one-out ablation", "stage6-ablation-matrix"),
    ("Can I check my idea on a toy task before training on real text?", "toy task", "stage3-surrogate-task"),
    ("Is there a synthetic task that tests long-range attention?", "synthetic task", "stage3-surrogate-task"),
    ("How do I know if my new attention variant really works? does my attention change work at all?", "does my attention change work", "stage3-surrogate-task"),
    ("Can my linear attention do associative recall?", "associative recall", "stage3-surrogate-task"),
]


def test_routing_table_is_large_enough():
    assert len(ROUTES) >= 40
    assert len({q for q, _, _ in ROUTES}) == len(ROUTES), "duplicate question"


@pytest.mark.parametrize("question,phrase,skill", ROUTES, ids=[f"{s}:{p}" for _, p, s in ROUTES])
def test_question_routes_to_exactly_one_skill(question, phrase, skill):
    assert skill in DESCRIPTIONS, f"no skill folder {skill!r}"
    assert phrase.lower() in question.lower(), f"phrase {phrase!r} is not taken from the question"
    assert phrase.lower() in DESCRIPTIONS[skill], f"{skill}: description lacks {phrase!r}"
    others = sorted(name for name, desc in DESCRIPTIONS.items() if name != skill and phrase.lower() in desc)
    assert not others, f"{phrase!r} also appears in the description of {others}"


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
