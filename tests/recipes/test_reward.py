"""Reward-model recipe on a tiny model: beats chance on held-out pairs (full and LoRA), the saved
model loads for scoring (`tunelab score`), margins, and exact resume with the head in checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunelab
from tests.helpers import rlhf_config
from tunelab.cli import main
from tunelab.rl.reward_model import CONFIG_FILE, HEAD_FILE, load_reward_model
from tunelab.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "rlhf" / "preference_train.jsonl"
HELD_OUT = ROOT / "data" / "rlhf" / "preference_eval.jsonl"
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}


def reward_config(
    model_dir, output_dir, *overrides, method=None, train=PAIRS, eval_file=HELD_OUT, **objective
):
    train_section = {"max_steps": 60, "batch_size": 16, "lr": 1e-3, "log_every": 1}
    objective = {"name": "reward", **objective}
    return rlhf_config(model_dir, output_dir, overrides, objective, train, eval_file, method, train_section)


@pytest.mark.parametrize(("method", "lr"), [({"name": "full"}, 1e-3), (LORA, 3e-3)], ids=["full", "lora"])
def test_reward_model_beats_chance_and_loads_for_scoring(llama_dir, tmp_path, capsys, method, lr):
    """60 steps of 16 pairs: held-out pairwise accuracy (200 pairs) well above chance; the saved
    model (method artifact + head) scores the held-out pairs the same through `tunelab score`."""
    out = tmp_path / "rm"
    summary = tunelab.train(reward_config(llama_dir, out, f"train.lr={lr}", method=method))
    assert summary["eval_accuracy"] >= 0.6 > summary["eval_accuracy_before"] + 0.02
    rows = read_metrics(out)
    assert len(rows) == 60 and all({"step", "loss", "accuracy", "margin"} <= set(r) for r in rows)
    final = out / "final"
    assert json.loads((final / CONFIG_FILE).read_text())["template"] == "alpaca"
    assert not (final / HEAD_FILE).exists()  # the head is the classifier's `score`
    artifact = "adapter_config.json" if method["name"] == "lora" else "config.json"
    assert (final / artifact).is_file()
    check_loads_in_transformers(llama_dir, final, method["name"])
    capsys.readouterr()
    assert main(["score", str(out), "--data", str(HELD_OUT), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 201 and set(json.loads(lines[0])) == {"record", "chosen", "rejected"}
    scored = json.loads(lines[-1])["summary"]
    assert scored["pairs"] == 200
    assert scored["accuracy"] == pytest.approx(summary["eval_accuracy"], abs=0.011)
    assert scored["mean_margin"] == pytest.approx(summary["eval_margin"], abs=1e-3)


def check_loads_in_transformers(llama_dir, final: Path, method: str) -> None:
    """The saved reward model loads in transformers (full) or PEFT (LoRA) as a one-label sequence
    classifier, and scores a padded batch exactly as tunelab's loaded reward model does."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    if method == "lora":
        base = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1)
        base.config.pad_token_id = 0
        outside = PeftModel.from_pretrained(base, final).eval()
    else:
        outside = AutoModelForSequenceClassification.from_pretrained(final).eval()
        assert outside.config.architectures == ["LlamaForSequenceClassification"]
    # Right-padded rows (pad id 0); the last row also attends to a final pad-id token, as a row ending
    # in EOS does when the tokenizer pads with EOS: the score is read before it, as transformers does.
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 10, 11, 2, 0], [1, 12, 13, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        expected = outside(input_ids=ids, attention_mask=mask).logits[:, 0]
    ours = load_reward_model(final, device="cpu").score(ids, mask)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 1e-3  # a trained head, not zeros


def test_the_earlier_format_still_loads(llama_dir, tmp_path, capsys):
    """Bottleneck adapters keep the head beside the adapter (`reward_head.safetensors`); a folder in
    that format, including one written before the head lost its bias, loads and scores."""
    out = tmp_path / "rm"
    adapter = {"name": "adapter", "reduction_factor": 4}
    tunelab.train(reward_config(llama_dir, out, "train.max_steps=2", method=adapter, eval_file=None))
    final = out / "final"
    assert (final / HEAD_FILE).is_file() and (final / "adapter_config.json").is_file()
    ids, mask = torch.tensor([[1, 7, 8, 2]]), torch.ones(1, 4, dtype=torch.long)
    first = load_reward_model(out, device="cpu").score(ids, mask)
    from safetensors.torch import load_file, save_file

    head = load_file(str(final / HEAD_FILE))
    save_file({**head, "bias": torch.tensor([0.5])}, str(final / HEAD_FILE))
    info = json.loads((final / CONFIG_FILE).read_text())
    (final / CONFIG_FILE).write_text(json.dumps({**info, "pooling": "last_token"}))
    torch.testing.assert_close(load_reward_model(out, device="cpu").score(ids, mask), first + 0.5)


def test_score_one_response_and_responses_file(llama_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    tunelab.train(reward_config(llama_dir, out, "train.max_steps=2", eval_file=None))
    reward_model = load_reward_model(out, device="cpu")
    assert not any(p.requires_grad for p in reward_model.model.parameters())
    capsys.readouterr()
    assert (
        main(["score", str(out), "--prompt", "What is 2 plus 3?", "--response", "5", "--device", "cpu"]) == 0
    )
    assert math.isfinite(float(capsys.readouterr().out))
    responses = tmp_path / "responses.jsonl"
    rows = [
        {"prompt": "What is 2 plus 3?", "response": "5"},
        {"prompt": "What is 2 plus 3?", "completion": "6"},
    ]
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(out), "--data", str(responses), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line.get("record") for line in lines[:2]] == [1, 2] and lines[2]["summary"]["records"] == 2
    assert main(["score", str(tmp_path / "nothing"), "--prompt", "a", "--response", "b"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_margins_from_the_data_enter_the_loss(llama_dir, tmp_path):
    """With a margin m = 5 on every pair the first loss is about -log sigma(-5) = 5.0 instead of log 2."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()[:32]]
    plain, margined = tmp_path / "plain.jsonl", tmp_path / "margin.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    margined.write_text("".join(json.dumps({**r, "margin": 5.0}) + "\n" for r in rows))
    tunelab.train(reward_config(llama_dir, tmp_path / "a", "train.max_steps=1", train=plain, eval_file=None))
    tunelab.train(
        reward_config(llama_dir, tmp_path / "b", "train.max_steps=1", train=margined, eval_file=None)
    )
    first_plain, first_margin = (
        read_metrics(tmp_path / "a")[0]["loss"],
        read_metrics(tmp_path / "b")[0]["loss"],
    )
    assert first_plain == pytest.approx(math.log(2), abs=0.1)
    assert first_margin == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-5.0)).item(), abs=0.2)


def test_resume_equals_no_stop(llama_dir, tmp_path):
    """The reward head is a trainable parameter of the model: checkpoints hold it and a resumed run
    continues exactly."""
    common = ["train.max_steps=6", "train.save_every=3", "train.batch_size=8"]
    tunelab.train(reward_config(llama_dir, tmp_path / "full", *common, eval_file=None))
    from tunelab.training import loop

    original = loop.MetricsLog.log

    def log(self, row):
        original(self, row)
        if row["step"] >= 4:
            raise KeyboardInterrupt

    loop.MetricsLog.log = log
    try:
        with pytest.raises(KeyboardInterrupt):
            tunelab.train(reward_config(llama_dir, tmp_path / "cut", *common, eval_file=None))
    finally:
        loop.MetricsLog.log = original
    tunelab.train(reward_config(llama_dir, tmp_path / "cut", *common, "train.resume=true", eval_file=None))
    straight = [r["loss"] for r in read_metrics(tmp_path / "full")]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "cut")]
    assert resumed == pytest.approx(straight, rel=1e-6)


@pytest.fixture
def classifier_from_elsewhere(llama_dir, tmp_path):
    """A one-label `LlamaForSequenceClassification` saved by transformers alone (random score head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path / "classifier"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval(), tokenizer


def test_a_sequence_classifier_from_elsewhere_scores_as_in_transformers(classifier_from_elsewhere, capsys):
    folder, model, tokenizer = classifier_from_elsewhere
    messages = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    capsys.readouterr()
    args = ["score", str(folder), "--prompt", "What is 2 plus 3?", "--response", "5", "--device", "cpu"]
    assert main(args) == 0
    assert float(capsys.readouterr().out) == pytest.approx(expected, abs=1e-5)


def test_a_classifier_with_two_labels_is_refused(llama_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=2).save_pretrained(
        tmp_path / "c"
    )
    assert main(["score", str(tmp_path / "c"), "--prompt", "a", "--response", "b", "--device", "cpu"]) == 2
    assert "2 labels" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_online_rl_takes_a_sequence_classifier_as_its_reward_model(
    classifier_from_elsewhere, llama_dir, tmp_path, objective
):
    folder, _, _ = classifier_from_elsewhere
    options = {"name": objective, "reward_model": str(folder), "max_new_tokens": 6}
    if objective == "grpo":
        options["num_generations"] = 4
    prompts = ROOT / "data" / "rlhf" / "prompts_train.jsonl"
    train = {"max_steps": 2, "batch_size": 4, "lr": 1e-3}
    out = tmp_path / objective
    tunelab.train(rlhf_config(llama_dir, out, [], options, prompts, None, None, train, {"num_examples": 4}))
    rows = read_metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)
    assert len({r["reward"] for r in rows}) == 2  # the classifier's scores, not a constant


def test_a_reward_model_with_another_tokenizer_reads_the_text_again(llama_dir, tmp_path):
    """A classifier with its own tokenizer (another vocabulary) scores GRPO's completions from their
    text, rendered with its own chat template: the ids it reads are what its tokenizer gives."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tunelab.rl.rewards import Rewards
    from tunelab.tiny import build_tokenizer, default_corpus
    from tunelab.trained import load_trained

    tokenizer = build_tokenizer(default_corpus(), vocab_size=300)  # not the policy's 512
    config = AutoConfig.from_pretrained(llama_dir, num_labels=1, vocab_size=len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    folder = tmp_path / "other"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _, policy_tokenizer, _ = load_trained(llama_dir, device="cpu")
    rewards = Rewards([], None, str(folder), policy_tokenizer, "alpaca", torch.device("cpu"))
    prompts, completions = ["What is 2 plus 3?", [{"role": "user", "content": "Say hi."}]], ["5", "hi there"]
    ids, mask = rewards._retokenized(prompts, completions)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages.append({"role": "assistant", "content": completion})
        expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids[row][mask[row].bool()].tolist() == expected
    unused = torch.zeros(2, 1, dtype=torch.long)
    total, parts = rewards.score(prompts, completions, [[5], [6]], {}, unused, unused)
    assert torch.equal(total, parts["model"]) and parts["model"].abs().min() > 0


def test_training_pools_where_the_saved_classifier_pools(llama_dir):
    """The reward a run trains on (`sequence_rewards`) is the score of the classifier it saves, also
    for a row whose last attended token is the padding id (a tokenizer that pads with EOS)."""
    from tunelab.models import load_model
    from tunelab.rl.reward_model import REWARD_HEAD, as_classifier, attach_head, sequence_rewards

    torch.manual_seed(0)
    model = load_model(str(llama_dir), device="cpu").eval()
    head = attach_head(model, REWARD_HEAD, bias=False)
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 12, 13, 0, 0]])  # pad id 0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # row 2 attends one pad-id token
    with torch.no_grad():
        ours = sequence_rewards(model, head, ids, mask, pad_token_id=0)
        theirs = as_classifier(model, head, pad_token_id=0)(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
