"""PPO / GRPO: the math against direct reference implementations, and one update on the engine.

    python -m pytest -q tests/test_ppo.py

- GAE, KL estimators/controller, score placement, whitening, entropy: vs plain loops / torch.
- One PPO update (2 mini-batches x 2 epochs, actor + critic) from a FIXED rollout buffer under
  (tp, pp, dp) = (2, 2, 2) with SP and ZeRO-1 gives the same weights and metrics as one process
  (fp32); GRPO (groups of 2, no critic, KL in the loss) likewise.
- Log-probs recorded by the generator == those of the training forward (same weights, any layout).
- `train_ppo` resumes exactly (weights, metrics, KL controller).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from megatron_jinpan.parallel.local import free_port, set_worker_env
from megatron_jinpan.posttrain import ppo_losses as L

EOS = 2


# ---------------------------------------------------------------- math vs direct references
def _reference_gae(rewards, values, lengths, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_v = float(values[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[i, t]) + gamma * next_v - float(values[i, t])
            running = delta + gamma * lam * running
            adv[i, t] = running
    return adv, adv + values * (torch.arange(rewards.shape[1])[None] < torch.tensor(lengths)[:, None])


def test_gae_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3]
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).float()
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
        adv, ret = L.gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = _reference_gae(rewards * mask, values * mask, lengths, gamma, lam)
        torch.testing.assert_close(adv, ref_adv)
        torch.testing.assert_close(ret, ref_ret)
    # lam = 1, gamma = 1: the advantage is the return-to-go minus the value.
    adv, _ = L.gae(rewards, values, mask, 1.0, 1.0)
    togo = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (togo - values) * mask)


def test_score_lands_on_the_last_real_token_never_on_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    kl = torch.full((3, 5), 0.5)
    rewards = L.token_rewards(torch.tensor([10.0, 20.0, 30.0]), kl, mask, kl_coef=0.1)
    expected = -0.05 * mask
    expected[0, 2] += 10.0
    expected[1, 0] += 20.0
    expected[2, 4] += 30.0
    torch.testing.assert_close(rewards, expected)
    assert (rewards * (1 - mask)).abs().sum() == 0


def test_kl_estimators_and_adaptive_controller():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(L.kl_penalty(logp, ref, "k1"), logp - ref)
    r = ref - logp
    torch.testing.assert_close(L.kl_penalty(logp, ref, "k3"), r.exp() - r - 1)
    assert (L.kl_penalty(logp, ref, "k3") >= 0).all()
    # Ziegler et al.'s controller, written out.
    beta, target, horizon = 0.1, 6.0, 10000
    ctl = L.AdaptiveKLController(beta, target, horizon)
    for current, n in ((12.0, 64), (3.0, 64), (6.3, 128), (100.0, 32)):
        error = max(-0.2, min(0.2, current / target - 1))
        beta = beta * (1 + error * n / horizon)
        ctl.update(current, n)
        assert ctl.value == pytest.approx(beta, rel=1e-12)
    fixed = L.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


def test_whitening_policy_value_losses_and_entropy():
    g = torch.Generator().manual_seed(1)
    x, mask = torch.randn(4, 6, generator=g), (torch.rand(4, 6, generator=g) > 0.3).float()
    w = L.masked_whiten(x, mask)
    sel = w[mask.bool()]
    assert abs(float(sel.mean())) < 1e-6 and abs(float(sel.var(unbiased=False)) - 1) < 1e-4
    adv, old, new = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    loss, clipfrac, _ = L.policy_loss(new, old, adv, mask, 0.2)
    ratio = (new - old).exp()
    direct = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert float(loss) == pytest.approx(float((direct * mask).sum()), rel=1e-6)
    assert 0 <= float(clipfrac) <= float(mask.sum())
    vl, _ = L.value_loss(new, old, adv, mask, 0.2)
    vclip = old + (new - old).clamp(-0.2, 0.2)
    direct = 0.5 * torch.maximum((new - adv) ** 2, (vclip - adv) ** 2)
    assert float(vl) == pytest.approx(float((direct * mask).sum()), rel=1e-6)
    logits = torch.randn(2, 3, 10, generator=g)
    ent = L.vocab_parallel_entropy(logits, 7, None)
    ref = torch.distributions.Categorical(logits=logits[..., :7]).entropy()
    torch.testing.assert_close(ent, ref)
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    torch.testing.assert_close(L.group_advantages(scores, 2), torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5,
                               rtol=0)


# ---------------------------------------------------------------- one update on the engine
def _buffer(n_prompts: int, n_samples: int):
    """A fixed global rollout buffer: prompts, responses (some ending in EOS), scores."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n_prompts):
        prompt = torch.randint(3, 256, (3 + i % 5,), generator=g).tolist()
        for s in range(n_samples):
            resp = torch.randint(3, 256, (1 + (i + s) % 6,), generator=g).tolist()
            if (i + s) % 3 != 0:
                resp[-1] = EOS
            rows.append((i, prompt, resp, float(torch.randn((), generator=g)) + len(resp) * 0.1))
    return rows


