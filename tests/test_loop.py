"""The loop's public builders (jaxrl_geom.loop) against hand-built references."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_geom import sharding
from jaxrl_geom.config import load_config
from jaxrl_geom.longact import check_chain
from jaxrl_geom.loop import (
    build_optimizer,
    build_policy,
    collect_rollouts_dynamic,
    demonstrations,
    held_out_examples,
    sample_examples,
)
from jaxrl_geom.tasks import get_task
from jaxrl_geom.tokenizers import CharTokenizer

TOK = CharTokenizer()


def test_demonstrations_layout():
    """Row i is [pad.. BOS prompt | demonstration EOS pad..]; the completion mask covers
    demonstration + EOS, the prompt mask the real prompt tokens."""
    task = get_task("worked_addition", num_digits=2)  # demonstrations of varying length
    examples = task.sample_prompts(np.random.default_rng(0), 6)
    length = 24
    b = jax.device_get(demonstrations(examples, task=task, tokenizer=TOK, max_new_tokens=length))
    p = b.tokens.shape[1] - length
    for i, e in enumerate(examples):
        prompt = TOK.encode(e.prompt)
        demo = TOK.encode(task.demonstration(e), add_bos=False) + [TOK.eos_id]
        row = [TOK.pad_id] * (p - len(prompt)) + prompt + demo
        row += [TOK.pad_id] * (length - len(demo))
        np.testing.assert_array_equal(b.tokens[i], row)
        np.testing.assert_array_equal(b.completion_mask[i], np.arange(length) < len(demo))
        np.testing.assert_array_equal(b.attention_mask[i, :p], np.arange(p) >= p - len(prompt))
    with pytest.raises(ValueError, match="max_new_tokens"):
        demonstrations(examples, task=task, tokenizer=TOK, max_new_tokens=4)


def test_held_out_examples_are_fixed_and_excluded():
    cfg = load_config(None, ["eval_prompts=32", "seed=3"])
    task = get_task("arithmetic", num_digits=1)  # 100 distinct prompts: collisions are sure
    held_out = held_out_examples(cfg, task=task)
    assert [e.prompt for e in held_out] == [e.prompt for e in held_out_examples(cfg, task=task)]
    prompts = {e.prompt for e in held_out}
    train = sample_examples(task, rng=np.random.default_rng(3), n=200, exclude=prompts)
    assert len(train) == 200 and not prompts & {e.prompt for e in train}
    assert len(prompts) == len(held_out) == 32  # distinct, although the draws collide


def test_held_out_examples_prefix_and_exhaustion():
    """A smaller held-out set is the start of a larger one (what ``jaxrl-geom eval
    --prompts n`` scores); asking for more prompts than the task has is an error, and so
    is sampling once every prompt is held out (no endless loop)."""
    task = get_task("arithmetic", num_digits=1)  # exactly 100 distinct prompts
    small = held_out_examples(load_config(None, ["eval_prompts=40"]), task=task)
    large = held_out_examples(load_config(None, ["eval_prompts=100"]), task=task)
    assert [e.prompt for e in large[:40]] == [e.prompt for e in small]
    assert len({e.prompt for e in large}) == 100
    with pytest.raises(ValueError, match="eval_prompts=101"):
        held_out_examples(load_config(None, ["eval_prompts=101"]), task=task)
    with pytest.raises(ValueError, match="lower eval_prompts"):
        sample_examples(task, rng=np.random.default_rng(0), n=4, exclude={e.prompt for e in large})


def test_dynamic_sampling_needs_a_try():
    with pytest.raises(ValueError, match="max_tries must be >= 1; got 0"):
        collect_rollouts_dynamic(
            None, next_examples=list, max_tries=0, key=jax.random.key(0),
            num_generations=2, max_new_tokens=2,
        )  # fmt: skip


def test_build_policy_passes_remat_to_a_checkpoint(tmp_path):
    """``model.remat`` holds for an HF checkpoint as for the preset."""
    from jaxrl_geom.models import save_pretrained

    tiny = load_config(None, ["model.hidden_size=32", "model.num_layers=1"])
    save_pretrained(build_policy(tiny, tokenizer=TOK), tmp_path)
    for remat in (False, True):
        cfg = load_config(None, [f"model.path={tmp_path}", f"model.remat={remat}"])
        assert build_policy(cfg, tokenizer=TOK).config.remat is remat


def test_build_policy_and_optimizer_follow_the_config():
    cfg = load_config(
        None,
        ["model.hidden_size=32", "model.num_layers=1", "optim.learning_rate=0.01"]
        + ["optim.weight_decay=0.1", "optim.max_grad_norm=0.5", "optim.b2=0.9"],
    )
    policy = build_policy(cfg, tokenizer=TOK)
    placed = build_policy(cfg, tokenizer=TOK, mesh=sharding.make_mesh())
    assert policy.config.vocab_size == TOK.vocab_size and policy.config.num_hidden_layers == 1
    params = nnx.state(policy, nnx.Param)
    placed_params = nnx.state(placed, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, params, placed_params)  # same seed, any mesh
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    reference = optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(0.01, b1=0.9, b2=0.9, weight_decay=0.1)
    )
    tx = build_optimizer(cfg, model_config=policy.config)

    def first_update(t):  # one compile per chain instead of one per eager op
        return jax.jit(lambda g, p: t.update(g, t.init(p), p)[0])(grads, params)

    got, want = first_update(tx), first_update(reference)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with_longact = load_config(None, ["longact.enabled=true", "longact.keep_ratio=0.5"])
    check_chain(build_optimizer(with_longact, model_config=policy.config), params)
