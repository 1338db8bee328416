"""The RL training forward against independent formulations, on the tiny model in one process: per-token
log-probs and entropy of packed replies (logits at the reply positions only, vocab-parallel cross entropy)
equal a full forward's log-softmax; and the per-pack (sum, unit) the loss reports adds up, over packs, to the
published GRPO objective over the whole batch, for the sequence-mean (Keye-VL) and token-mean (DAPO) forms;
and the gradients through that path equal those of the objective written out on a full forward."""

import torch

from keye.testing.distributed import run_distributed

CLIP = 0.2


def _tiny_model_and_packs():
    from pathlib import Path

    from keye.config import load_blueprint
    from keye.data.pipeline import load_tokenizer
    from keye.data.processor import Processor, ProcessorSettings
    from keye.data.tokenizer import SpecialTokens
    from keye.data.synthetic import generate
    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import PluginHost
    from keye.rl.packing import pack_rollouts
    from keye.rl.prompts import prompt_of
    from keye.rl.rollouts import Rollout, render
    from keye_plugins.video_decoder.decord import DecordVideoDecoder

    parallel = init_parallel(tensor=1, pipeline=1, seed=7)
    host = PluginHost(strict=False)
    host.load_entry_points()
    base = Path(__file__).resolve().parents[2] / "blueprints" / "tiny" / "base.yaml"
    blueprint = load_blueprint(base, [], host.registry)
    tokenizer = load_tokenizer("synthetic")
    special = SpecialTokens.from_tokenizer(tokenizer)
    model = KeyeVLModel(blueprint.model, host.registry, BuildContext(parallel, seed=7),
                        image_token_id=special.image_pad, video_token_id=special.video_pad).eval()
    settings = ProcessorSettings(image_max_tokens=16, video_max_tokens=64, video_max_frame_tokens=16,
                                 video_min_frame_tokens=4)
    processor = Processor(tokenizer, settings, DecordVideoDecoder())
    prompts = [prompt_of(generate(index, tasks=["rl"], seed=3)) for index in range(3)]
    rendered = render(prompts, ["think", "no_think", None], processor, group_size=2, max_tokens=256,
                      max_new_tokens=16, skipped={})
    generator = torch.Generator().manual_seed(0)
    rollouts = []
    for group, item in enumerate(rendered):  # replies of random text ids (no vision pads), 3-9 tokens
        for _ in range(2):
            ids = torch.randint(10, 300, (int(torch.randint(3, 10, (1,), generator=generator)),), generator=generator)
            rollouts.append(Rollout(group, item, ids.tolist(), [0.0] * len(ids), "stop", ""))
    advantages = torch.randn(len(rollouts), generator=generator)
    weights = torch.ones(len(rollouts))
    weights[1] = 0.0  # one rollout rides along without loss
    packs = pack_rollouts(rollouts, list(range(len(rollouts))), advantages, weights, max_tokens=128)
    return model, packs, rollouts, advantages, weights


