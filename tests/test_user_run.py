"""A new user's run, end to end (issue 16): bad input stops at start-up in one line before any model loads; a full
disk at save keeps the previous checkpoint; an earlier run in out_dir is not appended to; Ctrl-C stops cleanly and
the run resumes bit for bit over steps that change the weights; a damaged checkpoint is named and skipped; the end
of a run says how to evaluate it."""

import dataclasses
import errno
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import train
from test_train import FakeBrowseConfig, StubBrowser, _cfg, _hf_weights, fake_agent, use_agent
from train import PRESETS, Config, parse_config


def _main(args):
    return train.main(parse_config(Config, args, PRESETS))


# ---------------------------------------------------------------------------------------------------- start-up

def _bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    broken = tmp_path / "broken.jsonl"  # line 5 is cut short; json alone would say "line 1"
    broken.write_text("".join(json.dumps({"question": f"q{i}", "answers": ["a"]}) + "\n" for i in range(4))
                      + '{"question": "q5", "answers": ["a"\n')
    no_q = tmp_path / "no_question.jsonl"
    no_q.write_text('{"question": "q1", "answers": ["a"]}\n{"query": "q2", "answers": ["a"]}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return [
        (dict(steps=-3), r"--steps=-3: must be at least 1"),
        (dict(steps=0), r"--steps=0: must be at least 1"),
        (dict(group_size=1), r"--group_size=1: .*GRPO.*at least 2"),
        (dict(warm_start_frozen_layers=-1), r"--warm_start_frozen_layers=-1: must be at least 0"),  # slicing froze 29
        (dict(data=empty), r"holds no questions"),
        (dict(data=broken), r"broken\.jsonl: line 5 is not valid JSON"),
        (dict(data=no_q), r"no_question\.jsonl: line 2 has no 'question' field"),
        (dict(model="/a/missing/path"), r"--model=/a/missing/path: .* does not exist"),
        (dict(out_dir=a_file / "run"), r"cannot write there"),  # a path under a file: unwritable even for root
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_input_fails_at_startup_in_one_line(case, tmp_path, tiny_qwen2, monkeypatch):
    """Each bad input stops with a one-line SystemExit message before any model is built or resolved."""
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train, "build_model", no_model)
    use_agent(monkeypatch, fake_agent)
    kw, pattern = _bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as ex:
        _main(_cfg(tmp_path / "out", kw.pop("model", tiny_qwen2), **kw))
    msg = ex.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    assert re.search(pattern, msg), msg


def test_load_examples_names_file_and_line(tmp_path):
    from data.prepare import load_examples

    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "a", "answers": ["b"]}\n\n{"question": "c", "answers": ["d"]}\n{oops}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl: line 4 is not valid JSON"):  # blank line 2 counted too
        load_examples(f)
    f.write_text('{"question": "a", "answers": ["b"]}\n\n{"question": "c", "answers": ["d"]}\n')
    assert [e["question"] for e in load_examples(f)] == ["a", "c"]


# ---------------------------------------------------------------------------------------------------- run hygiene

def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, tiny_qwen2, monkeypatch, capsys):
    use_agent(monkeypatch, fake_agent)
    out = tmp_path / "run"
    _main(_cfg(out, tiny_qwen2, steps=1))
    printed = capsys.readouterr().out  # the start says what differs from the defaults; the end what to do next
    assert "config: --preset" not in printed and f"--out_dir={out}" in printed and '"max_turns"' not in printed
    assert f"{out / 'reward.png'}" in printed and "last dev F1 (greedy): " in printed
    assert "the first-title shortcut on the same questions: " in printed  # the line a trained agent must clear
    assert f"report: {out / 'report.html'}" in printed and (out / "report.html").exists()
    assert f"python eval.py --preset=offline --model={out / 'ckpt' / 'step_000001' / 'hf'}" in printed
    with pytest.raises(SystemExit, match=r"already holds a run .*--resume=True.*--out_dir=.*--overwrite=True"):
        _main(_cfg(out, tiny_qwen2, steps=1))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # nothing appended
    _main(_cfg(out, tiny_qwen2, steps=1, overwrite=True))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the old run was wiped, not appended to