def _ppo_overrides(advantage: str, n_samples: int):
    # Adam's eps at 1e-6: with 1e-8 an element whose gradient is ~1e-9 (fp32 summation-order noise
    # between layouts) moves by up to lr in either direction, which would test Adam, not the layout.
    return ["model.name=debug", "train.device=cpu", "train.micro_batch=1", "train.seed=7", "optim.lr=2e-3",
            "optim.warmup=0", "optim.schedule=constant", "optim.weight_decay=0.0", "optim.eps=1e-6",
            "ppo.mini_batch=4",
            "ppo.rollout_batch=" + str(8 // n_samples), f"ppo.n_samples={n_samples}", "ppo.epochs=2",
            f"ppo.advantage={advantage}", "ppo.kl_coef=0.1", "ppo.kl_estimator=k3", "ppo.entropy_coef=0.01",
            "ppo.temperature=0.9", "ppo.clip=0.05", "ppo.value_clip=0.05", "log.progress=false", "log.tensorboard=false"]


def _update_worker(rank, world, port, layout, out_path):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict
    from megatron_jinpan.posttrain import experience as X
    from megatron_jinpan.posttrain import ppo
    from megatron_jinpan.posttrain.generation import generate

    tp, pp, extra = layout
    mesh = ParallelMesh.create(tp, pp, torch.device("cpu"))
    out = {}
    try:
        for advantage, n_samples in (("gae", 1), ("grpo", 2)):
            cfg = load_config(None, _ppo_overrides(advantage, n_samples) + [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                                                            *extra])
            cfg.train.global_batch = cfg.ppo.mini_batch
            roles = ppo.build_roles(cfg, mesh)
            rows = _buffer(8 // n_samples, n_samples)
            mine = [r for r in rows if r[0] % mesh.dp == mesh.dp_rank]
            rollout = X.Rollout([r[1] for r in mine], [r[2] for r in mine], [r[2][-1] == EOS for r in mine],
                                torch.tensor([r[3] for r in mine]))
            mbs, exp = ppo.make_experience(roles, cfg, mesh, rollout, kl_coef=0.1)
            metrics = ppo.ppo_update(roles, cfg, mesh, mbs, step=0, kl_coef=0.1)
            res = {"actor": gather_full_state_dict(roles.actor, mesh), "metrics": metrics, "stats": exp.stats}
            if roles.critic is not None:
                res["critic"] = gather_full_state_dict(roles.critic, mesh)
            out[advantage] = res
        # Generation log-probs == training-forward log-probs (the updated GRPO actor, sampled).
        prompts = [r[1] for r in _buffer(4, 1)][mesh.dp_rank::mesh.dp]
        gen = generate(roles.actor, mesh, prompts, max_new_tokens=6, greedy=False, temperature=0.9, top_k=40,
                       eos_id=EOS, seed=3 + mesh.dp_rank)
        rollout = X.Rollout(prompts, gen.responses, gen.finished, torch.zeros(len(prompts)), gen.logprobs)
        _, exp = ppo.make_experience(roles, cfg, mesh, rollout, kl_coef=0.1)
        out["logprob_diff_max"] = exp.stats.get("logprob_diff_max")
        if mesh.is_logging_rank:
            torch.save(out, out_path)
        mesh.barrier()
    finally:
        mesh.destroy()


def _run_update(tmp_path, tp, pp, dp, extra=()):
    path = str(tmp_path / f"update_{tp}{pp}{dp}.pt")
    mp.spawn(_update_worker, args=(tp * pp * dp, free_port(), (tp, pp, list(extra)), path), nprocs=tp * pp * dp,
             join=True)
    return torch.load(path, weights_only=False)


def test_update_equivalence_3d_sp_zero1_and_grpo(tmp_path):
    one = _run_update(tmp_path, 1, 1, 1)
    many = _run_update(tmp_path, 2, 2, 2, ["parallel.sp=true", "parallel.zero=1"])
    for advantage in ("gae", "grpo"):
        a, b = one[advantage], many[advantage]
        roles = ("actor", "critic") if advantage == "gae" else ("actor",)
        assert ("critic" in a) == (advantage == "gae")
        for role in roles:
            for name, value in a[role].items():
                torch.testing.assert_close(b[role][name], value, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, n=name, r=role: f"{advantage} {r} {n}: {m}")
        for key in ("policy_loss", "clipfrac", "approx_kl", "entropy") + (("value_loss",) if advantage == "gae"
                                                                             else ("kl_loss",)):
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-4, abs=1e-6), key
        assert a["metrics"]["clipfrac"] > 0  # the second epoch moved the policy enough to clip
        for key in ("reward_mean", "kl", "response_len", "eos_rate"):
            assert b["stats"][key] == pytest.approx(a["stats"][key], rel=1e-5, abs=1e-6), key
    # The update changed the weights (an update that does nothing would pass the comparison).
    from megatron_jinpan.models import Llama, get_model_config, init_weights

    init = init_weights(Llama(get_model_config("debug")), 7).state_dict()
    assert not torch.allclose(one["gae"]["actor"]["layers.0.mlp.up_proj.weight"], init["layers.0.mlp.up_proj.weight"])
    for out in (one, many):
        assert out["logprob_diff_max"] < 1e-4


# ---------------------------------------------------------------- the loop: rule reward, resume
def _tokenizer_dir(path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz :?\n"):
        vocab[ch] = 3 + i
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)


def _loop_config(tmp_path, steps, extra=()):
    from megatron_jinpan.config import load_config

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                    ["say a", "say b", "count to three", "hi", "what is x"]))
    return load_config(None, [
        "model.name=debug", "train.device=cpu", f"train.steps={steps}", "train.micro_batch=2", "train.seed=3",
        f"data.tokenizer={tmp_path / 'tok'}", f"ppo.prompts={tmp_path / 'prompts.jsonl'}", "ppo.rollout_batch=4",
        "ppo.mini_batch=2", "ppo.max_new_tokens=5", "ppo.reward_fn=megatron_jinpan.posttrain.rewards:letter_a",
        "ppo.adaptive_kl=true", "ppo.kl_target=0.001", "ppo.kl_horizon=10", "optim.lr=1e-2", "optim.warmup=0",
        "checkpoint.interval=1", "log.progress=false", "log.tensorboard=false", f"run_dir={tmp_path / 'run'}",
        *extra])