def _check() -> dict:
    from keye.rl.logps import reply_logits, reply_targets, token_logps
    from keye.rl.step import _LossSums, _policy_loss
    from keye_plugins.loss.grpo import GRPOLoss

    model, packs, rollouts, advantages, weights = _tiny_model_and_packs()
    out = {"packs": len(packs), "logp": [], "expected_logp": [], "entropy": [], "expected_entropy": []}
    for pack in packs:
        batch = pack.batch
        with torch.no_grad():
            logp, entropy = token_logps(reply_logits(model, pack), reply_targets(pack))
            full = model(batch.input_ids, batch.position_ids, batch.attention_mask, images=batch.images,
                         videos=batch.videos)[0].double().log_softmax(-1)  # (T, V): every position
        keep = batch.loss_mask[0] != 0
        out["logp"].append(logp)
        out["expected_logp"].append(full[keep].gather(1, batch.labels[0][keep].unsqueeze(1))[:, 0])
        out["entropy"].append(entropy)
        out["expected_entropy"].append(-(full[keep].exp() * full[keep]).sum(-1))
        pack.old_logp = logp - 0.3 * torch.sin(torch.arange(len(logp), dtype=torch.float32))  # ratios off 1

    for aggregation in ("sequence_mean", "token_mean"):
        loss = GRPOLoss(GRPOLoss.Config(clip_low=CLIP, clip_high=CLIP, aggregation=aggregation))
        total, units = 0.0, 0
        for pack in packs:
            with torch.no_grad():
                value, count, reported = _policy_loss(loss, pack, _LossSums(), reply_logits(model, pack))
            total += float(value)
            units += int(count)
            assert float(reported["loss_sum"]) == float(value)
        # independent: the published objective over all trained rollouts of the batch
        terms = []
        for pack, logp in zip(packs, out["logp"]):
            offsets = [0, *torch.tensor(pack.lengths).cumsum(0).tolist()]
            for j, index in enumerate(pack.rollouts):
                if weights[index] == 0:
                    continue
                new = logp[offsets[j]: offsets[j + 1]].double()
                old = pack.old_logp[offsets[j]: offsets[j + 1]].double()
                ratio = torch.exp(new - old)
                a = float(advantages[index])
                objective = torch.minimum(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a)
                terms.append(-objective)
        if aggregation == "sequence_mean":
            expected = sum(float(t.mean()) for t in terms) / len(terms)
        else:
            expected = sum(float(t.sum()) for t in terms) / sum(len(t) for t in terms)
        out[aggregation] = (total / units, expected, units)
    out["grad"] = _gradients(model, packs[0], advantages, weights)
    out["trained"] = int(weights.sum())
    out["reply_tokens"] = sum(len(rollouts[i].token_ids) for i in range(len(rollouts)) if weights[i] > 0)
    return out


def _gradients(model, pack, advantages, weights) -> tuple:
    """Gradients of every parameter from one pack's loss (the stage's path: logits at the reply positions,
    vocab-parallel cross entropy, the loss component) and from the objective written out on a full forward."""
    from keye.rl.logps import reply_logits
    from keye.rl.step import _LossSums, _policy_loss
    from keye_plugins.loss.grpo import GRPOLoss

    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        model.zero_grad()
        return flat

    model.zero_grad()
    loss = GRPOLoss(GRPOLoss.Config(clip_low=CLIP, clip_high=CLIP))
    _policy_loss(loss, pack, _LossSums(), reply_logits(model, pack))[0].backward()
    got = grads()
    batch = pack.batch
    full = model(batch.input_ids, batch.position_ids, batch.attention_mask, images=batch.images,
                 videos=batch.videos)[0].float().log_softmax(-1)  # (T, V)
    total = 0.0
    for j, index in enumerate(pack.rollouts):
        if weights[index] == 0:
            continue
        positions = batch.answer_segments[j]
        new = full[positions].gather(1, batch.labels[0][positions].unsqueeze(1))[:, 0]
        start = sum(pack.lengths[:j])
        ratio = torch.exp(new - pack.old_logp[start: start + len(positions)])
        a = float(advantages[index])
        total = total - torch.minimum(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a).mean()  # a sum over replies
    total.backward()
    return got, grads()


def test_reply_logps_entropy_and_loss_against_independent_formulas():
    out = run_distributed(_check, 1)[0]
    assert out["packs"] >= 1
    for got, expected in zip(out["logp"], out["expected_logp"]):
        assert torch.allclose(got.double(), expected, atol=2e-5), (got, expected)
    for got, expected in zip(out["entropy"], out["expected_entropy"]):
        assert torch.allclose(got.double(), expected, atol=2e-5)
    mean, expected, units = out["sequence_mean"]
    assert units == out["trained"]  # the unit of the Keye-VL form is the reply
    assert abs(mean - expected) < 1e-5 and abs(expected) > 1e-3
    got, expected = out["grad"]
    assert expected.abs().max() > 1e-4 and torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    mean, expected, units = out["token_mean"]
    assert units == out["reply_tokens"]  # DAPO's unit is the reply token
    assert abs(mean - expected) < 1e-5