def test_a_failing_report_does_not_lose_the_run(tmp_path, monkeypatch, capsys):
    """report.py is optional and runs last: missing, it is skipped; failing, the run says so and ends normally."""
    import types

    def broken(folder):
        raise RuntimeError("no tokenizer")

    monkeypatch.setitem(sys.modules, "report", types.SimpleNamespace(write_report=broken))
    assert train.write_report(tmp_path) is None
    said = capsys.readouterr().err
    assert "report.write_report failed (RuntimeError: no tokenizer); the run's files are intact" in said
    monkeypatch.setitem(sys.modules, "report", None)  # `import report` raises ModuleNotFoundError
    assert train.write_report(tmp_path) is None


def test_disk_full_at_save_keeps_previous_checkpoint(tmp_path, tiny_qwen2, monkeypatch):
    import torch.distributed.checkpoint as dcp

    use_agent(monkeypatch, fake_agent)
    real_save, calls = dcp.save, []

    def save(*a, **k):  # the second save finds the disk full half way
        calls.append(1)
        if len(calls) == 2:
            real_save(*a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a, **k)

    monkeypatch.setattr(dcp, "save", save)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as ex:
        _main(_cfg(out, tiny_qwen2, steps=2, save_every=1, keep_last=2))
    assert "no space left on" in ex.value.code and "step_000001" in ex.value.code and "\n" not in ex.value.code
    names = sorted(p.name for p in (out / "ckpt").iterdir())
    assert names == ["step_000001"]  # the partial step_000002.tmp is gone, the previous one is kept
    assert train.checkpoint_problem(out / "ckpt" / "step_000001") is None


def _varying(real):
    """The real reward with a score that varies within groups (a tiny random model never gets the format right, so
    its real rewards are all -1 and no step would change the weights). A pure function of the texts: reproducible."""
    def reward(texts, gold, **kw):
        return dataclasses.replace(real(texts, gold, **kw), score=(sum(map(ord, "".join(texts))) % 3) / 2)
    return reward


def _real_agent_stub_web():
    from rollout import RolloutConfig, rollout
    return rollout, RolloutConfig, StubBrowser, FakeBrowseConfig