def test_train_ppo_resumes_exactly_with_kl_controller(tmp_path):
    from megatron_jinpan.posttrain.ppo import train_ppo

    _tokenizer_dir(tmp_path / "tok")
    full, _, _ = train_ppo(_loop_config(tmp_path, 2, ["checkpoint.resume=never"]))
    assert full[1]["kl_coef"] != full[0]["kl_coef"]  # the adaptive controller moved
    for key in ("reward_mean", "reward_std", "score_rule", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "entropy", "explained_variance", "response_len", "eos_rate", "gen_time_s",
                "train_time_s", "gen_tokens_per_s", "logprob_diff_max"):
        assert key in full[0], key
    assert full[0]["logprob_diff_max"] < 1e-4
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert (tmp_path / "run" / "critic" / "checkpoints" / "latest").is_file()
    # Restart: one step, then resume for the second.
    import shutil

    shutil.rmtree(tmp_path / "run")
    train_ppo(_loop_config(tmp_path, 1, ["checkpoint.resume=never"]))
    resumed, roles, _ = train_ppo(_loop_config(tmp_path, 2))
    assert len(resumed) == 1
    for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "entropy"):
        assert resumed[0][key] == pytest.approx(full[1][key], rel=1e-6, abs=1e-9), key
    from megatron_jinpan import load_model

    model = load_model(tmp_path / "run")  # the actor, exported like any model
    assert model.cfg.head == "lm"