def test_ctrl_c_then_resume_is_bit_identical_over_weight_changing_steps(tmp_path, tiny_qwen2, monkeypatch, capsys):
    """The tiny preset with the real engine and agent loop (stub web), a reward that varies within groups: every
    step moves the weights; Ctrl-C during step 3 exits 130 saying how to resume; the resumed run ends bit-identical
    to the uninterrupted one."""
    monkeypatch.setattr(train, "reward", _varying(train.reward))
    use_agent(monkeypatch, _real_agent_stub_web)
    kw = dict(steps=3, save_every=1, keep_last=3, max_new_tokens=16, micro_tokens=2048, eval_every=0)  # rollouts: steps
    a, b = tmp_path / "a", tmp_path / "b"
    _main(_cfg(a, tiny_qwen2, **kw))
    ws = [_hf_weights(a / "ckpt" / f"step_{s:06d}") for s in (1, 2, 3)]
    from safetensors.torch import load_file

    w0 = load_file(str(Path(tiny_qwen2) / "model.safetensors"))
    for prev, cur in zip([w0] + ws[:-1], ws):  # each step changed (almost) every tensor
        changed = [k for k in cur if not torch.equal(prev[k].float(), cur[k].float())]
        assert len(changed) >= len(cur) - 1, (len(changed), len(cur))
    rewards = [json.loads(x)["reward_std"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert all(r > 0 for r in rewards)

    rollout, RolloutConfig, Browser, BrowseConfig = _real_agent_stub_web()
    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C arrives during the third rollout
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return rollout(*args, **kwargs)

    use_agent(monkeypatch, lambda: (interrupted, RolloutConfig, Browser, BrowseConfig))
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        _main(_cfg(b, tiny_qwen2, **kw))
    assert ex.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "step_000002" in err and "--resume=True" in err
    use_agent(monkeypatch, _real_agent_stub_web)
    _main(_cfg(b, tiny_qwen2, **kw, resume=True))
    wb = _hf_weights(b / "ckpt" / "step_000003")
    assert wb.keys() == ws[2].keys() and all(torch.equal(wb[k], ws[2][k]) for k in wb)
    assert [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["distcp", "state", "rng", "metadata"])
def test_damaged_checkpoint_is_named_and_skipped(damage, tmp_path, tiny_qwen2, monkeypatch, capsys):
    use_agent(monkeypatch, fake_agent)
    out = tmp_path / "run"
    _main(_cfg(out, tiny_qwen2, steps=2, save_every=1, keep_last=2))
    last = out / "ckpt" / "step_000002"
    f = {"distcp": next((last / "dcp").glob("*.distcp")), "state": last / "state.json",
         "rng": last / "rng_rank0.pt", "metadata": last / "dcp" / ".metadata"}[damage]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as by a crash or a full disk
    cfg = parse_config(Config, _cfg(out, tiny_qwen2, steps=3, save_every=1, keep_last=2, resume=True), PRESETS)
    assert str(f) in train.checkpoint_problem(last)
    said = []
    assert train.find_resume_checkpoint(cfg, say=said.append) == out / "ckpt" / "step_000001"
    assert str(f) in said[0] and "step_000001" in said[1]
    with pytest.raises(SystemExit, match="cannot resume from it"):  # an explicit folder is not replaced
        train.find_resume_checkpoint(dataclasses.replace(cfg, resume=str(last)))
    if damage == "distcp":  # the run itself goes on from step 1, and --resume=<path> is accepted
        capsys.readouterr()
        _main(_cfg(out, tiny_qwen2, steps=3, save_every=1, keep_last=2, resume=True))
        assert "resuming from the newest intact checkpoint" in capsys.readouterr().out
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3]
        _main(_cfg(out, tiny_qwen2, steps=4, resume=str(out / "ckpt" / "step_000003")))
        assert (out / "ckpt" / "step_000004" / "state.json").exists()


# ---------------------------------------------------------------------------------------------------- eval.py

def test_eval_defaults_one_folder_per_model_and_the_offline_dev_set():
    import eval as ev

    assert ev.Config().data == "data/qa_dev_research.jsonl"  # the dev set of what the default run trains for
    single = ev.parse_config(ev.Config, ["--preset=single_hop"], ev.PRESETS)
    assert (single.data, single.max_turns, single.max_len) == ("data/qa_dev.jsonl", 3, 1024)
    base = ev.resolve_out_dir(ev.parse_config(ev.Config, ["--preset=offline"], ev.PRESETS))
    trained = ev.resolve_out_dir(ev.parse_config(
        ev.Config, ["--preset=offline", "--model=runs/train/ckpt/step_000006/hf"], ev.PRESETS))
    assert base.out_dir == "runs/eval-offline-SmolLM2-135M-Instruct"
    assert trained.out_dir == "runs/eval-offline-train-step_000006"
    explicit = ev.resolve_out_dir(ev.parse_config(ev.Config, ["--out_dir=x/y"], ev.PRESETS))
    assert explicit.out_dir == "x/y"


def test_eval_resume_refuses_another_models_trajectories(tmp_path, tiny_qwen2, monkeypatch):
    """The README's before/after comparison: a second model pointed at the first one's folder must not re-score
    the first model's trajectories under its own name."""
    import eval as ev
    from test_eval import FakeAgent, FakeBrowser, FakeBrowseConfig as EvBrowseConfig, FakeRolloutConfig

    agent = FakeAgent()
    use_agent(monkeypatch, lambda: (agent.rollout, FakeRolloutConfig, FakeBrowser, EvBrowseConfig), ev)
    out = tmp_path / "eval"
    args = ["--preset=tiny", "--limit=4", f"--out_dir={out}"]
    ev.main(ev.parse_config(ev.Config, args, ev.PRESETS))
    assert len(agent.seen) == 4 and json.loads((out / "run.json").read_text())["model"] == "tiny"
    ev.main(ev.parse_config(ev.Config, args, ev.PRESETS))  # the same run again: resumes, nothing to run
    assert len(agent.seen) == 4
    with pytest.raises(SystemExit) as ex:
        ev.main(ev.parse_config(ev.Config, args + [f"--model={tiny_qwen2}"], ev.PRESETS))
    msg = ex.value.code
    assert "weights_sha256 was" in msg and "model_path was" in msg and "--out_dir=" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="max_turns was 3, now 5"):
        ev.main(ev.parse_config(ev.Config, args + ["--max_turns=5"], ev.PRESETS))
    assert len(agent.seen) == 4  # nothing ran, nothing was re-scored under the wrong name
    with pytest.raises(SystemExit, match="does not exist"):  # train.py's start-up checks, reused
        ev.main(ev.parse_config(ev.Config, args + ["--model=/a/missing/path"], ev.PRESETS))