def test_bad_reward_function_and_roles(tmp_path):
    from megatron_jinpan.posttrain.ppo import PPOError, combine_scores, load_reward_fn, rule_scores
    from megatron_jinpan.config import load_config

    with pytest.raises(PPOError, match="module:function"):
        load_reward_fn("no_colon")
    with pytest.raises(PPOError, match="cannot be loaded"):
        load_reward_fn("megatron_jinpan.posttrain.rewards:missing")
    with pytest.raises(PPOError, match="returned 1 scores for 2"):
        rule_scores(lambda p, r: [1.0], "m:f", ["a", "b"], ["x", "y"])
    with pytest.raises(PPOError, match="raised ZeroDivisionError"):
        rule_scores(lambda p, r: [1 / 0], "m:f", ["a"], ["x"])
    cfg = load_config(None, [])
    with pytest.raises(PPOError, match="non-finite reward from ppo.reward_fn"):
        combine_scores(cfg.ppo, None, torch.tensor([math.nan]), [True])
    from megatron_jinpan.posttrain.ppo import check_ppo_config

    with pytest.raises(PPOError, match="ppo.prompts"):
        check_ppo_config(cfg, 1)
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    cfg = load_config(None, [f"ppo.prompts={tmp_path / 'p.jsonl'}", "ppo.reward_fn=m:f", "ppo.advantage=grpo"])
    with pytest.raises(PPOError, match="n_samples >= 2"):
        check_ppo_config(cfg, 1)
    # A reward model without a value head: named, before any process group work.
    from megatron_jinpan.posttrain.ppo import _check_role

    _tokenizer_dir(tmp_path / "hf")
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path / "hf")
    cfg = load_config(None, ["model.name=debug"])
    with pytest.raises(PPOError, match="no value head"):
        _check_role("reward model", "ppo.reward_model", str(tmp_path / "hf"), cfg, "value")
    cfg = load_config(None, ["model.name=debug", "model.vocab_size=300"])
    with pytest.raises(PPOError, match="same tokenizer"):
        _check_role("reference", "ppo.reference", str(tmp_path / "hf"), cfg, "lm")


def test_reward_model_and_critic_may_have_their_own_shape(tmp_path):
    """A reward model narrower than the actor (only the vocabulary is shared): the frozen RM and the
    critic started from it take the RM's shape; one PPO step scores with it."""
    import transformers

    from megatron_jinpan.posttrain.ppo import train_ppo

    _tokenizer_dir(tmp_path / "tok")
    rm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=0))
    rm.save_pretrained(tmp_path / "rm")
    records, roles, _ = train_ppo(_loop_config(tmp_path, 1, [
        "checkpoint.resume=never", "checkpoint.interval=0", f"ppo.reward_model={tmp_path / 'rm'}",
        "ppo.reward_model_weight=1.0"]))
    from megatron_jinpan.parallel.parallelize import unwrap

    reward, critic, actor = (unwrap(chunks[0]).cfg for chunks in (roles.reward, roles.critic, roles.actor))
    assert reward.hidden_size == 32 and critic.hidden_size == 32 and critic.head == "value"
    assert actor.hidden_size == 64 and actor.head == "lm"
    assert math.isfinite(records[0]["score_rm"]) and math.isfinite(records[0]["value_loss"])


def test_demo_answer_reads_every_phrasing_of_the_demo_sums():
    from megatron_jinpan.posttrain.rewards import demo_answer

    prompts = ["What is 3 plus 4?", "Add 3 and 4.", "Sum of 3 and 4?", "Compute 3 + 4.", "3加4等于多少？",
               "3和4的和是多少？", "3与4相加得几？", "计算：3+4=",
               "Anna Lee lives in Boston and spends 5 hours cycling every week. How many hours?"]
    assert demo_answer(prompts, ["7"] * 8 + ["5 hours"]) == [1.0] * 9
    assert demo_answer(prompts, ["8"] * 8 + ["7 hours"]) == [0.0] * 9
    assert demo_answer(["Add 3 and 4."], ["hello"]) == [0.0]
